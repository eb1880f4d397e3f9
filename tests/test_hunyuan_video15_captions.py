"""Per-shot captions in HunyuanVideo 1.5's joint stream: caption chunks, the refiner per caption, the causal DAG."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from diffusers import HunyuanVideo15Transformer3DModel

from diffusers_moc import MoCConfig, apply_moc, moc_context, remove_moc
from diffusers_moc.core.attention_processors import MoCHunyuanVideo15AttnProcessor
from diffusers_moc.core.joint_stream import joint_stream
from diffusers_moc.core.layout import ChunkLayout

SHOTS = (2, 2)  # latent frames per shot
#: Caption segments: the global caption, shot 0's, shot 1's; Qwen tokens and ByT5 (glyph) tokens of each.
CAPTIONS = dict(caption_shots=(-1, 0, 1), caption_tokens=((3, 4, 4), (0, 2, 1)))
QWEN_PAD, BYT5_PAD = 2, 1
CAUSAL = MoCConfig(top_k=1, local_window=1, anchor_own_shot=True, causal=True, text_anchors="shot", backend="torch")
DENSE = MoCConfig(top_k=100, causal=False, backend="reference")


def _model(num_layers: int = 2) -> HunyuanVideo15Transformer3DModel:
    torch.manual_seed(0)
    return HunyuanVideo15Transformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=12,
        num_layers=num_layers,
        num_refiner_layers=2,
        text_embed_dim=16,
        text_embed_2_dim=8,
        image_embed_dim=8,
        rope_axes_dim=(4, 4, 4),
        target_size=32,
    ).eval()


def _mask(real: int, pad: int) -> torch.Tensor:
    return torch.tensor([[1] * real + [0] * pad])


def _inputs(image: bool = False, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    qwen, byt5 = (sum(n) for n in CAPTIONS["caption_tokens"])
    return {
        "hidden_states": torch.randn(1, 4, sum(SHOTS), 4, 4, generator=g),
        "timestep": torch.tensor([500.0]),
        "encoder_hidden_states": torch.randn(1, qwen + QWEN_PAD, 16, generator=g),
        "encoder_attention_mask": _mask(qwen, QWEN_PAD),
        "encoder_hidden_states_2": torch.randn(1, byt5 + BYT5_PAD, 8, generator=g),
        "encoder_attention_mask_2": _mask(byt5, BYT5_PAD),
        "image_embeds": torch.randn(1, 2, 8, generator=g) if image else torch.zeros(1, 2, 8),
    }


def _run(model, inputs, **context) -> torch.Tensor:
    with torch.no_grad(), moc_context(**context):
        return model(**inputs).sample


def _refined(model, inputs, **context) -> torch.Tensor:
    seen = []
    handle = model.context_embedder.register_forward_hook(lambda m, a, out: seen.append(out))
    _run(model, inputs, **context)
    handle.remove()
    return seen[0]


def _last_caption_changed(inputs: dict) -> dict:
    """Shot 1's caption (its Qwen and ByT5 tokens) replaced, same lengths."""
    changed = {k: v.clone() for k, v in inputs.items()}
    changed["encoder_hidden_states"][:, 7:11] = torch.randn(1, 4, 16)
    changed["encoder_hidden_states_2"][:, 2:3] = torch.randn(1, 1, 8)
    return changed


# ------------------------------------------------------------------------------------------------ the stream order


def test_joint_stream_puts_each_caption_before_its_shot_and_padding_last():
    video = ChunkLayout.for_video(4, 3, shot_frames=(2, 2))  # 12 video tokens, positions 0-11
    # Model order after the video: image (global), shot 1's glyph text, global caption, shot 0's, shot 1's; padding.
    stream = joint_stream(video, ((2, -1), (1, 1), (2, -1), (1, 0), (2, 1)), padding=3)
    lay = stream.layout
    assert lay.shots == (-1, -1, 0, 0, 0, 1, 1, 1, 1, -1)
    assert lay.is_text == (True, True, True, False, False, True, True, False, False, True)
    assert lay.sizes == (2, 2, 1, 3, 3, 1, 2, 3, 3, 3)
    assert stream.order == (12, 13, 15, 16, 17, 0, 1, 2, 3, 4, 5, 14, 18, 19, 6, 7, 8, 9, 10, 11, 20, 21, 22)
    x = torch.arange(23).view(1, 23, 1)
    assert torch.equal(stream.to_model(stream.to_moc(x)), x)


# ------------------------------------------------------------------------------------------------ refiner per caption


def test_refiner_refines_each_caption_alone():
    model = _model()
    inputs = _inputs()
    changed = _last_caption_changed(inputs)
    # Stock: the refiner attends over all caption tokens and pools them, so shot 0's caption moves with shot 1's.
    stock_a, stock_b = _refined(model, inputs), _refined(model, changed)
    assert not torch.allclose(stock_a[:, :7], stock_b[:, :7], atol=1e-4)
    apply_moc(model, CAUSAL)
    a, b = (
        _refined(model, inputs, shot_frames=SHOTS, **CAPTIONS),
        _refined(model, changed, shot_frames=SHOTS, **CAPTIONS),
    )
    assert torch.equal(a[:, :7], b[:, :7]) and not torch.allclose(a[:, 7:11], b[:, 7:11])
    # Each span is what the refiner gives for that caption alone; padding after the spans is zero.
    t, hidden, mask = inputs["timestep"], inputs["encoder_hidden_states"], inputs["encoder_attention_mask"]
    with torch.no_grad():
        alone = model.context_embedder.forward(hidden[:, 3:7], t, mask[:, 3:7])
    torch.testing.assert_close(a[:, 3:7], alone, rtol=0, atol=0)
    assert (a[:, 11:] == 0).all()
    # Without caption segments in the context the refiner is stock.
    torch.testing.assert_close(_refined(model, inputs, shot_frames=SHOTS), stock_a, rtol=0, atol=0)


def test_one_caption_at_full_density_equals_stock():
    """A single caption segment through the per-caption path (refiner on its span, chunks reordered) is the stock
    model when MoC is dense."""
    model = _model()
    inputs = _inputs(image=True)
    stock = _run(model, inputs)
    apply_moc(model, DENSE)
    context = dict(caption_shots=(0,), caption_tokens=((11,), (3,)))
    torch.testing.assert_close(_run(model, inputs, **context), stock, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ causal DAG


@pytest.mark.parametrize("image", [False, True], ids=["t2v", "i2v"])
def test_causal_dag_earlier_shots_do_not_depend_on_the_last_caption_or_frames(image):
    model = _model()
    apply_moc(model, CAUSAL)
    inputs = _inputs(image=image)
    context = dict(shot_frames=SHOTS, **CAPTIONS)
    out = _run(model, inputs, **context)
    caption = _run(model, _last_caption_changed(inputs), **context)
    assert torch.equal(caption[:, :, :2], out[:, :, :2])  # shot 0's frames, bit for bit
    assert not torch.allclose(caption[:, :, 2:], out[:, :, 2:], atol=1e-4)  # shot 1 reads its own caption
    frames = dict(inputs, hidden_states=inputs["hidden_states"].clone())
    frames["hidden_states"][:, :, 2:] += 1.0
    moved = _run(model, frames, **context)
    assert torch.equal(moved[:, :, :2], out[:, :, :2])
    # Shot 0 does read its own caption and the global one (mandatory anchors).
    for span in ((0, 3), (3, 7)):
        poked = {k: v.clone() for k, v in inputs.items()}
        poked["encoder_hidden_states"][:, span[0] : span[1]] += 1.0
        assert not torch.allclose(_run(model, poked, **context)[:, :, :2], out[:, :, :2], atol=1e-4)


@pytest.mark.parametrize(
    "config", [CAUSAL.replace(causal=False, top_k=4), CAUSAL.replace(text_anchors="all")], ids=["non-causal", "all"]
)
def test_dag_controls_shot_zero_sees_the_last_caption(config):
    """Controls: non-causal routing, or every caption anchored (`text_anchors="all"`), let shot 0 see shot 1."""
    model = _model()
    apply_moc(model, config)
    inputs = _inputs()
    context = dict(shot_frames=SHOTS, **CAPTIONS)
    out = _run(model, inputs, **context)
    assert not torch.equal(_run(model, _last_caption_changed(inputs), **context)[:, :, :2], out[:, :, :2])


# ------------------------------------------------------------------------------------------------ errors, lifecycle


def test_bad_caption_contexts_get_clear_errors():
    model = _model(num_layers=1)
    apply_moc(model, CAUSAL)
    inputs = _inputs()
    with pytest.raises(ValueError, match="encoder_attention_mask must mark exactly the first 12 tokens"):
        _run(model, inputs, shot_frames=SHOTS, caption_shots=(-1, 0, 1), caption_tokens=((3, 4, 5), (0, 2, 1)))
    with pytest.raises(ValueError, match="two text inputs"):
        _run(model, inputs, shot_frames=SHOTS, caption_shots=(-1, 0, 1), caption_tokens=((3, 4, 4),))
    with pytest.raises(ValueError, match="shot ids in \\[-1, 2\\)"):
        moc_context(shot_frames=SHOTS, caption_shots=(-1, 2), caption_tokens=((1, 1),)).__enter__()
    with pytest.raises(ValueError, match="names a shot twice"):
        moc_context(shot_frames=SHOTS, caption_shots=(0, 0), caption_tokens=((1, 1),)).__enter__()
    with pytest.raises(ValueError, match="segment 1 has no tokens"):
        moc_context(caption_shots=(-1, 0), caption_tokens=((1, 0), (0, 0))).__enter__()
    with pytest.raises(ValueError, match="describe different models"):
        moc_context(shot_frames=(1,), caption_spans=[(0, 1)], caption_shots=(0,), caption_tokens=((1,),)).__enter__()
    # Set by hand (no hook to refine per caption): refused rather than run with mixed captions.
    remove_moc(model)
    model.set_attn_processor(MoCHunyuanVideo15AttnProcessor(CAUSAL))
    with pytest.raises(ValueError, match="need MoC installed with `apply_moc"):
        _run(model, inputs, shot_frames=SHOTS, **CAPTIONS)


def test_remove_moc_removes_the_refiner_hooks_and_copies_keep_theirs():
    model = _model(num_layers=1)
    inputs = _inputs()
    stock = _run(model, inputs)
    apply_moc(model, CAUSAL)
    expected = _run(model, inputs, shot_frames=SHOTS, **CAPTIONS)
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        torch.testing.assert_close(_run(twin, inputs, shot_frames=SHOTS, **CAPTIONS), expected, rtol=0, atol=0)
    apply_moc(model, CAUSAL)  # again: the first hook's refiner hook goes
    refiner = model.context_embedder._diffusers_hook
    assert list(refiner.hooks.values()) == [model.transformer_blocks[0].attn.processor.hook.refiner]
    remove_moc(model)
    assert not refiner.hooks and "forward" not in vars(model.context_embedder)
    torch.testing.assert_close(_run(model, inputs), stock, rtol=0, atol=0)


def test_other_models_refuse_caption_segments():
    from diffusers_moc.tiny import tiny_wan_components

    wan = tiny_wan_components()["transformer"]
    apply_moc(wan, CAUSAL)
    args = dict(
        hidden_states=torch.randn(1, 16, 2, 4, 4),
        timestep=torch.tensor([1.0]),
        encoder_hidden_states=torch.randn(1, 4, 32),
    )
    with pytest.raises(ValueError, match="does not place in its stream"):
        _run(wan, args, caption_shots=(0,), caption_tokens=((4,),))
