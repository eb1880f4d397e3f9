"""HunyuanVideo15LongVideoPipeline on tiny random-weight HunyuanVideo 1.5 components: stock equality, the DAG
property with captions in the joint stream, the text context, folders, callbacks, shot-by-shot decoding."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import HunyuanVideo15ImageToVideoPipeline, HunyuanVideo15Pipeline

from diffusers_moc import MoCConfig, apply_moc
from diffusers_moc.core.context import current_moc_context
from diffusers_moc.pipelines import LongVideoPipeline, LongVideoPipelineOutput, Shot
from diffusers_moc.pipelines.hunyuan_video15 import HunyuanVideo15LongVideoPipeline
from diffusers_moc.tiny_hunyuan_video15 import tiny_hunyuan_video15_components

T2V, I2V = "hunyuanvideo1.5-t2v", "hunyuanvideo1.5-i2v"
CAUSAL = MoCConfig(top_k=1, local_window=1, anchor_own_shot=True, causal=True, text_anchors="shot")
SIZE = {"height": 32, "width": 32, "num_inference_steps": 2}
#: Shorter Qwen captions than diffusers' 1000 tokens, for speed where no stock pipeline is compared.
FAST = {**SIZE, "max_sequence_length": 16}
SHOTS = [Shot("a cat walks in the city", num_frames=5), Shot('a dog runs on the beach "hello"', num_frames=9)]

_PIPES: dict[str, HunyuanVideo15LongVideoPipeline] = {}


def make_pipe(model: str) -> HunyuanVideo15LongVideoPipeline:
    pipe = HunyuanVideo15LongVideoPipeline(**tiny_hunyuan_video15_components(model=model))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(params=[T2V, I2V])
def pipe(request) -> HunyuanVideo15LongVideoPipeline:
    if request.param not in _PIPES:
        _PIPES[request.param] = make_pipe(request.param)
    return _PIPES[request.param]


def start_image(size: int = 32) -> PIL.Image.Image:
    ramp = np.linspace(0, 255, size, dtype=np.uint8)
    return PIL.Image.fromarray(
        np.stack([np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size)), 255 - ramp[None].repeat(size, 0)], -1)
    )


def run(pipe, shots, seed=0, **kw):
    args = {**FAST, "moc_config": CAUSAL, "global_prompt": "red car", "negative_prompt": "blue", **kw}
    if pipe.family.takes_image:
        args.setdefault("image", start_image())
    return pipe(shots, generator=torch.Generator().manual_seed(seed), **args)


# ------------------------------------------------------------------------------------------------ stock equality


@pytest.mark.parametrize("model", [T2V, I2V])
def test_one_shot_equals_the_stock_pipeline_with_moc(model):
    config = MoCConfig(top_k=1, causal=True)
    components = tiny_hunyuan_video15_components(model=model)
    stock_cls = HunyuanVideo15ImageToVideoPipeline if model == I2V else HunyuanVideo15Pipeline
    stock = stock_cls(**components)
    stock.set_progress_bar_config(disable=True)
    apply_moc(stock, config)
    extra = {"image": start_image()} if model == I2V else {"height": 32, "width": 32}
    generator = torch.Generator().manual_seed(3)
    steps = {"num_inference_steps": 2}
    expected = stock(prompt="a cat walks", negative_prompt="blue", num_frames=9, generator=generator, **steps, **extra)
    got = make_pipe(model)(
        [Shot("a cat walks", num_frames=9)],
        negative_prompt="blue",
        moc_config=config,
        generator=torch.Generator().manual_seed(3),
        **steps,
        **extra,
    )
    assert got.frames.shape == expected.frames.shape == (1, 9, 32, 32, 3)
    assert np.array_equal(got.frames, expected.frames)


# ------------------------------------------------------------------------------------------------ DAG, text context


def test_causal_routing_first_shots_do_not_depend_on_the_last_caption(pipe):
    """The DAG with captions in the joint stream: shots 1 and 2 never see shot 3's caption (same token count)."""

    def generate(last):
        final = {}

        def keep(p, i, t, kwargs):
            final["latents"] = kwargs["latents"]
            return {}

        out = run(pipe, [*SHOTS, Shot(last, num_frames=5)], callback_on_step_end=keep)
        return out, final["latents"]

    a, za = generate("the sea at night")
    b, zb = generate("an old man sits")
    assert a.shot_starts == b.shot_starts == [0, 5, 14]
    assert torch.equal(za[:, :, :5], zb[:, :, :5]) and not torch.allclose(za[:, :, 5:], zb[:, :, 5:])
    assert np.array_equal(a.frames[:, :14], b.frames[:, :14]) and not np.array_equal(a.frames[:, 14:], b.frames[:, 14:])


def test_each_caption_is_a_chunk_of_its_shot(pipe):
    seen = []

    def look(module, args, kwargs):
        seen.append((current_moc_context(), {k: v for k, v in kwargs.items() if "encoder" in k}))

    handle = pipe.transformer.register_forward_pre_hook(look, with_kwargs=True)
    try:
        run(pipe, [*SHOTS, Shot("a cat walks in the city", num_frames=5)], num_inference_steps=1)
    finally:
        handle.remove()
    (cond, text), (uncond, negative) = seen
    assert cond.shot_frames == (2, 3, 2) and cond.caption_shots == (-1, 0, 1, 2)
    qwen, byt5 = cond.caption_tokens
    assert qwen[1] == qwen[3] and byt5 == (0, 0, 1 + len('Text "hello". '), 0)  # only shot 1 has glyph text
    assert text["encoder_hidden_states"].shape[1] == sum(qwen) and text["encoder_attention_mask"].all()
    # The repeated caption is encoded once and placed twice: the same embeddings in shot 0's and shot 2's segment.
    starts = np.cumsum([0, *qwen])
    emb = text["encoder_hidden_states"]
    assert torch.equal(emb[:, starts[1] : starts[2]], emb[:, starts[3] : starts[4]])
    # The negative prompt: diffusers' padded text, one chunk for every shot.
    assert uncond.caption_shots is None and uncond.shot_frames == (2, 3, 2)
    assert negative["encoder_hidden_states"].shape[1] == 16


# ------------------------------------------------------------------------------------------------ pipeline mechanics


def test_from_pretrained_on_the_stock_folder_layout(tmp_path):
    for model, stock_cls in ((T2V, HunyuanVideo15Pipeline), (I2V, HunyuanVideo15ImageToVideoPipeline)):
        folder = tmp_path / model
        stock_cls(**tiny_hunyuan_video15_components(model=model)).save_pretrained(folder)
        # Loaded as LongVideoPipeline is on Wan: the folder's model decides the class.
        loaded = LongVideoPipeline.from_pretrained(folder)
        assert type(loaded) is HunyuanVideo15LongVideoPipeline
        loaded.set_progress_bar_config(disable=True)
        assert loaded.family.name == model
        expected = run(make_pipe(model), SHOTS, output_type="latent").frames
        # Same weights, but freshly loaded tensors can sit at unaligned addresses and take other BLAS paths (as on
        # Wan): equal up to float rounding.
        torch.testing.assert_close(run(loaded, SHOTS, output_type="latent").frames, expected, rtol=0, atol=1e-4)


def test_output_types_callbacks_decoding_and_checks(monkeypatch):
    pipe = make_pipe(T2V)
    decoded = []
    decode = pipe.vae.decode
    monkeypatch.setattr(pipe.vae, "decode", lambda z, **kw: decoded.append(z.shape[2]) or decode(z, **kw))
    steps = []
    out = run(pipe, SHOTS, output_type="pt", callback_on_step_end=lambda p, i, t, kw: steps.append(i) or {})
    assert isinstance(out, LongVideoPipelineOutput) and out.frames.shape == (1, 14, 3, 32, 32)
    assert decoded == [2, 3] and steps == [0, 1]  # shot by shot
    frames, starts = run(pipe, SHOTS, output_type="pil", return_dict=False)
    assert len(frames[0]) == 14 and starts == [0, 5]
    with pytest.raises(ValueError, match="text to video.*HunyuanVideo 1.5 I2V"):
        run(pipe, SHOTS, image=start_image())
    with pytest.raises(ValueError, match="guidance_scale_2 is for two-expert models"):
        run(pipe, SHOTS, guidance_scale_2=2.0)
    with pytest.raises(ValueError, match="height must be a positive multiple of 16"):
        run(pipe, SHOTS, height=40)
    with pytest.raises(ValueError, match="image is required"):
        run(make_pipe(I2V), SHOTS, image=None)
    assert pipe.default_settings() == {
        "num_frames": 121,
        "fps": 24,
        "num_inference_steps": 50,
        "height": 32,
        "width": 32,
        "guidance_scale": 6.0,
        "max_sequence_length": 1000,
    }
