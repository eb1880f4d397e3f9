"""LoRA fine-tuning through MoC (`diffusers-moc train`), data, schedule and sharing, on the tiny Wan model."""

from __future__ import annotations

import json
import logging
import os
from unittest import mock

import numpy as np
import pytest
import torch

from diffusers_moc import MoCConfig, get_moc_config
from diffusers_moc.core.layout import ChunkLayout
from diffusers_moc.hub import LORA_WEIGHT_NAME, LORA_WEIGHT_NAME_2, load_moc_lora, push_to_hub
from diffusers_moc.training import (
    ConfigError,
    MoCLoRATrainer,
    SparsitySchedule,
    StepBatchSampler,
    TrainConfig,
    VideoClipDataset,
    latent_shot_frames,
    load_train_config,
    routed_density,
)

iio = pytest.importorskip("imageio.v3")

from _train_helpers import (  # noqa: E402
    NUM_FRAMES,
    _config,
    _lora_state,
    _make_dataset,
    _reset_accelerate,
    _write_clip,
)

pytestmark = pytest.mark.usefixtures("_one_thread", "_fresh_accelerate_state")


@pytest.fixture(scope="module")
def trained(data_root, tmp_path_factory, _one_thread):
    """30 steps with cached latents, sparsifying from dense, validation videos and TensorBoard logging."""
    _reset_accelerate()
    out = tmp_path_factory.mktemp("trained")
    config = _config(
        data_root,
        out,
        sparsity={"start_top_k": "dense", "warmup_steps": 2, "anneal_steps": 8},
        data={"cache": True},
        training={"max_steps": 30, "batch_size": 2, "learning_rate": 1e-2, "gradient_checkpointing": False},
        validation={
            "every": 15,
            "prompts": ["a red car drives in the city"],
            "num_frames": 9,
            "height": 32,
            "width": 32,
            "num_inference_steps": 2,
            "fps": 8,
        },
        logging={"report_to": ["tensorboard"]},
    )
    from diffusers_moc.core import routing

    trainer = MoCLoRATrainer(config)
    with mock.patch.object(routing, "_regularise", wraps=routing._regularise) as regularise:
        result = trainer.train()
    trainer.regularise_calls = regularise.call_count
    _reset_accelerate()
    return config, trainer, result


# ---------------------------------------------------------------------- training
def test_training_lowers_the_loss(trained):
    config, _, result = trained
    assert result.global_step == 30 and len(result.losses) == 30
    print("losses", [round(x, 4) for x in result.losses])
    first, last = np.mean(result.losses[:8]), np.mean(result.losses[-8:])
    assert last < 0.9 * first, (first, last)


def test_training_follows_the_sparsity_schedule(trained):
    config, trainer, result = trained
    # 5 latent frames = 5 chunks; dense for the 2 warm-up steps and the anneal's first step (top_k 5), then
    # top_k 4 -> 1.
    assert result.densities[:4] == [1.0, 1.0, 1.0, 0.6]
    assert result.densities[-1] == pytest.approx(9 / 25)  # own chunk + 1 routed earlier chunk, causal
    assert all(a >= b for a, b in zip(result.densities, result.densities[1:]))
    # Context drop-off / drop-in ran in training once routing is sparse (27 steps; the 3 dense steps attend
    # everything): 2 layers x 2 shot groups per step, and never in the (eval-mode) validation generations.
    assert trainer.regularise_calls == 2 * 2 * 27
    # After training the model carries the configured (target) MoC settings.
    assert get_moc_config(trainer.pipeline.transformer) == config.moc


def test_validation_videos_and_tensorboard_logs(trained):
    config, _, result = trained
    assert [os.path.basename(p) for p in result.validation_videos] == ["step-000015-0.mp4", "step-000030-0.mp4"]
    for path in result.validation_videos:
        assert iio.imread(path, plugin="pyav").shape == (9, 32, 32, 3)
    logs = [f for _, _, files in os.walk(os.path.join(config.output_dir, "logs")) for f in files]
    assert any(f.startswith("events.out.tfevents") for f in logs), logs


def test_latent_cache_is_written_and_reused(trained, tmp_path):
    config, _, _ = trained
    cache = os.path.join(config.output_dir, "cache")
    assert len([f for f in os.listdir(cache) if f.endswith(".safetensors")]) == 2


# ---------------------------------------------------------------------- sharing
def _generate(pipe, seed: int = 0) -> np.ndarray:
    return pipe(
        prompt="a dog runs on the beach",
        height=32,
        width=32,
        num_frames=9,
        num_inference_steps=2,
        guidance_scale=1.0,
        max_sequence_length=16,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    ).frames[0]


def test_latent_cache_key_holds_max_sequence_length(data_root, tmp_path):
    from safetensors.torch import load_file

    cache = tmp_path / "cache"
    seen: set = set()
    for i, length in enumerate((16, 12)):
        _reset_accelerate()
        config = _config(
            data_root,
            tmp_path / f"run{i}",
            data={"cache": True, "cache_dir": str(cache), "max_sequence_length": length},
            # Dropped captions are the "" embedding at the new length: stale cached embeddings would not match it.
            training={"max_steps": 1, "caption_dropout": 1.0},
            sparsity={"anneal_steps": 0},
        )
        assert np.isfinite(MoCLoRATrainer(config).train().losses).all()
        new = set(cache.iterdir()) - seen
        assert len(new) == 2  # both clips encoded again at the new text length
        text_tokens = [load_file(f)["prompt_embeds"].shape[0] for f in new]
        assert min(text_tokens) == length and all(n % length == 0 for n in text_tokens)
        seen |= new


def test_saved_lora_loads_back_with_identical_outputs(trained):
    from diffusers import WanPipeline

    from diffusers_moc.tiny import tiny_wan_components

    config, trainer, result = trained
    assert sorted(os.listdir(result.final_dir)) == ["README.md", "moc_config.json", LORA_WEIGHT_NAME]
    expected = _generate(trainer.pipeline)

    pipe = WanPipeline(**tiny_wan_components())
    pipe.set_progress_bar_config(disable=True)
    base = _generate(pipe)
    load_moc_lora(pipe, result.final_dir)  # one call: adapter + MoC routing
    assert get_moc_config(pipe.transformer) == config.moc
    loaded = _generate(pipe)
    assert not np.array_equal(base, expected)  # the adapter changes the model, so the check below means something
    np.testing.assert_array_equal(loaded, expected)


def test_model_card_names_base_tags_and_settings(trained):
    _, _, result = trained
    card = open(os.path.join(result.final_dir, "README.md")).read()
    for text in ("diffusers-moc", "mixture-of-contexts", "lora", "`top_k`", "load_moc_lora", "sparsity_schedule"):
        assert text in card, text


def test_push_to_hub_uploads_the_folder(trained):
    _, _, result = trained
    with mock.patch("huggingface_hub.HfApi") as api_cls:
        api = api_cls.return_value
        api.upload_folder.return_value = mock.Mock(commit_url="https://hf.co/user/moc/commit/1")
        url = push_to_hub(result.final_dir, "user/wan-moc-lora", private=True, token="hf_x")
    assert url == "https://hf.co/user/moc/commit/1"
    api_cls.assert_called_once_with(token="hf_x")
    api.create_repo.assert_called_once()
    assert api.create_repo.call_args.kwargs["repo_id"] == "user/wan-moc-lora"
    assert api.create_repo.call_args.kwargs["private"] is True
    upload = api.upload_folder.call_args.kwargs
    assert upload["repo_id"] == "user/wan-moc-lora" and upload["folder_path"] == result.final_dir
    assert sorted(os.listdir(upload["folder_path"])) == ["README.md", "moc_config.json", LORA_WEIGHT_NAME]


def test_push_to_hub_refuses_a_folder_that_is_not_a_moc_lora(tmp_path):
    (tmp_path / "moc_config.json").write_text("{}")
    with mock.patch("huggingface_hub.HfApi") as api_cls:
        with pytest.raises(FileNotFoundError, match=LORA_WEIGHT_NAME):
            push_to_hub(tmp_path, "user/x")
    api_cls.return_value.upload_folder.assert_not_called()


def test_load_moc_lora_needs_a_moc_config(trained, tmp_path):
    from diffusers import WanPipeline

    from diffusers_moc.tiny import tiny_wan_components

    with pytest.raises(FileNotFoundError, match="moc_config.json"):
        load_moc_lora(WanPipeline(**tiny_wan_components()), tmp_path)


# ---------------------------------------------------------------------- resume
@pytest.mark.parametrize("model", [{}, {"tiny_model": "wan2.2-t2v-a14b", "expert": "both"}], ids=["wan2.1", "a14b"])
def test_resume_is_exact(data_root, tmp_path, model):
    sections = {
        "model": model,
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.1},
        "training": {
            "max_steps": 6,
            "gradient_accumulation_steps": 2,
            "lr_scheduler": "cosine",
            "lr_warmup_steps": 2,
            "weighting_scheme": "logit_normal",
            "caption_dropout": 0.3,
        },
        "checkpointing": {"every": 3},
    }
    straight = MoCLoRATrainer(_config(data_root, tmp_path / "a", **sections))
    full = straight.train()
    assert os.path.isdir(tmp_path / "a" / "checkpoint-3") and os.path.isdir(tmp_path / "a" / "checkpoint-6")
    # Checkpoints hold the adapter in diffusers' LoRA format (one file per trained expert), not the base weights.
    assert LORA_WEIGHT_NAME in os.listdir(tmp_path / "a" / "checkpoint-3")
    if model:
        assert LORA_WEIGHT_NAME_2 in os.listdir(tmp_path / "a" / "checkpoint-3")
    assert not any(f.startswith("model") for f in os.listdir(tmp_path / "a" / "checkpoint-3"))
    _reset_accelerate()

    # Resume the same run from its step-3 checkpoint (same config: same LR schedule) in a fresh process state.
    checkpoint = str(tmp_path / "a" / "checkpoint-3")
    resumed = MoCLoRATrainer(
        _config(data_root, tmp_path / "b", **{**sections, "checkpointing": {"every": 3, "resume_from": checkpoint}})
    )
    rest = resumed.train()
    assert rest.global_step == 6 and len(rest.losses) == 3
    assert rest.losses == full.losses[3:] and rest.learning_rates == full.learning_rates[3:]
    for name in ("transformer", "transformer_2") if model else ("transformer",):
        a, b = _lora_state(straight, name), _lora_state(resumed, name)
        assert a.keys() == b.keys() and len(a) > 0
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_bf16_keeps_the_fp32_modules_in_fp32(data_root, tmp_path):
    trainer = MoCLoRATrainer(
        _config(data_root, tmp_path, training={"max_steps": 1, "mixed_precision": "bf16"}, sparsity={"anneal_steps": 0})
    )
    result = trainer.train()
    assert np.isfinite(result.losses).all()
    transformer = trainer.pipeline.transformer
    keep = transformer._keep_in_fp32_modules
    dtypes = {}
    for name, p in transformer.named_parameters():
        kept = any(k in name.split(".") for k in keep)
        dtypes.setdefault("lora" if "lora_" in name else "kept" if kept else "base", set()).add(p.dtype)
    assert dtypes == {"kept": {torch.float32}, "base": {torch.bfloat16}, "lora": {torch.float32}}
    text_encoder = trainer.pipeline.text_encoder
    assert {p.dtype for n, p in text_encoder.named_parameters() if "wo" in n.split(".")} == {torch.float32}
    assert {p.dtype for n, p in text_encoder.named_parameters() if "wo" not in n.split(".")} == {torch.bfloat16}


def test_compiled_training_matches_eager(data_root, tmp_path, request):
    import torch._inductor.config as inductor_config

    # Restored after the test (the trainer sets it). Not monkeypatch: undoing a patch of inductor's config module
    # deletes the setting, and later compiles fail.
    request.addfinalizer(lambda old=inductor_config.fallback_random: setattr(inductor_config, "fallback_random", old))
    inductor_config.fallback_random = False
    # One sparse optimizer step with drop-off and drop-in on the default backend, each block compiled whole.
    sections = {"sparsity": {"start_top_k": 1, "warmup_steps": 0, "anneal_steps": 0}}
    runs = {}
    for compile in (False, True):
        _reset_accelerate()
        training = {"max_steps": 1, "gradient_checkpointing": False, "compile": compile, "compile_fullgraph": compile}
        trainer = MoCLoRATrainer(_config(data_root, tmp_path / f"compile-{compile}", training=training, **sections))
        runs[compile] = (trainer.train().losses, _lora_state(trainer), trainer.pipeline.transformer)
    (eager_loss, eager, eager_model), (compiled_loss, compiled, compiled_model) = runs[False], runs[True]
    assert (
        compiled_model.blocks[0]._compiled_call_impl is not None and eager_model.blocks[0]._compiled_call_impl is None
    )
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-5)
    assert eager.keys() == compiled.keys()
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------------- Wan 2.2
@pytest.mark.parametrize(
    "tiny_model, expert, trained",
    [
        ("wan2.2-ti2v-5b", None, ["transformer"]),
        ("wan2.2-t2v-a14b", "high_noise", ["transformer"]),
        ("wan2.2-t2v-a14b", "low_noise", ["transformer_2"]),
        ("wan2.2-t2v-a14b", "both", ["transformer", "transformer_2"]),
    ],
)
def test_wan22_training_trains_the_chosen_experts_on_their_timesteps(data_root, tmp_path, tiny_model, expert, trained):
    from diffusers import WanPipeline

    from diffusers_moc.hub import ADAPTER_FILES
    from diffusers_moc.tiny import tiny_wan_components
    from diffusers_moc.training import step as step_module

    size = 64 if tiny_model == "wan2.2-ti2v-5b" else 32
    config = _config(
        data_root,
        tmp_path,
        model={"tiny_model": tiny_model, "expert": expert},
        data={"height": size, "width": size},
        # TI2V-5B: every sample trains image-to-video (a clean first frame at timestep 0).
        training={"max_steps": 5, "batch_size": 2, "first_frame_condition": 1.0 if expert is None else 0.0},
    )
    calls = []
    forward_backward = step_module.FlowMatchingStep._forward_backward

    def spy(self, transformer, plans, contexts, noised, first):
        calls.append((transformer, noised.timesteps.clone(), self._timestep(noised.timesteps, noised.noisy, first)))
        return forward_backward(self, transformer, plans, contexts, noised, first)

    trainer = MoCLoRATrainer(config)
    with mock.patch.object(step_module.FlowMatchingStep, "_forward_backward", spy):
        result = trainer.train()
    assert np.isfinite(result.losses).all()
    pipe = trainer.pipeline
    assert sorted(os.listdir(result.final_dir)) == sorted(
        ["README.md", "moc_config.json"] + [ADAPTER_FILES[n] for n in trained]
    )
    # Each optimizer step trains the expert drawn for it, on that expert's timesteps (boundary 0.875: t >= 875 high).
    used = [transformer for transformer, _, _ in calls]
    if tiny_model == "wan2.2-t2v-a14b":
        assert set(used) == {getattr(pipe, e) for e in trained}  # "both" trains both within 5 steps (seed 0)
        for transformer, timesteps, _ in calls:
            high = bool((timesteps >= 875).all())
            assert high == (transformer is pipe.transformer) and (high or bool((timesteps < 875).all()))
    else:  # per-token timesteps, 5 frames of 2x2 patches, the first frame's at 0
        for _, timesteps, per_token in calls:
            assert per_token.shape == (len(timesteps), 5 * 2 * 2) and (per_token[:, :4] == 0).all()
            assert (per_token[:, 4:] == timesteps[:, None]).all()
    # The saved adapter loads back into the right expert(s), and MoC goes on every expert (as training runs the
    # frozen one for validation), computing what the trained ones compute.
    fresh = WanPipeline(**tiny_wan_components(model=tiny_model))
    load_moc_lora(fresh, result.final_dir)
    assert sorted(get_moc_config(fresh)) == [n for n in ("transformer", "transformer_2") if getattr(fresh, n, None)]
    for name in ("transformer", "transformer_2"):
        if getattr(fresh, name, None) is None:
            continue
        assert (getattr(getattr(fresh, name), "peft_config", None) is not None) == (name in trained), name
    x = {
        "hidden_states": torch.randn(
            1,
            fresh.vae.config.z_dim,
            3,
            size // fresh.vae_scale_factor_spatial,
            size // fresh.vae_scale_factor_spatial,
            generator=torch.Generator().manual_seed(0),
        ),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(1)),
        "return_dict": False,
    }
    with torch.no_grad():
        for name in trained:
            torch.testing.assert_close(getattr(fresh, name)(**x)[0], getattr(pipe, name)(**x)[0], rtol=0, atol=1e-6)


def test_a_hunyuan_video15_i2v_model_is_named_and_refused_before_loading(tmp_path):
    """HunyuanVideo 1.5 image-to-video generates with LongVideoPipeline but is not trained (text-to-video is): its
    folder is told apart by its configs and refused with the field named."""
    import json

    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "HunyuanVideo15ImageToVideoPipeline"}))
    trainer = MoCLoRATrainer(_config("/data", "/out", model={"pretrained": str(tmp_path)}))
    with pytest.raises(ConfigError, match=r"model.pretrained: is a HunyuanVideo 1.5 I2V model; training supports"):
        trainer._family()


def test_model_expert_is_checked():
    with pytest.raises(ConfigError, match="model.expert: is for Wan 2.2 A14B's two experts"):
        _config("/data", "/out", model={"expert": "high_noise"})
    with pytest.raises(ConfigError, match="model.expert: must be one of"):
        _config("/data", "/out", model={"tiny_model": "wan2.2-t2v-a14b", "expert": "middle"})
    with pytest.raises(ConfigError, match="model.tiny_model: must be one of"):
        _config("/data", "/out", model={"tiny_model": "wan2.1-i2v"})
    with pytest.raises(ConfigError, match="training.first_frame_condition: is for Wan 2.2 TI2V-5B"):
        MoCLoRATrainer(_config("/data", "/out", training={"first_frame_condition": 0.5}))._family()


# ---------------------------------------------------------------------- multi-shot conditioning
@pytest.mark.parametrize("cache, caption_dropout", [(False, 0.0), (True, 0.0), (False, 1.0)])
def test_multi_shot_training_conditions_as_the_long_video_pipeline(data_root, tmp_path, cache, caption_dropout):
    from diffusers import WanTransformer3DModel

    from diffusers_moc import current_moc_context
    from diffusers_moc.core.attention_processors import wan as wan_processors
    from diffusers_moc.pipelines import LongVideoPipeline
    from diffusers_moc.tiny import tiny_wan_components

    config = _config(
        data_root,
        tmp_path,
        data={"cache": cache},
        training={"max_steps": 1, "batch_size": 2, "gradient_checkpointing": False, "caption_dropout": caption_dropout},
        sparsity={"anneal_steps": 0},
    )
    seen = []
    forward = WanTransformer3DModel.forward

    def spy(self, *args, **kwargs):
        seen.append((current_moc_context(), kwargs["encoder_hidden_states"].detach().clone()))
        return forward(self, *args, **kwargs)

    trainer = MoCLoRATrainer(config)
    with (
        mock.patch.object(WanTransformer3DModel, "forward", spy),
        mock.patch.object(wan_processors, "_shot_cross_attention", wraps=wan_processors._shot_cross_attention) as cross,
    ):
        trainer.train()

    # The pipeline's text context for the same captions (no_grad, as in its __call__): each caption encoded alone.
    pipe = LongVideoPipeline(**tiny_wan_components())
    with torch.no_grad():
        embeds = pipe.encode_captions(["a dog", "runs on the beach", "sits", "a red car drives in the city", ""], 16)
    by_shots = {ctx.shot_frames: (ctx, text) for ctx, text in seen}
    assert len(seen) == 2 and set(by_shots) == {None, (3, 2)}  # one forward per shot / caption structure
    single_ctx, single_text = by_shots[None]
    multi_ctx, multi_text = by_shots[(3, 2)]
    assert single_ctx.caption_spans is None
    if caption_dropout:
        # All captions of a dropped sample go: the empty prompt, stock cross-attention, shots kept for MoC.
        assert multi_ctx.caption_spans is None and cross.call_count == 0
        for text in (single_text, multi_text):
            torch.testing.assert_close(text[0], embeds[""][0], rtol=0, atol=0)
        return
    torch.testing.assert_close(single_text[0], embeds["a red car drives in the city"][0], rtol=0, atol=0)
    assert multi_ctx.caption_spans == ((16, 32), (32, 48)) and multi_ctx.global_caption_span == (0, 16)
    expected = torch.cat([embeds[c] for c in ("a dog", "runs on the beach", "sits")], dim=1)
    torch.testing.assert_close(multi_text, expected, rtol=0, atol=0)
    # The MoC processor sits on every cross-attention layer and ran the per-shot caption attention there.
    assert cross.call_count == len(trainer.pipeline.transformer.blocks)


def test_single_shot_clip_with_global_and_shot_caption_gets_spans(tmp_path):
    _write_clip(str(tmp_path / "a.mp4"), seed=0)
    line = {"file": "a.mp4", "caption": "a dog", "shots": [{"caption": "runs", "frames": [0, NUM_FRAMES]}]}
    (tmp_path / "metadata.jsonl").write_text(json.dumps(line) + "\n")
    from diffusers_moc import current_moc_context
    from diffusers_moc.core.attention_processors import wan as wan_processors

    contexts = []

    def spy(*args, **kwargs):
        contexts.append(current_moc_context())
        return real(*args, **kwargs)

    real = wan_processors._shot_cross_attention
    config = _config(tmp_path, tmp_path / "out", training={"max_steps": 1, "gradient_checkpointing": False})
    with mock.patch.object(wan_processors, "_shot_cross_attention", spy):
        MoCLoRATrainer(config).train()
    # As LongVideoPipeline with one shot and a global prompt: the whole video is shot 0 of the caption spans.
    assert contexts and {(c.shot_frames, c.caption_spans, c.global_caption_span) for c in contexts} == {
        ((5,), ((16, 32),), (0, 16))
    }


# ---------------------------------------------------------------------- data
def test_corrupt_clip_is_skipped_with_a_warning(tmp_path, caplog):
    root = _make_dataset(tmp_path, n=2, corrupt=True)
    broken = os.path.join(root, "clips", "broken.mp4")
    with caplog.at_level(logging.WARNING, logger="diffusers_moc.training.data"):
        dataset = VideoClipDataset(root, NUM_FRAMES, 32, 32)
    assert len(dataset) == 2 and dataset.num_skipped == 1
    assert any(broken in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert all(broken != r.path for r in dataset.records)


def test_clip_failing_mid_run_is_reported_and_replaced(tmp_path, caplog):
    root = _make_dataset(tmp_path, n=2, corrupt=True)
    dataset = VideoClipDataset(root, NUM_FRAMES, 32, 32, validate=False)  # only missing files are caught up front
    assert len(dataset) == 3
    with caplog.at_level(logging.WARNING, logger="diffusers_moc.training.data"):
        sample = dataset[2]  # the broken clip
    assert sample["path"] == dataset.records[0].path and sample["video"].shape == (3, NUM_FRAMES, 32, 32)
    assert any("broken.mp4" in r.getMessage() for r in caplog.records)


def test_all_clips_bad_is_a_clear_error(tmp_path, caplog):
    (tmp_path / "a.mp4").write_bytes(b"junk")
    (tmp_path / "metadata.jsonl").write_text(
        json.dumps({"file": "a.mp4", "caption": "x"})
        + "\n"
        + json.dumps({"file": "missing.mp4", "caption": "y"})
        + "\n"
    )
    with pytest.raises(ValueError, match="no usable clips .* all 2 entries were skipped"):
        VideoClipDataset(str(tmp_path), NUM_FRAMES, 32, 32)
    with pytest.raises(FileNotFoundError, match="metadata"):
        VideoClipDataset(str(tmp_path / "nowhere"), NUM_FRAMES, 32, 32)
    (tmp_path / "metadata.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="no usable clips .*: it lists no clips"):
        VideoClipDataset(str(tmp_path), NUM_FRAMES, 32, 32)


def test_short_clip_and_bad_metadata_lines_are_skipped(tmp_path, caplog):
    _write_clip(str(tmp_path / "short.mp4"), seed=0, frames=9)
    _write_clip(str(tmp_path / "ok.mp4"), seed=1)
    lines = [
        {"file": "short.mp4", "caption": "a"},
        {"caption": "no file"},
        {"file": "ok.mp4", "shots": [{"caption": "a", "frames": [0, 9]}, {"caption": "b", "frames": [10, 17]}]},
        {"file": "ok.mp4", "shots": [{"caption": "a", "frames": [0, 9]}]},
        {"file": "ok.mp4", "shots": [{"caption": "a", "frames": [0, 9]}, {"frames": [9, 17]}]},
        {"file": "ok.mp4", "caption": "fine"},
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="diffusers_moc.training.data"):
        dataset = VideoClipDataset(str(tmp_path), NUM_FRAMES, 32, 32)
    assert [r.line for r in dataset.records] == [6]
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert "short.mp4" in messages and "needs 17" in messages
    assert "line 2" in messages and "'file'" in messages
    assert "line 3" in messages and "must start where shots[0] ends" in messages
    assert "line 4" in messages and "9 frames; a sample needs 17" in messages
    assert "line 5" in messages and "shots[1] has no caption and the clip has no global 'caption'" in messages


def test_bad_metadata_bytes_are_skipped_with_their_line_number(tmp_path, caplog):
    from diffusers_moc.training import data as data_module

    _write_clip(str(tmp_path / "ok.mp4"), seed=1)
    good = json.dumps({"file": "ok.mp4", "caption": "fine"}).encode()
    lines = [
        b"\xef\xbb\xbf" + good,  # a byte-order mark before the first line is not an error
        json.dumps({"file": "ok.mp4", "caption": "caf"}).encode().replace(b"caf", b"caf\xe9"),  # Latin-1
        b"{not json",
        b"[" * 100_000 + b"]" * 100_000,
        b'{"file": "ok.mp4", "caption": "' + b"x" * (data_module.MAX_METADATA_LINE + 10) + b'"}',
        b"[1, 2]",
        json.dumps({"file": "ok.mp4", "caption": "x", "shots": [{"frames": [False, 17]}]}).encode(),  # not 0
        good,
    ]
    (tmp_path / "metadata.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    with caplog.at_level(logging.WARNING, logger="diffusers_moc.training.data"):
        dataset = VideoClipDataset(str(tmp_path), NUM_FRAMES, 32, 32)
    assert [r.line for r in dataset.records] == [1, 8] and dataset.num_skipped == 6
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert "line 2: not UTF-8 text (byte 0xe9" in messages
    assert "line 3: not valid JSON" in messages
    assert "line 4: the JSON is nested too deeply" in messages
    assert f"line 5: the line is longer than {data_module.MAX_METADATA_LINE} bytes" in messages
    assert "line 6: each line must be a JSON object" in messages
    assert "line 7: shots[0].frames must be [start, end]" in messages
    assert len(messages) < 3000  # nothing echoed in full


def test_damaged_cache_file_is_re_encoded(data_root, tmp_path, caplog):
    cache = tmp_path / "cache"
    sections = {"data": {"cache": True, "cache_dir": str(cache)}, "training": {"max_steps": 1}}
    MoCLoRATrainer(_config(data_root, tmp_path / "a", **sections)).train()
    files = sorted(cache.iterdir())
    assert len(files) == 2 and not [f for f in files if not f.name.endswith(".safetensors")]
    files[0].write_bytes(files[0].read_bytes()[:50])  # a truncated file, as an older version could leave
    _reset_accelerate()
    with caplog.at_level(logging.WARNING, logger="diffusers_moc.training.data"):
        MoCLoRATrainer(_config(data_root, tmp_path / "b", **sections)).train()
    assert any("re-encoding" in r.getMessage() and str(files[0]) in r.getMessage() for r in caplog.records)
    assert sorted(cache.iterdir()) == files and files[0].stat().st_size > 50


def test_multi_shot_metadata_gives_latent_shot_frames(data_root):
    dataset = VideoClipDataset(data_root, NUM_FRAMES, 32, 32, validate=False)
    by_file = {os.path.basename(r.path): r for r in dataset.records}
    assert by_file["0.mp4"].shot_frames is None and by_file["0.mp4"].prompt == "a red car drives in the city"
    # Shots of 9 + 8 pixel frames -> 3 + 2 latent frames (4n + 1 -> n + 1).
    assert by_file["1.mp4"].shot_frames == (3, 2)
    assert by_file["1.mp4"].prompt == "a dog runs on the beach sits"
    assert by_file["1.mp4"].global_caption == "a dog"
    assert by_file["1.mp4"].shot_captions == ("runs on the beach", "sits")
    assert by_file["0.mp4"].global_caption == "a red car drives in the city"
    assert by_file["0.mp4"].shot_captions == (None,)
    sample = dataset[0]
    assert (
        sample["video"].shape == (3, NUM_FRAMES, 32, 32) and -1 <= sample["video"].min() <= sample["video"].max() <= 1
    )


def test_latent_shot_frames():
    assert latent_shot_frames([0], 17) == (5,)
    assert latent_shot_frames([0, 9], 17) == (3, 2)  # aligned start 4m + 1
    assert latent_shot_frames([0, 5, 9, 13], 17) == (2, 1, 1, 1)
    assert latent_shot_frames([0, 8], 17) == (3, 2)  # latent frame 2 (pixels 5-8) is mostly shot 0
    assert latent_shot_frames([0, 6], 17) == (2, 3)  # latent frame 2 (pixels 5-8) is mostly shot 1
    with pytest.raises(ValueError, match="without a latent frame"):
        latent_shot_frames([0, 3, 4], 17)  # the 1-frame shot at pixel 3 falls inside latent frame 1 (pixels 1-4)
    with pytest.raises(ValueError, match="4n \\+ 1"):
        latent_shot_frames([0], 16)


def test_step_batch_sampler_resumes_and_shards():
    full = StepBatchSampler(5, 2, seed=3)
    it = iter(full)
    batches = [next(it) for _ in range(7)]
    resumed = iter(StepBatchSampler(5, 2, seed=3, start=4))
    assert [next(resumed) for _ in range(3)] == batches[4:]
    for epoch in range(3):  # every epoch is a permutation; the odd item out is dropped
        items = batches[2 * epoch] + batches[2 * epoch + 1]
        assert len(set(items)) == 4
    ranks = [StepBatchSampler(6, 1, seed=0, rank=r, world_size=3).batch(0) for r in range(3)]
    assert sorted(sum(ranks, [])) == sorted(set(sum(ranks, [])))
    with pytest.raises(ValueError, match="fewer than one global batch"):
        StepBatchSampler(3, 2, seed=0, world_size=2)


# ---------------------------------------------------------------------- schedule and density
def test_sparsity_schedule():
    s = SparsitySchedule(start_top_k=9, target_top_k=3, warmup_steps=2, anneal_steps=6, dense_top_k=9)
    assert [s.top_k(i) for i in range(10)] == [9, 9, 9, 8, 7, 6, 5, 4, 3, 3]
    assert s.is_dense(2) and not s.is_dense(3)
    base = MoCConfig(top_k=3, causal=True)
    assert s.moc_config(base, 0) == base.replace(top_k=9, causal=False, drop_off=0.0, drop_in=0.0)  # exactly dense
    assert s.moc_config(base, 5) == base.replace(top_k=6)
    cos = SparsitySchedule(start_top_k=9, target_top_k=3, anneal_steps=6, shape="cosine")
    assert cos.top_k(0) == 9 and cos.top_k(6) == 3 and cos.top_k(1) > s.top_k(3)
    assert SparsitySchedule(5, 2).top_k(0) == 2  # no anneal: target from the start
    with pytest.raises(ValueError, match="start_top_k"):
        SparsitySchedule(start_top_k=1, target_top_k=3)


@pytest.mark.parametrize(
    "shots, config",
    [
        (None, MoCConfig(top_k=2, local_window=1)),
        (None, MoCConfig(top_k=1, local_window=0, causal=False)),
        ((3, 3), MoCConfig(top_k=1, local_window=1, anchor_own_shot=True)),
        ((2, 4), MoCConfig(top_k=3, local_window=0)),
        (None, MoCConfig(top_k=6, causal=False)),
    ],
)
def test_routed_density_matches_routing(shots, config):
    from diffusers_moc import route

    layout = ChunkLayout.for_video(6, 5, shots)
    q, k = torch.randn(2, 2, layout.num_tokens, 2, 8).unbind(0)
    assert routed_density(layout, config) == pytest.approx(route(q, k, layout, config).density(), abs=1e-12)
    assert routed_density(layout, MoCConfig(top_k=6, causal=False)) == 1.0


def test_gradient_checkpointing_replays_the_routing_of_multi_shot_training():
    # The trainer relies on this: drop-off / drop-in from the global RNG and backward inside moc_context give the
    # recomputed forward of a checkpointed block the very routing of the original forward.
    from diffusers_moc import apply_moc, moc_context
    from diffusers_moc.tiny import tiny_wan_components

    grads = []
    for checkpointing in (False, True):
        transformer = tiny_wan_components()["transformer"]
        apply_moc(transformer, MoCConfig(top_k=1, local_window=0, drop_off=0.9, drop_in=1.0, backend="torch"))
        transformer.train()
        if checkpointing:
            transformer.enable_gradient_checkpointing()
        torch.manual_seed(0)
        x = torch.randn(1, 16, 5, 4, 4)
        with moc_context(shot_frames=[3, 2]):
            out = transformer(x, torch.tensor([500.0]), torch.randn(1, 16, 32), return_dict=False)[0]
            out.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in transformer.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6, msg=name)


def test_gradient_checkpointing_recomputes_each_forward_with_its_own_shots():
    # Two forwards under different moc_context shots, then one backward: a recomputed block must route with the
    # shots of the forward it belongs to, not the latest. The wrapper that ensures it goes on at a forward (so the
    # order of enable_gradient_checkpointing and apply_moc does not matter) and comes off with remove_moc.
    from diffusers_moc import apply_moc, moc_context, remove_moc
    from diffusers_moc.core.attention_processors.base import CheckpointWithFacts
    from diffusers_moc.tiny import tiny_wan_components

    def grads(checkpointing: bool):
        torch.manual_seed(0)
        transformer = tiny_wan_components()["transformer"]
        if checkpointing:
            transformer.enable_gradient_checkpointing()
        apply_moc(transformer, MoCConfig(top_k=1, local_window=1, drop_off=0, drop_in=0, backend="torch"))
        transformer.train()
        x, text = torch.randn(1, 16, 4, 4, 4), torch.randn(1, 16, 32)
        with moc_context(shot_frames=[1, 3]):
            a = transformer(x, torch.tensor([500.0]), text, return_dict=False)[0]
        with moc_context(shot_frames=[2, 2]):
            b = transformer(x, torch.tensor([500.0]), text, return_dict=False)[0]
        assert (a - b).abs().max() > 1e-2  # the shots change the routing (the local window stays in a shot)
        (a.square().mean() + 2 * b.square().mean()).backward()
        return transformer, {n: p.grad.clone() for n, p in transformer.named_parameters() if p.grad is not None}

    _, want = grads(False)
    transformer, got = grads(True)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
    assert isinstance(transformer._gradient_checkpointing_func, CheckpointWithFacts)
    remove_moc(transformer)
    assert not isinstance(transformer._gradient_checkpointing_func, CheckpointWithFacts)


# ---------------------------------------------------------------------- config
def test_config_errors_name_the_field(tmp_path):
    ok = {"data": {"root": str(tmp_path)}}
    TrainConfig.from_dict(ok)
    cases = [
        ({"trainig": {}}, "trainig: unknown field"),
        ({"training": {"learning_rat": 1}}, "training.learning_rat: unknown field"),
        ({"training": {"learning_rate": -1}}, "training.learning_rate: must be > 0"),
        ({"training": {"max_steps": "ten"}}, "training.max_steps: must be an integer"),
        ({"training": {"mixed_precision": "fp8"}}, "training.mixed_precision: must be one of 'no', 'bf16'"),
        ({"training": {"gradient_checkpointing": "yes"}}, "training.gradient_checkpointing: must be true or false"),
        ({"data": {"num_frames": 16}}, "data.num_frames: must be 4n \\+ 1"),
        ({"data": {"root": ""}}, "data.root: is required"),
        ({"lora": {"rank": 0}}, "lora.rank: must be > 0"),
        ({"training": {"caption_dropout": 1.5}}, "training.caption_dropout: must be in \\[0, 1\\]"),
        ({"lora": {"target_modules": "to_q"}}, None),  # a single string is a one-item list
        ({"moc": {"top_k": -1}}, "moc: MoCConfig.top_k must be an integer >= 0"),
        ({"moc": {"topk": 1}}, "moc: unknown MoCConfig keys \\['topk'\\]"),
        ({"sparsity": {"start_top_k": "sparse"}}, "sparsity.start_top_k: must be 'dense' or an integer"),
        ({"sparsity": {"start_top_k": 1}, "moc": {"top_k": 3}}, "sparsity.start_top_k: must be >= moc.top_k"),
        ({"validation": {"every": 10}}, "validation.prompts: must list at least one prompt"),
        ({"logging": {"report_to": ["mlflow"]}}, "logging.report_to\\[0\\]: must be one of"),
        ({"hub": {"push": True}}, "hub.repo_id: is required"),
        ({"model": "tiny"}, "model: must be a mapping"),
    ]
    for changes, message in cases:
        data = {**ok, **changes, "data": {**ok["data"], **changes.get("data", {})}}
        if message is None:
            TrainConfig.from_dict(data)
            continue
        with pytest.raises(ConfigError, match=message):
            TrainConfig.from_dict(data)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"training": {"learning_rate": float("nan")}}, "training.learning_rate: must be a finite number, got nan"),
        ({"training": {"learning_rate": "inf"}}, "training.learning_rate: must be a finite number"),
        ({"training": {"max_grad_norm": 10**400}}, "training.max_grad_norm: must be a finite number"),
        ({"seed": 2**32}, r"seed: must be an integer in \[0, 2\*\*32\)"),
        ({"validation": {"seed": -1}}, "validation.seed: must be an integer in"),
        ({"validation": {"fps": 5000}}, "validation.fps: must be at most 1000"),
        ({"training": {"compile_fullgraph": True}}, "training.compile_fullgraph: needs training.compile: true"),
        ({"training": {"context_parallel": 0}}, "training.context_parallel: must be > 0, got 0"),
        (
            {"training": {"context_parallel": 2}, "validation": {"every": 1, "prompts": ["a"]}},
            "validation.every: must be 0 with training.context_parallel > 1",
        ),
        ({"training": {"compile": "yes"}}, "training.compile: must be true or false"),
        (
            {"data": {"metadata": ["a"] * 10_000}},
            r"data.metadata: must be a string, got \['a', 'a', 'a', 'a', \.\.\.\]$",
        ),
    ],
)
def test_config_numbers_must_be_finite_and_in_range(tmp_path, changes, message):
    data = {"data": {"root": str(tmp_path)}}
    for key, value in changes.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_dict(data)


def test_yaml_config_overrides_and_example(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(f"data:\n  root: {tmp_path}\ntraining:\n  learning_rate: 1e-4\n  mixed_precision: no\n")
    config = load_train_config(path, ["training.max_steps=7", "moc.top_k=2"])
    assert config.training.learning_rate == 1e-4 and config.training.max_steps == 7 and config.moc.top_k == 2
    assert config.training.mixed_precision == "no"  # YAML reads a bare `no` as false
    with pytest.raises(ConfigError, match="--set"):
        load_train_config(path, ["training.max_steps"])
    example = os.path.join(os.path.dirname(__file__), "..", "examples", "train_lora.yaml")
    config = load_train_config(example)
    assert config.model.pretrained.startswith("Wan-AI/") and config.lora.rank > 0


def test_overrides_fill_empty_sections_and_resume_stays_a_path(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(f"data:\n  root: {tmp_path}\nvalidation:\ncheckpointing:\n")
    config = load_train_config(path, ["validation.every=10", "validation.prompts=[a cat]"])
    assert config.validation.every == 10 and config.validation.prompts == ["a cat"]
    # --resume values are folder names, not YAML: `2024` and `yes` must stay strings.
    for value in ("2024", "yes", "null"):
        assert load_train_config(path, resume_from=value).checkpointing.resume_from == value
    assert load_train_config(path, ["checkpointing.resume_from=a"], resume_from="b").checkpointing.resume_from == "b"


def test_cli_resume_is_passed_as_a_string(tmp_path):
    from diffusers_moc.cli import main

    path = tmp_path / "c.yaml"
    path.write_text(f"data:\n  root: {tmp_path}\n")
    with mock.patch("diffusers_moc.training.MoCLoRATrainer") as trainer_cls:
        trainer_cls.return_value.train.return_value.final_dir = None
        assert main(["train", str(path), "--resume", "2024"]) == 0
    assert trainer_cls.call_args.args[0].checkpointing.resume_from == "2024"


def test_cli_train(data_root, tmp_path):
    from diffusers_moc.cli import main

    path = tmp_path / "c.yaml"
    path.write_text(
        "\n".join(
            [
                f"output_dir: {tmp_path / 'out'}",
                "model: {pretrained: tiny}",
                "moc: {top_k: 1, local_window: 0, backend: torch}",
                "sparsity: {anneal_steps: 0}",
                f"data: {{root: {data_root}, num_frames: {NUM_FRAMES}, height: 32, width: 32}}",
                "training: {max_steps: 1, mixed_precision: 'no'}",
                "logging: {report_to: none}",
            ]
        )
    )
    args = ["train", str(path), "--set", "training.max_steps=2", "--set", "data.max_sequence_length=16"]
    args += ["--set", "hub={push: true, repo_id: me/tiny-moc}"]
    with mock.patch("huggingface_hub.HfApi") as api_cls:
        assert main(args) == 0
    final = tmp_path / "out" / "final"
    assert MoCConfig.from_pretrained(final).top_k == 1
    # hub.push uploads the exported folder at the end of training.
    upload = api_cls.return_value.upload_folder.call_args.kwargs
    assert upload["repo_id"] == "me/tiny-moc" and upload["folder_path"] == str(final)
    assert 'load_moc_lora(pipe, "me/tiny-moc")' in (final / "README.md").read_text()


def test_save_moc_lora_needs_an_adapter(tmp_path):
    from diffusers_moc.hub import save_moc_lora
    from diffusers_moc.tiny import tiny_wan_components

    with pytest.raises(ValueError, match="no LoRA adapter named 'default'"):
        save_moc_lora(tiny_wan_components()["transformer"], tmp_path, MoCConfig())


def test_expert_timestep_ranges_and_step_draws():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffusers_moc.training.experts import Expert, expert_for_step, timestep_ranges

    timesteps = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0).timesteps
    ranges = timestep_ranges(timesteps, 0.875)
    (lo, hi), (lo2, hi2) = ranges["transformer"], ranges["transformer_2"]
    assert lo == 0 and hi == lo2 and hi2 == 1000
    assert timesteps[hi - 1] >= 875 > timesteps[hi]
    assert timestep_ranges(timesteps, None) == {"transformer": (0, 1000)}
    experts = [Expert("transformer", None, share=0.3), Expert("transformer_2", None, share=0.7)]
    draws = [expert_for_step(experts, 0, step).name for step in range(2000)]
    assert draws == [expert_for_step(experts, 0, step).name for step in range(2000)]  # a function of the step
    assert abs(draws.count("transformer") / 2000 - 0.3) < 0.05


def test_load_moc_lora_follows_diffusers_wan22_conventions(trained, tmp_path):
    """A default-named adapter goes into `transformer_2` with `load_into_transformer_2=True`, as diffusers'
    `load_lora_weights` does, and MoC goes on both experts, as training ran them; an adapter for `transformer_2` is
    refused by a pipeline without one, and `load_into_transformer_2` by a folder with both experts', before loading."""
    from diffusers import WanPipeline
    from peft import LoraConfig

    from diffusers_moc.hub import save_moc_lora
    from diffusers_moc.tiny import tiny_wan_components

    config, _, result = trained
    a14b = WanPipeline(**tiny_wan_components(model="wan2.2-t2v-a14b"))
    load_moc_lora(a14b, result.final_dir, load_into_transformer_2=True)
    assert get_moc_config(a14b) == {"transformer": config.moc, "transformer_2": config.moc}
    assert getattr(a14b.transformer, "peft_config", None) is None and a14b.transformer_2.peft_config
    experts = tiny_wan_components(model="wan2.2-t2v-a14b")
    experts["transformer_2"].add_adapter(LoraConfig(r=2, target_modules=["to_q"]))
    save_moc_lora(None, tmp_path / "low", config.moc, transformer_2=experts["transformer_2"])
    assert sorted(os.listdir(tmp_path / "low")) == ["README.md", "moc_config.json", LORA_WEIGHT_NAME_2]
    wan21 = WanPipeline(**tiny_wan_components())
    with pytest.raises(ValueError, match="adapter for transformer_2 .*which this WanPipeline does not have"):
        load_moc_lora(wan21, tmp_path / "low")
    assert get_moc_config(wan21) == {} and getattr(wan21.transformer, "peft_config", None) is None
    experts["transformer"].add_adapter(LoraConfig(r=2, target_modules=["to_q"]))
    save_moc_lora(experts["transformer"], tmp_path / "both", config.moc, transformer_2=experts["transformer_2"])
    fresh = WanPipeline(**tiny_wan_components(model="wan2.2-t2v-a14b"))
    with pytest.raises(ValueError, match="holds adapters for both experts .*would load both into transformer_2"):
        load_moc_lora(fresh, tmp_path / "both", load_into_transformer_2=True)
    assert get_moc_config(fresh) == {} and getattr(fresh.transformer_2, "peft_config", None) is None
    load_moc_lora(fresh, tmp_path / "both")
    assert fresh.transformer.peft_config and fresh.transformer_2.peft_config and len(get_moc_config(fresh)) == 2
