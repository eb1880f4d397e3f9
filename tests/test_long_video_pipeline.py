"""LongVideoPipeline on tiny random-weight Wan components: shots, DAG property, caption anchors, memory design."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import WanPipeline
from diffusers.models.transformers.transformer_wan import WanAttnProcessor
from torch.utils._python_dispatch import TorchDispatchMode

from diffusers_moc import MoCConfig, MoCWanAttnProcessor, apply_moc, get_moc_config, moc_context
from diffusers_moc.pipelines import LongVideoPipeline, LongVideoPipelineOutput, Shot, frames_for_seconds
from diffusers_moc.tiny import tiny_wan_components
from diffusers_moc.video_io import write_videos

av = pytest.importorskip("av")

CAUSAL = MoCConfig(top_k=2, local_window=1, anchor_own_shot=True, causal=True)
SIZE = {"height": 32, "width": 32, "num_inference_steps": 2, "max_sequence_length": 16}
SHOTS = [Shot("a cat walks in the city", num_frames=5), Shot("a dog runs on the beach", num_frames=9)]
LAST = "the sea at night"


def make_pipe(**kw) -> LongVideoPipeline:
    pipe = LongVideoPipeline(**tiny_wan_components(**kw))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe() -> LongVideoPipeline:
    return make_pipe()


def run(pipe, shots, seed=0, **kw):
    args = {**SIZE, "moc_config": CAUSAL, "global_prompt": "red car", "negative_prompt": "blue", **kw}
    return pipe(shots, generator=torch.Generator().manual_seed(seed), **args)


def read_frames(path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


# ------------------------------------------------------------------------------------------------ end to end


def test_three_shots_end_to_end_writes_playable_mp4(pipe, tmp_path):
    out = run(pipe, [*SHOTS, Shot(LAST, num_frames=5)])
    assert isinstance(out, LongVideoPipelineOutput)
    assert out.frames.shape == (1, 19, 32, 32, 3)
    assert out.shot_starts == [0, 5, 14]
    assert np.isfinite(out.frames).all() and 0 <= out.frames.min() and out.frames.max() <= 1
    path = tmp_path / "long.mp4"
    write_videos([(path, out.frames[0])], fps=16)
    frames = read_frames(path)
    assert frames.shape == (19, 32, 32, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["long.mp4"]  # no temporary file left behind


def test_causal_routing_first_shots_do_not_depend_on_last_caption(pipe):
    """The DAG property: shot 1's tokens never see later shots (self- or cross-attention), so it is unchanged."""

    def generate(last_caption):
        final = {}

        def keep(p, i, t, kwargs):
            final["latents"] = kwargs["latents"]
            return {}

        out = run(pipe, [*SHOTS, Shot(last_caption, num_frames=9)], callback_on_step_end=keep)
        return out, final["latents"]

    a, za = generate(LAST)
    b, zb = generate("an old man sits in a small room")
    assert a.shot_starts == b.shot_starts == [0, 5, 14]
    assert torch.equal(za[:, :, :2], zb[:, :, :2])  # shot 1 latents, exactly
    assert torch.equal(za[:, :, 2:5], zb[:, :, 2:5])  # shot 2 also precedes the change
    assert not torch.allclose(za[:, :, 5:], zb[:, :, 5:])  # the last shot does change
    assert np.array_equal(a.frames[:, :14], b.frames[:, :14])  # decoded frames of shots 1 and 2
    assert not np.array_equal(a.frames[:, 14:], b.frames[:, 14:])


def test_first_shot_unchanged_when_last_shot_gets_longer(pipe):
    """Noise is drawn shot by shot, so a later shot's length does not move shot 1's noise either."""
    a = run(pipe, [*SHOTS, Shot(LAST, num_frames=5)], output_type="latent").frames
    b = run(pipe, [*SHOTS, Shot(LAST, num_frames=13)], output_type="latent").frames
    assert torch.equal(a[:, :, :5], b[:, :, :5])


def test_non_causal_routing_lets_the_first_shot_see_later_shots(pipe):
    """Control for the DAG test: without causal routing, shot 1 may route to the last shot and changes with it."""
    config = CAUSAL.replace(causal=False, anchor_own_shot=False, top_k=3)
    a = run(pipe, [*SHOTS, Shot(LAST, num_frames=9)], output_type="latent", moc_config=config).frames
    b = run(
        pipe, [*SHOTS, Shot("an old man sits in a small room", num_frames=9)], output_type="latent", moc_config=config
    )
    assert not torch.equal(a[:, :, :2], b.frames[:, :, :2])


def test_one_shot_equals_wan_pipeline_with_moc():
    config = MoCConfig(top_k=1, causal=True)
    wan = WanPipeline(**tiny_wan_components())
    wan.set_progress_bar_config(disable=True)
    apply_moc(wan.transformer, config)
    expected = wan(
        "a cat walks in the city",
        negative_prompt="blue",
        num_frames=9,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(3),
        **SIZE,
    ).frames
    pipe = make_pipe()
    got = pipe(
        [Shot("a cat walks in the city", num_frames=9)],
        negative_prompt="blue",
        guidance_scale=5.0,
        moc_config=config,
        generator=torch.Generator().manual_seed(3),
        **SIZE,
    ).frames
    assert got.shape == expected.shape == (1, 9, 32, 32, 3)
    assert np.array_equal(got, expected)


def test_shots_in_seconds_and_plain_prompts(pipe):
    out = run(pipe, [{"prompt": "a cat", "seconds": 0.5}, "a dog"], fps=8, num_frames=5, output_type="latent")
    assert frames_for_seconds(0.5, 8) == 5
    assert out.shot_starts == [0, 2]
    assert out.frames.shape[2] == 4


# ------------------------------------------------------------------------------------------------ cross-attention


def _cross_attention_inputs(seed=0):
    transformer = tiny_wan_components()["transformer"]
    attn = transformer.blocks[0].attn2
    g = torch.Generator().manual_seed(seed)
    dim = attn.to_q.in_features
    hidden = torch.randn(1, 5 * 4, dim, generator=g)  # 5 latent frames of 4 tokens
    text = torch.randn(1, 3 * 6, dim, generator=g)  # global, caption A, caption B (6 tokens each)
    return attn, hidden, text


def test_cross_attention_without_spans_is_stock():
    attn, hidden, text = _cross_attention_inputs()
    expected = WanAttnProcessor()(attn, hidden, text)
    proc = MoCWanAttnProcessor(MoCConfig())
    assert torch.equal(proc(attn, hidden, text), expected)
    with moc_context(shot_frames=[2, 3]):  # shots alone do not change cross-attention
        assert torch.equal(proc(attn, hidden, text), expected)


def test_cross_attention_per_shot_caption_anchors():
    attn, hidden, text = _cross_attention_inputs()
    proc = MoCWanAttnProcessor(MoCConfig())
    stock = WanAttnProcessor()
    glob, cap_a, cap_b = text[:, :6], text[:, 6:12], text[:, 12:]
    with moc_context(shot_frames=[2, 3], caption_spans=[(6, 12), (12, 18)], global_caption_span=(0, 6)):
        out = proc(attn, hidden, text)
    torch.testing.assert_close(out[:, :8], stock(attn, hidden[:, :8], torch.cat([glob, cap_a], 1)), rtol=0, atol=1e-6)
    torch.testing.assert_close(out[:, 8:], stock(attn, hidden[:, 8:], torch.cat([glob, cap_b], 1)), rtol=0, atol=1e-6)
    with moc_context(shot_frames=[2, 3], caption_spans=[(6, 12), (6, 12)]):  # shared caption, no global
        out = proc(attn, hidden, text)
    torch.testing.assert_close(out, stock(attn, hidden, cap_a), rtol=0, atol=1e-6)


@pytest.mark.parametrize("world", [2, 4])
def test_cross_attention_spans_on_a_context_parallel_shard(monkeypatch, world):
    """Under Ulysses each rank holds a contiguous slice of the video tokens; its shots must be found globally."""
    import diffusers_moc.attention_processors.wan as wan

    attn, hidden, text = _cross_attention_inputs()
    proc = MoCWanAttnProcessor(MoCConfig())
    ctx = dict(shot_frames=[2, 3], caption_spans=[(6, 12), (12, 18)], global_caption_span=(0, 6))
    with moc_context(**ctx):
        full = proc(attn, hidden, text)
    per_rank = hidden.shape[1] // world
    for rank in range(world):
        monkeypatch.setattr(wan, "sequence_shard", lambda parallel_config, rank=rank: (rank, world))
        with moc_context(**ctx):
            shard = proc(attn, hidden[:, rank * per_rank : (rank + 1) * per_rank], text)
        torch.testing.assert_close(shard, full[:, rank * per_rank : (rank + 1) * per_rank], rtol=0, atol=1e-6)


def test_cross_attention_span_errors():
    attn, hidden, text = _cross_attention_inputs()
    proc = MoCWanAttnProcessor(MoCConfig())
    with moc_context(shot_frames=[2, 4], caption_spans=[(0, 6), (6, 12)]):
        with pytest.raises(ValueError, match="not a whole number of frames"):
            proc(attn, hidden, text)
    with moc_context(shot_frames=[2, 3], caption_spans=[(0, 6), (6, 30)]):
        with pytest.raises(ValueError, match=r"caption_spans\[1\]=\(6, 30\) lies outside"):
            proc(attn, hidden, text)
    with pytest.raises(ValueError, match="one span per shot"):
        moc_context(shot_frames=[2, 3], caption_spans=[(0, 6)]).__enter__()
    with pytest.raises(ValueError, match="caption_spans needs shot_frames"):
        moc_context(caption_spans=[(0, 6)]).__enter__()
    with pytest.raises(ValueError, match="0 <= start < end"):
        moc_context(shot_frames=[5], caption_spans=[(6, 6)]).__enter__()


# ------------------------------------------------------------------------------------------------ memory design


def test_text_encoder_runs_once_per_distinct_caption(pipe):
    seen = []
    hook = pipe.text_encoder.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    try:
        shots = [Shot("a cat", num_frames=5), Shot("a dog", num_frames=5), Shot("a cat", num_frames=5)]
        run(pipe, shots, global_prompt="a dog", negative_prompt="blue", output_type="latent")
    finally:
        hook.remove()
    assert seen == [1, 1, 1]  # "a dog" (global and shot 2), "a cat" (shots 1 and 3), "blue"


def test_repeated_captions_share_one_text_segment(pipe):
    captured = []

    def spy(self, i, t, kwargs):
        captured.append(kwargs["prompt_embeds"].shape)
        return {}

    shots = [Shot("a cat", num_frames=5), Shot("a dog", num_frames=5), Shot("a cat", num_frames=5)]
    run(
        pipe,
        shots,
        global_prompt="red car",
        output_type="latent",
        callback_on_step_end=spy,
        callback_on_step_end_tensor_inputs=["prompt_embeds"],
    )
    assert captured[0] == (1, 3 * 16, 32)  # global + 2 distinct captions, 16 tokens each


def test_vae_decodes_shot_by_shot(pipe, monkeypatch):
    decoded = []
    original = pipe.vae.decode

    def decode(z, *args, **kwargs):
        decoded.append(z.shape[2])
        return original(z, *args, **kwargs)

    monkeypatch.setattr(pipe.vae, "decode", decode)
    out = run(pipe, [*SHOTS, Shot(LAST, num_frames=5)])
    assert decoded == [2, 3, 2]
    assert out.frames.shape[1] == 19


class _SquareTensors(TorchDispatchMode):
    """Records every op output with two or more dimensions of at least `n` (an `n x n` or bigger attention map)."""

    def __init__(self, n: int):
        super().__init__()
        self.n, self.found = n, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and sum(d >= self.n for d in t.shape) >= 2:
                self.found.append((str(func), tuple(t.shape)))
        return out


def test_no_sequence_by_sequence_tensor_anywhere(pipe):
    """No op of a whole call (text, denoising with CFG, decoding) makes an L x L tensor, L = video tokens."""
    shots = [Shot("a cat", num_frames=5), Shot("a dog", num_frames=5), Shot("a car", num_frames=5)]
    num_tokens = 6 * (64 // 16) ** 2  # 6 latent frames of 4x4 patches = 96, more than any other size in this call
    with _SquareTensors(num_tokens) as spy:
        torch.matmul(torch.ones(num_tokens, 2), torch.ones(2, num_tokens))  # the detector does see an L x L
    assert spy.found == [("aten.mm.default", (num_tokens, num_tokens))]
    with _SquareTensors(num_tokens) as spy:
        out = run(pipe, shots, height=64, width=64)
    assert out.frames.shape == (1, 15, 64, 64, 3)
    assert spy.found == []


# ------------------------------------------------------------------------------------------------ API


def test_output_types_callbacks_and_tuple(pipe):
    steps = []

    def callback(p, i, t, kwargs):
        steps.append(i)
        assert set(kwargs) == {"latents"}
        return {"latents": kwargs["latents"]}

    short = [Shot("a cat", num_frames=1), Shot("a dog", num_frames=5)]
    out = run(pipe, short, output_type="pt", callback_on_step_end=callback)
    assert steps == [0, 1]
    assert out.frames.shape == (1, 6, 3, 32, 32)
    pil = run(pipe, short, output_type="pil")
    assert len(pil.frames) == 1 and len(pil.frames[0]) == 6 and pil.frames[0][0].size == (32, 32)
    frames, starts = run(pipe, short, return_dict=False)
    assert frames.shape == (1, 6, 32, 32, 3) and starts == [0, 1]
    np.testing.assert_allclose(frames, out.frames.permute(0, 1, 3, 4, 2).numpy(), atol=1e-6)
    two = run(pipe, short, num_videos_per_prompt=2, output_type="latent")
    assert two.frames.shape == (2, 16, 3, 4, 4) and two.shot_starts == [0, 1]


def test_moc_config_is_applied_then_updated():
    pipe = make_pipe()
    ONE_FRAME = [Shot("a cat", num_frames=1), Shot("a dog", num_frames=1)]  # noqa: N806
    assert get_moc_config(pipe.transformer) is None
    run(pipe, ONE_FRAME, output_type="latent")
    assert get_moc_config(pipe.transformer) == CAUSAL
    cross = [m for m in pipe.transformer.modules() if getattr(m, "is_cross_attention", False)]
    assert cross and all(isinstance(m.processor, MoCWanAttnProcessor) for m in cross)
    other = CAUSAL.replace(top_k=4)
    run(pipe, ONE_FRAME, output_type="latent", moc_config=other)
    procs = {
        id(m.processor)
        for m in pipe.transformer.modules()
        if isinstance(getattr(m, "processor", None), MoCWanAttnProcessor)
    }
    assert len(procs) == 1 and get_moc_config(pipe.transformer) == other
    run(pipe, ONE_FRAME, output_type="latent", moc_config=None)  # None keeps what is applied
    assert get_moc_config(pipe.transformer) == other


@pytest.mark.parametrize(
    "shots, kwargs, match",
    [
        ([], {}, "shots is empty"),
        ("a cat", {}, "shots must be a list"),
        (
            [Shot("a cat", num_frames=5), {"prompt": "a dog", "num_frames": 8}],
            {},
            r"shots\[1\].*4n\+1 \(e\.g\. 5 or 9\)",
        ),
        ([{"prompt": "a dog", "num_frames": 0}], {}, r"shots\[0\].*at least 1 frame"),
        ([{"prompt": "a dog", "frames": 5}], {}, r"shots\[0\] has unknown keys \['frames'\]"),
        ([{"prompt": "", "num_frames": 5}], {}, "non-empty"),
        (SHOTS, {"height": 40}, "height must be a positive multiple of 16"),
        (SHOTS, {"output_type": "mp4"}, "output_type must be one of"),
        (SHOTS, {"global_prompt": " "}, "global_prompt is empty"),
        ([Shot("a cat", num_frames=129)], {}, r"33 latent frames .* cover 32 \(rope_max_seq_len\)"),
        (SHOTS, {"callback_on_step_end_tensor_inputs": ["noise"]}, "callback_on_step_end_tensor_inputs"),
    ],
)
def test_bad_inputs_raise_clear_errors(pipe, shots, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        run(pipe, shots, **kwargs)


def test_shot_validation():
    with pytest.raises(ValueError, match="exactly one of num_frames and seconds"):
        Shot("a cat")
    with pytest.raises(ValueError, match="exactly one of num_frames and seconds"):
        Shot("a cat", num_frames=5, seconds=1)
    with pytest.raises(ValueError, match="seconds must be a positive number"):
        Shot("a cat", seconds=0)
    assert frames_for_seconds(5, 16) == 81
    assert Shot("a cat", seconds=5).frames(16) == 81


def test_from_pretrained_local_folders(tmp_path):
    """A folder written by save_pretrained (ours, or WanPipeline's as on the Hub) loads into LongVideoPipeline."""
    components = tiny_wan_components()
    WanPipeline(**components).save_pretrained(tmp_path / "wan")
    LongVideoPipeline(**components).save_pretrained(tmp_path / "long")
    reference = run(make_pipe(), SHOTS, output_type="latent").frames
    for folder in ("wan", "long"):
        loaded = LongVideoPipeline.from_pretrained(tmp_path / folder)
        loaded.set_progress_bar_config(disable=True)
        assert isinstance(loaded, LongVideoPipeline)
        # Same weights, but freshly loaded tensors can take other BLAS paths: equal up to float rounding.
        torch.testing.assert_close(run(loaded, SHOTS, output_type="latent").frames, reference, rtol=0, atol=1e-4)


def test_caption_layout_is_the_pipeline_and_training_text_context():
    from diffusers_moc.pipelines.captions import CaptionLayout, caption_layout

    # Global caption first, each distinct caption once; shots share a repeated caption's span.
    lay = caption_layout("g", ["a", "b", "a"], 4)
    assert lay.segments == ("g", "a", "b") and lay.num_tokens == 12
    assert lay.caption_spans == ((4, 8), (8, 12), (4, 8)) and lay.global_caption_span == (0, 4)
    assert lay.context_kwargs() == {"caption_spans": lay.caption_spans, "global_caption_span": (0, 4)}
    assert caption_layout(None, ["a", "b"], 4).global_caption_span is None
    # One caption for everything is stock cross-attention: no spans.
    for args in (("g", [None, None]), (None, ["a", "a"]), ("a", ["a"]), (None, ["a"])):
        lay = caption_layout(*args, 4)
        assert lay == CaptionLayout(("g",) if args[0] == "g" else ("a",), 4) and lay.context_kwargs() == {}
    # A shot without caption attends to the global caption only; without one it has nothing to attend to.
    assert caption_layout("g", [None, "b"], 4).caption_spans == ((0, 4), (4, 8))
    with pytest.raises(ValueError, match="shot 1 has no caption and there is no global caption"):
        caption_layout(None, ["a", None], 4)
    with pytest.raises(ValueError, match="max_sequence_length must be a positive integer"):
        caption_layout("g", ["a"], 0)
