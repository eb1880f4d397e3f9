"""LongVideoPipeline on tiny random-weight Wan components: shots, DAG property, caption anchors, memory design."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import WanImageToVideoPipeline, WanPipeline
from diffusers.models.transformers.transformer_wan import WanAttnProcessor
from torch.utils._python_dispatch import TorchDispatchMode

from diffusers_moc import MoCConfig, MoCWanAttnProcessor, apply_moc, get_moc_config, moc_context
from diffusers_moc.core.apply import pipeline_transformers
from diffusers_moc.pipelines import LongVideoPipeline, LongVideoPipelineOutput, Shot, frames_for_seconds
from diffusers_moc.tiny import tiny_wan_components
from diffusers_moc.video_io import write_videos

av = pytest.importorskip("av")

CAUSAL = MoCConfig(top_k=2, local_window=1, anchor_own_shot=True, causal=True)
SIZE = {"height": 32, "width": 32, "num_inference_steps": 2, "max_sequence_length": 16}
SHOTS = [Shot("a cat walks in the city", num_frames=5), Shot("a dog runs on the beach", num_frames=9)]
LAST = "the sea at night"
#: The text-to-video families the end-to-end tests run on (each with its own tiny components).
T2V_MODELS = ["wan2.1-t2v", "wan2.2-t2v-a14b", "wan2.2-ti2v-5b"]


def size_of(model: str) -> int:
    # TI2V-5B's VAE compresses 16x: 64 pixels are 4 latent rows, 2 patch rows, as 32 pixels are for Wan 2.1.
    return 64 if model == "wan2.2-ti2v-5b" else 32


def make_pipe(**kw) -> LongVideoPipeline:
    pipe = LongVideoPipeline(**tiny_wan_components(**kw))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe() -> LongVideoPipeline:
    return make_pipe()


_PIPES: dict[str, LongVideoPipeline] = {}


@pytest.fixture(params=T2V_MODELS)
def model_pipe(request) -> LongVideoPipeline:
    """The tiny pipeline of each text-to-video family (built once per module)."""
    if request.param not in _PIPES:
        _PIPES[request.param] = make_pipe(model=request.param)
    return _PIPES[request.param]


def run(pipe, shots, seed=0, **kw):
    size = size_of(pipe.family.name)
    args = {**SIZE, "height": size, "width": size, "moc_config": CAUSAL, "global_prompt": "red car", **kw}
    args.setdefault("negative_prompt", "blue")
    return pipe(shots, generator=torch.Generator().manual_seed(seed), **args)


def read_frames(path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


# ------------------------------------------------------------------------------------------------ end to end


def test_three_shots_end_to_end_writes_playable_mp4(model_pipe, tmp_path):
    size = size_of(model_pipe.family.name)
    out = run(model_pipe, [*SHOTS, Shot(LAST, num_frames=5)])
    assert isinstance(out, LongVideoPipelineOutput)
    assert out.frames.shape == (1, 19, size, size, 3)
    assert out.shot_starts == [0, 5, 14]
    assert np.isfinite(out.frames).all() and 0 <= out.frames.min() and out.frames.max() <= 1
    path = tmp_path / "long.mp4"
    fps = model_pipe.default_settings()["fps"]
    write_videos([(path, out.frames[0])], fps=fps)
    frames = read_frames(path)
    assert frames.shape == (19, size, size, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["long.mp4"]  # no temporary file left behind


def test_causal_routing_first_shots_do_not_depend_on_last_caption(model_pipe):
    """The DAG property: shot 1's tokens never see later shots (self- or cross-attention), so it is unchanged; on
    Wan 2.2 A14B through both experts."""
    pipe = model_pipe

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


@pytest.mark.parametrize("model", T2V_MODELS)
def test_one_shot_equals_wan_pipeline_with_moc(model):
    """Wan 2.1, Wan 2.2 A14B (both experts, `guidance_scale_2`) and TI2V-5B (per-token timesteps) as WanPipeline."""
    config = MoCConfig(top_k=1, causal=True)
    size = {**SIZE, "height": size_of(model), "width": size_of(model)}
    scales = {"guidance_scale": 5.0} | ({"guidance_scale_2": 3.0} if model == "wan2.2-t2v-a14b" else {})
    wan = WanPipeline(**tiny_wan_components(model=model))
    wan.set_progress_bar_config(disable=True)
    apply_moc(wan, config)
    calls = []
    for t in pipeline_transformers(wan).values():
        t.register_forward_pre_hook(lambda m, args, calls=calls, t=t: calls.append(t))
    expected = wan(
        "a cat walks in the city",
        negative_prompt="blue",
        num_frames=9,
        generator=torch.Generator().manual_seed(3),
        **scales,
        **size,
    ).frames
    if model == "wan2.2-t2v-a14b":  # the check below covers both experts
        assert calls[0] is wan.transformer and calls[-1] is wan.transformer_2
    pipe = make_pipe(model=model)
    got = pipe(
        [Shot("a cat walks in the city", num_frames=9)],
        negative_prompt="blue",
        moc_config=config,
        generator=torch.Generator().manual_seed(3),
        **scales,
        **size,
    ).frames
    assert got.shape == expected.shape == (1, 9, size["height"], size["width"], 3)
    assert np.array_equal(got, expected)


# ------------------------------------------------------------------------------------------------ image start

#: The families that take a start image: Wan 2.1 I2V (CLIP tokens + masked first-frame latents), Wan 2.2 I2V-A14B
#: (the same without CLIP, two experts), Wan 2.2 TI2V-5B (the image latent as a clean first frame).
IMAGE_MODELS = ["wan2.1-i2v", "wan2.2-i2v-a14b", "wan2.2-ti2v-5b"]


def start_image(size: int) -> PIL.Image.Image:
    ramp = np.linspace(0, 255, size, dtype=np.uint8)
    return PIL.Image.fromarray(
        np.stack([np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size)), 255 - np.tile(ramp, (size, 1))], -1)
    )


@pytest.mark.parametrize("model", IMAGE_MODELS)
def test_one_shot_with_image_equals_the_stock_image_to_video_pipeline(model):
    config = MoCConfig(top_k=1, causal=True)
    size = size_of(model)
    image = start_image(size)
    scales = {"guidance_scale": 5.0} | ({"guidance_scale_2": 3.0} if model == "wan2.2-i2v-a14b" else {})
    # 512 text tokens: diffusers' Wan I2V processor assumes them when it splits image from text tokens.
    common = dict(negative_prompt="blue", height=size, width=size, num_inference_steps=2, max_sequence_length=512)
    stock = WanImageToVideoPipeline(**tiny_wan_components(model=model))
    stock.set_progress_bar_config(disable=True)
    apply_moc(stock, config)
    expected = stock(
        image=image, prompt="a cat walks", num_frames=9, generator=torch.Generator().manual_seed(3), **scales, **common
    ).frames
    got = make_pipe(model=model)(
        [Shot("a cat walks", num_frames=9)],
        image=image,
        moc_config=config,
        generator=torch.Generator().manual_seed(3),
        **scales,
        **common,
    ).frames
    assert got.shape == expected.shape == (1, 9, size, size, 3)
    assert np.array_equal(got, expected)


def _transformer_inputs(pipe) -> list[dict]:
    seen = []
    for t in pipeline_transformers(pipe).values():
        t.register_forward_pre_hook(lambda m, args, kwargs: seen.append(dict(kwargs)), with_kwargs=True)
    return seen


@pytest.mark.parametrize("model", IMAGE_MODELS)
def test_the_first_shot_starts_from_the_image_as_the_stock_pipeline_conditions_it(model):
    """Three shots (2, 3 and 3 latent frames): the first gets the stock pipeline's conditioning for a clip starting
    at the image, the later ones none; and shot 1 still never depends on a later caption."""
    size = size_of(model)
    image = start_image(size)
    pipe = make_pipe(model=model)
    settings = {k: pipe.config[k] for k in ("boundary_ratio", "expand_timesteps")}
    stock = WanImageToVideoPipeline(**dict(pipe.components), **settings)
    seen = _transformer_inputs(pipe)
    out = run(pipe, [*SHOTS, Shot(LAST, num_frames=9)], image=image, output_type="latent").frames
    first = seen[0]
    pixels = stock.video_processor.preprocess(image, height=size, width=size).to(dtype=torch.float32)
    prepared = stock.prepare_latents(pixels, 1, stock.vae.config.z_dim, size, size, 5, torch.float32, "cpu")
    if model == "wan2.2-ti2v-5b":
        _, condition, mask = prepared
        torch.testing.assert_close(first["hidden_states"][:, :, :1], condition, rtol=0, atol=0)
        torch.testing.assert_close(out[:, :, :1], condition, rtol=0, atol=0)  # the first latent frame is the image
        tokens = 4  # per latent frame at 64x64: (64 / 16 / 2) ** 2
        timestep = first["timestep"]
        assert timestep.shape == (1, 8 * tokens) and (timestep[:, :tokens] == 0).all()
        assert (timestep[:, tokens:] == pipe.scheduler.timesteps[0]).all()
    else:
        _, condition = prepared  # (1, 4 + 16, 2, h, w): mask, then latents of [image, 0, 0, 0, 0]
        torch.testing.assert_close(first["hidden_states"][:, 16:, :2], condition, rtol=0, atol=0)
        assert (first["hidden_states"][:, 16:20, 2:] == 0).all()  # later shots: no given frame
        embeds = first["encoder_hidden_states_image"]
        if model == "wan2.1-i2v":
            torch.testing.assert_close(embeds, stock.encode_image(image, "cpu"), rtol=0, atol=0)
        else:
            assert embeds is None
    again = run(
        pipe, [*SHOTS, Shot("an old man sits in a small room", num_frames=9)], image=image, output_type="latent"
    )
    assert torch.equal(again.frames[:, :, :5], out[:, :, :5]) and not torch.equal(again.frames, out)


def test_image_and_expert_arguments_are_checked(pipe):
    with pytest.raises(ValueError, match="text to video.*needs an image-to-video model"):
        run(pipe, SHOTS, image=start_image(32))
    with pytest.raises(ValueError, match="guidance_scale_2 is for two-expert models"):
        run(pipe, SHOTS, guidance_scale_2=3.0)
    i2v = make_pipe(model="wan2.1-i2v")
    with pytest.raises(ValueError, match="image is required: Wan 2.1 I2V"):
        run(i2v, SHOTS)
    with pytest.raises(TypeError, match="image must be a PIL image"):
        run(i2v, SHOTS, image="cat.png")


def test_defaults_follow_the_model_family():
    ti2v = _PIPES.get("wan2.2-ti2v-5b") or make_pipe(model="wan2.2-ti2v-5b")
    assert ti2v.default_settings()["fps"] == 24 and ti2v.family.title == "Wan 2.2 TI2V-5B"
    # 0.5 s: 13 frames at TI2V-5B's 24 fps (9 at Wan 2.1's 16).
    out = run(ti2v, [Shot("a cat", seconds=0.5)], output_type="latent", num_inference_steps=1)
    assert out.frames.shape[2] == 4
    a14b = make_pipe(model="wan2.2-t2v-a14b")
    assert a14b.default_settings()["guidance_scale_2"] == 3.0
    scales = []
    a14b._expert = lambda t, i, f=a14b._expert: scales.append(f(t, i)[1]) or f(t, i)
    run(a14b, SHOTS, output_type="latent", guidance_scale=None)
    assert scales == [4.0, 3.0]  # the model card's guidance for each expert
    scales.clear()
    run(a14b, SHOTS, output_type="latent", guidance_scale=6.0)
    assert scales == [6.0, 6.0]  # guidance_scale alone applies to both, as in WanPipeline


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
    import diffusers_moc.core.attention_processors.wan as wan

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


#: The `model_index.json` entries of each family's diffusers checkpoint on the Hub (Wan-AI/Wan2.1-T2V-1.3B-Diffusers,
#: Wan2.1-I2V-14B-480P-Diffusers, Wan2.2-T2V-A14B-Diffusers, Wan2.2-I2V-A14B-Diffusers, Wan2.2-TI2V-5B-Diffusers), as
#: far as they matter for loading: the saved tiny folders must have them too.
HUB_LAYOUT = {
    "wan2.1-t2v": {"_class_name": "WanPipeline", "transformer_2": [None, None]},
    "wan2.1-i2v": {
        "_class_name": "WanImageToVideoPipeline",
        "image_encoder": ["transformers", "CLIPVisionModel"],
        "image_processor": ["transformers", "CLIPImageProcessor"],
    },
    "wan2.2-t2v-a14b": {"_class_name": "WanPipeline", "boundary_ratio": 0.875, "expand_timesteps": False},
    "wan2.2-i2v-a14b": {"_class_name": "WanImageToVideoPipeline", "boundary_ratio": 0.9, "image_encoder": [None, None]},
    "wan2.2-ti2v-5b": {"_class_name": "WanPipeline", "boundary_ratio": None, "expand_timesteps": True},
}


@pytest.mark.parametrize("model", list(HUB_LAYOUT))
def test_from_pretrained_local_folders(model, tmp_path):
    """A folder written by save_pretrained (ours, or diffusers' pipeline's as on the Hub) loads into
    LongVideoPipeline, and its family is known from the folder before any weights load."""
    from diffusers import UniPCMultistepScheduler

    from diffusers_moc.model_families import family_of_source

    components = tiny_wan_components(model=model)
    if model.startswith("wan2.2"):  # the scheduler of the Wan 2.2 checkpoints
        components["scheduler"] = UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
        )
    image_to_video = model in ("wan2.1-i2v", "wan2.2-i2v-a14b")
    stock_cls = WanImageToVideoPipeline if image_to_video else WanPipeline
    stock_cls(**components).save_pretrained(tmp_path / "hub")
    LongVideoPipeline(**components).save_pretrained(tmp_path / "long")
    index_path = tmp_path / "hub" / "model_index.json"
    index = json.loads(index_path.read_text())
    if index.get("image_processor", [None])[0] is not None:
        # transformers without torchvision saves `CLIPImageProcessorPil`; load the class name the Hub folder has.
        index["image_processor"] = ["transformers", "CLIPImageProcessor"]
        index_path.write_text(json.dumps(index))
    assert {k: index[k] for k in HUB_LAYOUT[model]} == HUB_LAYOUT[model]
    image = start_image(size_of(model)) if image_to_video else None
    reference = run(LongVideoPipeline(**components), SHOTS, image=image, output_type="latent").frames
    for folder in ("hub", "long"):
        assert family_of_source(tmp_path / folder).name == model
        loaded = LongVideoPipeline.from_pretrained(tmp_path / folder)
        loaded.set_progress_bar_config(disable=True)
        assert isinstance(loaded, LongVideoPipeline) and loaded.family.name == model
        # Same weights, but freshly loaded tensors can take other BLAS paths: equal up to float rounding.
        got = run(loaded, SHOTS, image=image, output_type="latent").frames
        torch.testing.assert_close(got, reference, rtol=0, atol=1e-4)


def test_family_from_configs_names_each_family_and_refuses_the_others():
    from diffusers_moc.model_families import UnsupportedModelError, family_from_configs

    i2v = dict(in_channels=36, z_dim=16, image_dim=1280)
    assert family_from_configs(in_channels=16, z_dim=16).name == "wan2.1-t2v"
    assert family_from_configs(**i2v).name == "wan2.1-i2v"
    assert family_from_configs(in_channels=16, z_dim=16, has_transformer_2=True, boundary_ratio=0.875).name == (
        "wan2.2-t2v-a14b"
    )
    assert family_from_configs(in_channels=36, z_dim=16, has_transformer_2=True, boundary_ratio=0.9).name == (
        "wan2.2-i2v-a14b"
    )
    assert family_from_configs(in_channels=48, z_dim=48, expand_timesteps=True).name == "wan2.2-ti2v-5b"
    for kwargs, match in [
        ({**i2v, "pos_embed_seq_len": 514}, "first-last-frame .FLF2V. checkpoint is no supported family"),
        ({"in_channels": 20, "z_dim": 16}, "20 input channels and a 16-channel VAE"),
        ({"in_channels": 16, "z_dim": 16, "has_transformer_2": True}, "transformer_2 but no boundary_ratio"),
        ({"in_channels": 36, "z_dim": 16}, "without image_dim"),
    ]:
        with pytest.raises(UnsupportedModelError, match=match):
            family_from_configs(**kwargs)


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
