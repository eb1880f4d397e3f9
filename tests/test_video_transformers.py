"""MoC processors inside tiny HunyuanVideo, CogVideoX and LTX-Video transformers built from config."""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    CogVideoXTransformer3DModel,
    HunyuanVideo15Transformer3DModel,
    HunyuanVideoTransformer3DModel,
    LTXVideoTransformer3DModel,
    MochiTransformer3DModel,
)
from diffusers.models.attention_processor import AttnProcessor2_0, CogVideoXAttnProcessor2_0
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoAttnProcessor2_0
from diffusers.models.transformers.transformer_hunyuan_video15 import HunyuanVideo15AttnProcessor2_0
from diffusers.models.transformers.transformer_ltx import LTXVideoAttnProcessor

from diffusers_moc import MoCConfig, apply_moc, get_moc_config, remove_moc, update_moc_config
from diffusers_moc.core.apply import supported_models
from diffusers_moc.core.attention_processors import (
    MoCAttnProcessorBase,
    MoCCogVideoXAttnProcessor,
    MoCHunyuanVideo15AttnProcessor,
    MoCHunyuanVideoAttnProcessor,
    MoCLTXVideoAttnProcessor,
    MoCMochiAttnProcessor,
    frames_from_rotary,
)

FRAMES, HEIGHT, WIDTH, TEXT = 3, 4, 4, 6
DENSE = MoCConfig(top_k=100, causal=False, backend="reference")
SPARSE = MoCConfig(top_k=1, local_window=0, backend="torch")


def _hunyuan(pad: bool = True):
    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=12,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        patch_size=1,
        patch_size_t=1,
        text_embed_dim=16,
        pooled_projection_dim=8,
        rope_axes_dim=(4, 4, 4),
    ).eval()
    g = torch.Generator().manual_seed(1)
    # Sample 0 has two padded caption tokens, sample 1 none: per-sample valid lengths differ.
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1] * TEXT]) if pad else torch.ones(2, TEXT, dtype=torch.long)
    inputs = {
        "hidden_states": torch.randn(2, 4, FRAMES, HEIGHT, WIDTH, generator=g),
        "timestep": torch.tensor([500, 500]),
        "encoder_hidden_states": torch.randn(2, TEXT, 16, generator=g),
        "encoder_attention_mask": mask,
        "pooled_projections": torch.randn(2, 8, generator=g),
        "guidance": torch.tensor([3.0, 3.0]),
    }
    return model, inputs


def _hunyuan15():
    torch.manual_seed(0)
    model = HunyuanVideo15Transformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=12,
        num_layers=1,
        num_refiner_layers=1,
        text_embed_dim=16,
        text_embed_2_dim=8,
        image_embed_dim=8,
        rope_axes_dim=(4, 4, 4),
        target_size=32,
        task_type="t2v",
    ).eval()
    g = torch.Generator().manual_seed(1)
    inputs = {
        "hidden_states": torch.randn(2, 4, FRAMES, HEIGHT, WIDTH, generator=g),
        "timestep": torch.tensor([500.0, 500.0]),
        "encoder_hidden_states": torch.randn(2, TEXT, 16, generator=g),
        "encoder_attention_mask": torch.tensor([[1, 1, 1, 1, 0, 0], [1] * TEXT]),
        "encoder_hidden_states_2": torch.randn(2, 3, 8, generator=g),
        "encoder_attention_mask_2": torch.tensor([[1, 1, 0], [1, 0, 0]]),
        # Text-to-video: the image tokens are all padding.
        "image_embeds": torch.zeros(2, 2, 8),
    }
    return model, inputs


def _cogvideox(rope: bool = True):
    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        time_embed_dim=8,
        text_embed_dim=16,
        num_layers=1,
        sample_width=2 * WIDTH,
        sample_height=2 * HEIGHT,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=TEXT,
        use_rotary_positional_embeddings=rope,
    ).eval()
    g = torch.Generator().manual_seed(1)
    inputs = {
        "hidden_states": torch.randn(2, FRAMES, 4, 2 * HEIGHT, 2 * WIDTH, generator=g),
        "encoder_hidden_states": torch.randn(2, TEXT, 16, generator=g),
        "timestep": torch.tensor([10, 10]),
    }
    if rope:
        inputs["image_rotary_emb"] = get_3d_rotary_pos_embed(
            embed_dim=16, crops_coords=((0, 0), (HEIGHT, WIDTH)), grid_size=(HEIGHT, WIDTH), temporal_size=FRAMES
        )
    return model, inputs


def _ltx():
    torch.manual_seed(0)
    model = LTXVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=16,
        num_layers=1,
        caption_channels=16,
    ).eval()
    g = torch.Generator().manual_seed(1)
    inputs = {
        "hidden_states": torch.randn(2, FRAMES * HEIGHT * WIDTH, 4, generator=g),
        "encoder_hidden_states": torch.randn(2, TEXT, 16, generator=g),
        "timestep": torch.tensor([10, 10]),
        "encoder_attention_mask": torch.tensor([[1, 1, 1, 1, 0, 0], [1] * TEXT]),
        "num_frames": FRAMES,
        "height": HEIGHT,
        "width": WIDTH,
        # As LTXPipeline passes it: time coordinates are scaled, not integer frame indices.
        "rope_interpolation_scale": (8 / 25, 32, 32),
    }
    return model, inputs


def _mochi():
    torch.manual_seed(0)
    # Two blocks: the last one is `context_pre_only` (no caption output projection), the first is not.
    model = MochiTransformer3DModel(
        patch_size=2,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        pooled_projection_dim=16,
        in_channels=4,
        out_channels=4,
        text_embed_dim=16,
        time_embed_dim=4,
        max_sequence_length=TEXT,
    ).eval()
    g = torch.Generator().manual_seed(1)
    inputs = {
        "hidden_states": torch.randn(2, 4, FRAMES, 2 * HEIGHT, 2 * WIDTH, generator=g),
        "encoder_hidden_states": torch.randn(2, TEXT, 16, generator=g),
        "timestep": torch.tensor([10, 10]),
        "encoder_attention_mask": torch.tensor([[1, 1, 1, 1, 0, 0], [1] * TEXT]),
    }
    return model, inputs


BUILDERS = {
    "hunyuan_video": _hunyuan,
    "hunyuan_video15": _hunyuan15,
    "cogvideox": _cogvideox,
    "cogvideox_no_rope": lambda: _cogvideox(rope=False),
    "ltx": _ltx,
    "mochi": _mochi,
}
MOC_CLASS = {
    "hunyuan_video": MoCHunyuanVideoAttnProcessor,
    "hunyuan_video15": MoCHunyuanVideo15AttnProcessor,
    "cogvideox": MoCCogVideoXAttnProcessor,
    "cogvideox_no_rope": MoCCogVideoXAttnProcessor,
    "ltx": MoCLTXVideoAttnProcessor,
    "mochi": MoCMochiAttnProcessor,
}


def _run(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).sample


@pytest.mark.parametrize("name", list(BUILDERS))
def test_full_density_equals_stock(name):
    model, inputs = BUILDERS[name]()
    stock = _run(model, inputs)
    apply_moc(model, DENSE)
    torch.testing.assert_close(_run(model, inputs), stock, atol=1e-5, rtol=1e-5)
    update_moc_config(model, backend="torch")
    torch.testing.assert_close(_run(model, inputs), stock, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_sparse_backends_agree_inside_the_model(name):
    model, inputs = BUILDERS[name]()
    stock = _run(model, inputs)
    apply_moc(model, SPARSE)
    sparse = _run(model, inputs)
    # One routed frame of three: the output must differ from dense, or this test could not catch a dense fallback.
    assert not torch.allclose(sparse, stock, atol=1e-3)
    update_moc_config(model, backend="reference")
    torch.testing.assert_close(_run(model, inputs), sparse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_apply_sets_the_right_modules_and_remove_restores_stock(name):
    model, inputs = BUILDERS[name]()
    stock = _run(model, inputs)
    before = {n: type(m.processor) for n, m in model.named_modules() if hasattr(m, "processor")}
    apply_moc(model, SPARSE)
    moc = {n for n, m in model.named_modules() if isinstance(getattr(m, "processor", None), MoCAttnProcessorBase)}
    assert moc and all(isinstance(model.get_submodule(n).processor, MOC_CLASS[name]) for n in moc)
    if name == "hunyuan_video":
        # Joint attention of dual- and single-stream blocks; the caption refiner keeps its dense processor.
        assert moc == {"transformer_blocks.0.attn", "single_transformer_blocks.0.attn"}
    elif name == "hunyuan_video15":
        assert moc == {"transformer_blocks.0.attn"}
    elif name == "mochi":
        assert moc == {"transformer_blocks.0.attn1", "transformer_blocks.1.attn1"}
    elif name == "ltx":
        # Self-attention routed; the cross-attention runs densely in the same processor (context-parallel safe).
        assert moc == {"transformer_blocks.0.attn1", "transformer_blocks.0.attn2"}
    else:
        # CogVideoX: its one (joint) attention per block.
        assert moc == {"transformer_blocks.0.attn1"}
    assert get_moc_config(model) == SPARSE
    remove_moc(model)
    assert get_moc_config(model) is None
    assert {n: type(m.processor) for n, m in model.named_modules() if hasattr(m, "processor")} == before
    torch.testing.assert_close(_run(model, inputs), stock)


@pytest.mark.parametrize("name", ["hunyuan_video", "hunyuan_video15", "cogvideox", "ltx"])
def test_set_attn_processor_without_apply_moc(name):
    model, inputs = BUILDERS[name]()
    apply_moc(model, SPARSE)
    expected = _run(model, inputs)
    remove_moc(model)
    # The same instance on every attention module, including Hunyuan's refiner and LTX's cross-attention.
    model.set_attn_processor(MOC_CLASS[name](SPARSE))
    torch.testing.assert_close(_run(model, inputs), expected, atol=1e-6, rtol=1e-6)
    remove_moc(model)
    expected_stock = {
        "hunyuan_video": (HunyuanVideoAttnProcessor2_0, AttnProcessor2_0),
        "hunyuan_video15": (HunyuanVideo15AttnProcessor2_0, AttnProcessor2_0),
        "cogvideox": (CogVideoXAttnProcessor2_0,),
        "ltx": (LTXVideoAttnProcessor,),
    }[name]
    assert all(isinstance(p, expected_stock) for p in model.attn_processors.values())


def test_mochi_needs_apply_moc():
    model, inputs = _mochi()
    for module in model.modules():
        if hasattr(module, "processor"):
            module.processor = MoCMochiAttnProcessor(SPARSE)
    with pytest.raises(ValueError, match="apply_moc"):
        _run(model, inputs)


def test_cogvideox_without_rope_needs_apply_moc():
    model, inputs = _cogvideox(rope=False)
    model.set_attn_processor(MoCCogVideoXAttnProcessor(SPARSE))
    with pytest.raises(ValueError, match="apply_moc"):
        _run(model, inputs)


@pytest.mark.parametrize("name", ["hunyuan_video", "hunyuan_video15", "mochi"])
def test_padded_caption_tokens_are_ignored(name):
    model, inputs = BUILDERS[name]()
    apply_moc(model, SPARSE)
    out = _run(model, inputs)
    # Change what sits in the two padded caption positions of sample 0: the video must not move.
    poked = dict(inputs, encoder_hidden_states=inputs["encoder_hidden_states"].clone())
    poked["encoder_hidden_states"][0, 4:] = 100.0
    torch.testing.assert_close(_run(model, poked), out)
    # ... while the valid caption tokens are attended (a mandatory anchor).
    poked["encoder_hidden_states"][0, :4] = 100.0
    assert not torch.allclose(_run(model, poked)[0], out[0], atol=1e-3)


def test_hunyuan_unpadded_batch_matches_per_sample():
    # The batched path (all captions full) and the per-sample path must agree.
    model, inputs = _hunyuan(pad=False)
    apply_moc(model, SPARSE)
    batched = _run(model, inputs)
    single = [_run(model, {k: (v[i : i + 1] if torch.is_tensor(v) else v) for k, v in inputs.items()}) for i in (0, 1)]
    torch.testing.assert_close(batched, torch.cat(single), atol=1e-5, rtol=1e-5)


def test_hunyuan_gradients_match_between_backends():
    grads = {}
    for backend in ("torch", "reference"):
        model, inputs = _hunyuan(pad=True)
        apply_moc(model, SPARSE.replace(backend=backend))
        model(**inputs).sample.square().sum().backward()
        grads[backend] = model.transformer_blocks[0].attn.to_q.weight.grad
    assert grads["torch"].abs().sum() > 0
    torch.testing.assert_close(grads["torch"], grads["reference"], atol=1e-5, rtol=1e-4)


def test_unsupported_model_gets_a_clear_error():
    with pytest.raises(TypeError, match=r"apply_moc does not support Linear; supported transformers: .*HunyuanVideo"):
        apply_moc(torch.nn.Linear(2, 2), SPARSE)


def test_supported_models_lists_the_new_transformers():
    names = supported_models()
    for cls in (
        HunyuanVideoTransformer3DModel,
        HunyuanVideo15Transformer3DModel,
        CogVideoXTransformer3DModel,
        LTXVideoTransformer3DModel,
        MochiTransformer3DModel,
    ):
        assert cls.__name__ in names


def test_frames_from_rotary_reads_grid_and_rejects_other_tables():
    cos, sin = get_3d_rotary_pos_embed(embed_dim=16, crops_coords=((0, 0), (2, 5)), grid_size=(2, 5), temporal_size=7)
    assert frames_from_rotary((cos, sin)) == (7, 10)
    with pytest.raises(ValueError, match="does not divide"):
        frames_from_rotary((cos[:-3], sin[:-3]))
    # A token of frame 1 swapped into frame 0: frames are no longer runs of equal time angle.
    order = torch.arange(cos.shape[0])
    order[5], order[15] = 15, 5
    with pytest.raises(ValueError, match="not laid out"):
        frames_from_rotary((cos[order], sin[order]))


def test_shots_from_moc_context_must_match_frames():
    from diffusers_moc import moc_context

    model, inputs = _ltx()
    apply_moc(model, SPARSE)
    with moc_context(shot_frames=[2, 1]):
        _run(model, inputs)
    with moc_context(shot_frames=[2, 2]), pytest.raises(ValueError, match="latent frames"):
        _run(model, inputs)


def test_wan_apply_remove_round_trip_keeps_stock_processors():
    import os
    import sys

    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    from diffusers_moc import MoCWanAttnProcessor

    sys.path.insert(0, os.path.dirname(__file__))
    from _cp_worker import tiny_wan

    model, inputs, _ = tiny_wan()
    stock = _run(model, inputs)
    apply_moc(model, SPARSE)
    assert isinstance(model.blocks[0].attn1.processor, MoCWanAttnProcessor)
    # apply_moc also installs MoC's cross-attention (per-shot caption anchors; stock without caption spans).
    assert isinstance(model.blocks[0].attn2.processor, MoCWanAttnProcessor)
    sparse = _run(model, inputs)
    assert not torch.allclose(sparse, stock, atol=1e-3)
    remove_moc(model)
    assert all(type(p) is WanAttnProcessor for p in model.attn_processors.values())
    torch.testing.assert_close(_run(model, inputs), stock)
    model.set_attn_processor(MoCWanAttnProcessor(SPARSE))
    torch.testing.assert_close(_run(model, inputs), sparse, atol=1e-6, rtol=1e-6)
    remove_moc(model)
    assert all(type(p) is WanAttnProcessor for p in model.attn_processors.values())


def test_cogvideox_no_rope_grid_hook_is_removed_with_moc():
    model, inputs = _cogvideox(rope=False)
    apply_moc(model, SPARSE)
    apply_moc(model, SPARSE)  # applying twice keeps one hook
    assert list(model._diffusers_hook.hooks) == ["moc"]
    _run(model, inputs)
    remove_moc(model)
    assert not model._diffusers_hook.hooks
