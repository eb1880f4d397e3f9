"""`diffusers-moc train` on HunyuanVideo 1.5 text-to-video: a folder saved by `save_pretrained` from the tiny
components, conditioned as `HunyuanVideo15LongVideoPipeline`, exact resume, the adapter loaded back, bad input."""

from __future__ import annotations

import json
import os
from unittest import mock

import pytest
import torch
from _train_helpers import _config, _lora_state, _reset_accelerate
from diffusers import HunyuanVideo15Pipeline, HunyuanVideo15Transformer3DModel

from diffusers_moc import current_moc_context, get_moc_config
from diffusers_moc.hub import LORA_WEIGHT_NAME, load_moc_lora
from diffusers_moc.pipelines import LongVideoPipeline, Shot
from diffusers_moc.pipelines.hunyuan_video15 import HunyuanVideo15LongVideoPipeline
from diffusers_moc.tiny_hunyuan_video15 import tiny_hunyuan_video15_components
from diffusers_moc.training import ConfigError, MoCLoRATrainer

pytest.importorskip("imageio.v3")

T2V = "hunyuanvideo1.5-t2v"
TINY = {"pretrained": "tiny", "tiny_model": T2V}
#: Exercises everything exact resume depends on: LoRA dropout, accumulation, a warm-up LR, caption dropout, MoC
#: drop-off / drop-in (in `_config`), a checkpoint halfway.
RUN = {
    "lora": {"rank": 4, "alpha": 8, "dropout": 0.1},
    "training": {
        "max_steps": 4,
        "batch_size": 2,
        "gradient_accumulation_steps": 2,
        "lr_scheduler": "cosine",
        "lr_warmup_steps": 1,
        "caption_dropout": 0.3,
    },
    "checkpointing": {"every": 2},
}


pytestmark = pytest.mark.usefixtures("_one_thread", "_fresh_accelerate_state")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The tiny components as a diffusers folder (stock pipeline layout), loaded by `from_pretrained`."""
    path = tmp_path_factory.mktemp("hv15") / "model"
    HunyuanVideo15Pipeline(**tiny_hunyuan_video15_components()).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def trained(data_root, folder, tmp_path_factory, _one_thread):
    _reset_accelerate()
    out = tmp_path_factory.mktemp("trained")
    validation = {"every": 4, "prompts": ["a red car"], "num_frames": 5, "height": 32, "width": 32}
    validation |= {"num_inference_steps": 1, "fps": 8}
    config = _config(data_root, out, model={"pretrained": folder}, validation=validation, **RUN)
    trainer = MoCLoRATrainer(config)
    result = trainer.train()
    _reset_accelerate()
    return config, trainer, result


def test_training_a_saved_folder_follows_the_schedule_and_exports(trained):
    config, trainer, result = trained
    assert isinstance(trainer.pipeline, HunyuanVideo15Pipeline) and result.global_step == 4
    assert all(torch.isfinite(torch.tensor(result.losses)))
    # 5 latent frames = 5 chunks: dense for the warm-up step and the anneal's first, then top_k 3, then 1 (own chunk
    # + 1 routed earlier chunk, causal).
    assert result.densities == [1.0, 1.0, pytest.approx(0.56), pytest.approx(9 / 25)]
    assert get_moc_config(trainer.pipeline.transformer) == config.moc
    assert sorted(os.listdir(result.final_dir)) == ["README.md", "moc_config.json", LORA_WEIGHT_NAME]
    assert "HunyuanVideo15Pipeline.from_pretrained" in open(os.path.join(result.final_dir, "README.md")).read()
    assert [os.path.basename(p) for p in result.validation_videos] == ["step-000004-0.mp4"]


def test_resume_is_exact(trained, data_root, folder, tmp_path):
    config, straight, full = trained
    checkpoint = os.path.join(config.output_dir, "checkpoint-2")
    sections = {**RUN, "checkpointing": {"resume_from": checkpoint}}
    resumed = MoCLoRATrainer(_config(data_root, tmp_path, model={"pretrained": folder}, **sections))
    rest = resumed.train()
    assert rest.global_step == 4 and rest.losses == full.losses[2:]
    assert rest.learning_rates == full.learning_rates[2:] and rest.densities == full.densities[2:]
    a, b = _lora_state(straight), _lora_state(resumed)
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _transformer_out(pipe) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = {
        "hidden_states": torch.randn(1, 9, 3, 2, 2, generator=g),
        "timestep": torch.tensor([700.0]),
        "encoder_hidden_states": torch.randn(1, 6, 16, generator=g),
        "encoder_attention_mask": torch.ones(1, 6),
        "encoder_hidden_states_2": torch.randn(1, 2, 8, generator=g),
        "encoder_attention_mask_2": torch.ones(1, 2),
        "image_embeds": torch.zeros(1, 729, 8),
        "return_dict": False,
    }
    with torch.no_grad():
        return pipe.transformer(**x)[0]


@pytest.mark.parametrize("cls", [HunyuanVideo15Pipeline, LongVideoPipeline], ids=["stock", "long-video"])
def test_the_adapter_loads_back_with_the_trained_outputs(trained, folder, cls):
    config, trainer, result = trained
    expected = _transformer_out(trainer.pipeline)
    pipe = cls.from_pretrained(folder)
    assert isinstance(pipe, (HunyuanVideo15Pipeline, HunyuanVideo15LongVideoPipeline))
    base = _transformer_out(pipe)
    load_moc_lora(pipe, result.final_dir)  # one call: adapter + MoC routing
    assert get_moc_config(pipe.transformer) == config.moc
    assert not torch.equal(base, expected)  # the adapter changes the model, so the check below means something
    torch.testing.assert_close(_transformer_out(pipe), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("cache, caption_dropout", [(False, 0.0), (True, 0.0), (False, 1.0)])
def test_clips_are_conditioned_as_the_long_video_pipeline_conditions_their_shots(
    data_root, tmp_path, cache, caption_dropout
):
    def record(into):
        def look(module, args, kwargs):
            tensors = {k: v.detach().clone() for k, v in kwargs.items() if torch.is_tensor(v)}
            into.append((current_moc_context(), tensors))

        return look

    seen = []
    config = _config(
        data_root,
        tmp_path,
        model=TINY,
        data={"cache": cache},
        training={"max_steps": 1, "batch_size": 2, "gradient_checkpointing": False, "caption_dropout": caption_dropout},
        sparsity={"anneal_steps": 0},
    )
    forward = HunyuanVideo15Transformer3DModel.forward

    def spy(self, *args, **kwargs):
        record(seen)(self, args, kwargs)
        return forward(self, *args, **kwargs)

    with mock.patch.object(HunyuanVideo15Transformer3DModel, "forward", spy):
        MoCLoRATrainer(config).train()
    by_shots = {ctx.shot_frames: (ctx, inputs) for ctx, inputs in seen}
    assert len(seen) == 2 and set(by_shots) == {None, (3, 2)}  # one forward per shot / caption structure

    # The same shots through the pipeline: its conditional (or, for dropped captions, unconditional) pass.
    pipe = HunyuanVideo15LongVideoPipeline(**tiny_hunyuan_video15_components())
    pipe.set_progress_bar_config(disable=True)
    expected = {}
    for shots, global_prompt in (
        ([Shot("a red car drives in the city", num_frames=17)], None),
        ([Shot("runs on the beach", num_frames=9), Shot("sits", num_frames=5)], "a dog"),
    ):
        calls = []
        handle = pipe.transformer.register_forward_pre_hook(record(calls), with_kwargs=True)
        try:
            pipe(shots, global_prompt=global_prompt, height=32, width=32, num_inference_steps=1, max_sequence_length=16)
        finally:
            handle.remove()
        cond, uncond = calls
        expected[cond[0].shot_frames] = uncond if caption_dropout else cond
    for shots, (ctx, inputs) in by_shots.items():
        want_ctx, want = expected[shots]
        assert (ctx.shot_frames, ctx.caption_shots, ctx.caption_tokens) == (
            want_ctx.shot_frames,
            want_ctx.caption_shots,
            want_ctx.caption_tokens,
        )
        text = [k for k in want if k.startswith("encoder_")] + ["image_embeds"]
        assert len(text) == 5
        for k in text:
            torch.testing.assert_close(inputs[k], want[k], rtol=0, atol=0, msg=k)
        # The condition latents and mask concatenated to the latents: zeros, as the pipeline's text-to-video.
        assert inputs["hidden_states"].shape[1] == want["hidden_states"].shape[1] == 9
        assert not inputs["hidden_states"][:, 4:].any() and not want["hidden_states"][:, 4:].any()
    if not caption_dropout:
        assert by_shots[(3, 2)][0].caption_shots == (-1, 0, 1)


def _hunyuan_folder(path, class_name: str) -> str:
    path.mkdir()
    (path / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    return str(path)


@pytest.mark.parametrize(
    "model, training, message",
    [
        ({"class": "HunyuanVideo15ImageToVideoPipeline"}, {}, "model.pretrained: is a HunyuanVideo 1.5 I2V model"),
        ({"expert": "both"}, {}, "model.expert: is for Wan 2.2 A14B's two experts; HunyuanVideo 1.5 T2V"),
        ({}, {"first_frame_condition": 0.5}, "training.first_frame_condition: is for Wan 2.2 TI2V-5B"),
        ({}, {"context_parallel": 2}, "training.context_parallel: must be 1 on HunyuanVideo 1.5 T2V"),
        ({}, {"fsdp": True}, "training.fsdp: must be false on HunyuanVideo 1.5 T2V"),
    ],
)
def test_bad_input_is_refused_before_any_model_loads(tmp_path, model, training, message):
    pretrained = _hunyuan_folder(tmp_path / "model", model.pop("class", "HunyuanVideo15Pipeline"))
    config = _config("/data", tmp_path / "out", model={"pretrained": pretrained, **model}, training=training)
    with (
        mock.patch.object(MoCLoRATrainer, "_load_components", side_effect=AssertionError("a model loaded")),
        pytest.raises(ConfigError, match=message),
    ):
        MoCLoRATrainer(config).train()
    assert not os.path.exists(tmp_path / "out")
    with pytest.raises(ConfigError, match="model.expert: is for Wan 2.2 A14B's two experts; model.tiny_model="):
        _config("/data", "/out", model={**TINY, "expert": "high_noise"})


def test_the_command_line_trains_a_hunyuan_video15_folder(data_root, folder, tmp_path):
    from diffusers_moc.cli import main
    from diffusers_moc.core.config import MoCConfig

    path = tmp_path / "c.yaml"
    lines = [
        f"output_dir: {tmp_path / 'out'}",
        f"model: {{pretrained: {folder}}}",
        "moc: {top_k: 2, local_window: 0, backend: torch}",
        "sparsity: {anneal_steps: 0}",
        f"data: {{root: {data_root}, num_frames: 17, height: 32, width: 32, max_sequence_length: 16}}",
        "training: {max_steps: 1, mixed_precision: 'no'}",
        "logging: {report_to: none}",
    ]
    path.write_text("\n".join(lines))
    assert main(["train", str(path)]) == 0
    assert MoCConfig.from_pretrained(tmp_path / "out" / "final").top_k == 2
