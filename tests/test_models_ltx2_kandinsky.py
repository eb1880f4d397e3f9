"""LTX-2 and Kandinsky 5 with MoC through the generic processor: tiny transformers built from config, checked
against their stock selves, and their whole stock pipelines run from a prompt through tiny text encoders."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import _model_contract as contract
import PIL.Image
import pytest
import torch
from _model_contract import DENSE, SPARSE, run
from diffusers import Kandinsky5Transformer3DModel, LTX2VideoTransformer3DModel

from diffusers_moc import MoCConfig, apply_moc

# Each frame attends only to itself: what a frame's output depends on shows where the chunks are.
OWN_FRAME = MoCConfig(top_k=0, local_window=0, causal=False, backend="torch")


def _ltx2(**config):
    torch.manual_seed(0)
    model = LTX2VideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=16,
        audio_in_channels=4,
        audio_out_channels=4,
        audio_num_attention_heads=2,
        audio_attention_head_dim=4,
        audio_cross_attention_dim=8,
        num_layers=2,
        rope_double_precision=False,
        rope_type="split",
        **{"caption_channels": 16, **config},
    ).eval()
    g = torch.Generator().manual_seed(1)
    inputs = {
        "hidden_states": torch.randn(1, 3 * 4 * 4, 4, generator=g),  # 3 latent frames of 4x4, patchified
        "audio_hidden_states": torch.randn(1, 5, 4, generator=g),
        "encoder_hidden_states": torch.randn(1, 6, 16, generator=g),
        "audio_encoder_hidden_states": torch.randn(1, 6, 16, generator=g),
        "timestep": torch.tensor([500.0]),
        "num_frames": 3,
        "height": 4,
        "width": 4,
        "audio_num_frames": 5,
    }
    return model, inputs


def _kandinsky5(visual_cond: bool = False):
    """`visual_cond`: the image-to-video model, its input the latents, the start frame's and a mask (the inputs
    returned are then for the pipeline to replace)."""
    torch.manual_seed(0)
    model = Kandinsky5Transformer3DModel(
        in_visual_dim=4,
        visual_cond=visual_cond,
        in_text_dim=16,
        in_text_dim2=8,
        time_dim=16,
        out_visual_dim=4,
        patch_size=(1, 2, 2),
        model_dim=16,
        ff_dim=32,
        num_text_blocks=1,
        num_visual_blocks=2,
        axes_dims=(2, 2, 4),
    ).eval()
    # The modulations are zero-initialised (every block an identity); random ones make attention count.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "modulation" in name:
                param.normal_(std=0.2)
    g = torch.Generator().manual_seed(1)
    inputs = {
        "hidden_states": torch.randn(1, 3, 8, 8, 4, generator=g),  # channels last: 3 latent frames of 4x4 patches
        "encoder_hidden_states": torch.randn(1, 5, 16, generator=g),
        "timestep": torch.tensor([500.0]),
        "pooled_projections": torch.randn(1, 8, generator=g),
        "visual_rope_pos": [torch.arange(3), torch.arange(4), torch.arange(4)],
        "text_rope_pos": torch.arange(5),
    }
    return model, inputs


BUILDERS = {
    "ltx2": _ltx2,
    # LTX-2.3-style blocks run `LTX2PerturbedAttnProcessor`; STG on block 0 perturbs its self-attention.
    "ltx2_stg": lambda: (lambda m, i: (m, dict(i, spatio_temporal_guidance_blocks=[0])))(*_ltx2(perturbed_attn=True)),
    "kandinsky5": _kandinsky5,
}
TARGETS = {
    "ltx2": {"transformer_blocks.0.attn1", "transformer_blocks.1.attn1"},
    "ltx2_stg": {"transformer_blocks.0.attn1", "transformer_blocks.1.attn1"},
    "kandinsky5": {"visual_transformer_blocks.0.self_attention", "visual_transformer_blocks.1.self_attention"},
}


def test_stg_perturbation_reaches_the_stock_processor():
    """`LTX2Attention` passes on only the keyword arguments its processor's signature names: MoC shows the stock
    processor's, so the STG pass stays the STG pass (not silently the plain one)."""
    model, inputs = _ltx2(perturbed_attn=True)
    plain, stg = run(model, inputs), run(model, dict(inputs, spatio_temporal_guidance_blocks=[0]))
    assert not torch.equal(plain, stg)
    apply_moc(model, SPARSE)
    assert not torch.equal(run(model, inputs), run(model, dict(inputs, spatio_temporal_guidance_blocks=[0])))


@pytest.mark.parametrize("name", list(BUILDERS))
def test_full_density_equals_stock_bit_for_bit(name):
    contract.full_density_equals_stock(BUILDERS[name])


@pytest.mark.parametrize("name", list(BUILDERS))
def test_sparse_moc_changes_the_output_and_backends_agree(name):
    contract.sparse_changes_output_and_backends_agree(BUILDERS[name])


@pytest.mark.parametrize("name", list(BUILDERS))
def test_apply_takes_the_video_self_attention_and_remove_restores_stock(name):
    contract.apply_and_remove(BUILDERS[name], TARGETS[name])


def _frames(out: torch.Tensor, name: str) -> torch.Tensor:
    """The output as (frames, ...): LTX-2's is patchified (B, F*H*W, C), Kandinsky 5's (F, H, W, C)."""
    return out.reshape(3, -1) if name == "ltx2" else out


@pytest.mark.parametrize("name", ["ltx2", "kandinsky5"])
def test_chunks_are_whole_latent_frames(name):
    """With each frame attending only to itself, changing the last latent frame leaves the others' outputs as they
    were: the stream is in (frame, row, column) order and every chunk is one whole frame. (LTX-2's audio-video
    cross-attention, which mixes frames through the audio, is off.)"""
    model, inputs = BUILDERS[name]()
    if name == "ltx2":
        inputs["isolate_modalities"] = True
    apply_moc(model, OWN_FRAME)
    out = _frames(run(model, inputs), name)
    changed = dict(inputs)
    hidden = inputs["hidden_states"].clone()
    if name == "ltx2":
        hidden[:, 32:] += 1.0  # tokens of frame 2
    else:
        hidden[:, 2] += 1.0
    changed["hidden_states"] = hidden
    other = _frames(run(model, changed), name)
    assert torch.equal(other[:2], out[:2]) and not torch.allclose(other[2], out[2])
    layer = sorted(TARGETS[name])[0]
    assert model.get_submodule(layer).processor.hook.last_facts.layout.sizes == (16, 16, 16)


def test_ltx2_grid_from_video_coords_alone():
    model, inputs = _ltx2()
    apply_moc(model, SPARSE)
    expected = run(model, inputs)
    coords = model.rope.prepare_video_coords(1, 3, 4, 4, torch.device("cpu"))
    without_grid = {k: v for k, v in inputs.items() if k not in ("num_frames", "height", "width")}
    torch.testing.assert_close(run(model, dict(without_grid, video_coords=coords)), expected, atol=0, rtol=0)
    with pytest.raises(ValueError, match="num_frames, height and width"):
        run(model, without_grid)


def test_ltx2_video_self_attention_mask_is_refused_by_name():
    model, inputs = _ltx2()
    apply_moc(model, SPARSE)
    with pytest.raises(NotImplementedError, match="attn_mask"):
        run(model, dict(inputs, video_self_attention_mask=torch.ones(1, 48, 48)))


def test_kandinsky5_nabla_is_refused_by_name():
    model, inputs = _kandinsky5()
    apply_moc(model, SPARSE)
    with pytest.raises(NotImplementedError, match="NABLA"):
        run(model, dict(inputs, sparse_params={"to_fractal": True, "sta_mask": None, "P": 0.9}))


def test_copies_run_their_own_weights():
    model, inputs = _ltx2(perturbed_attn=True)
    inputs["spatio_temporal_guidance_blocks"] = [0]
    apply_moc(model, SPARSE)
    sparse = run(model, inputs)
    restored = pickle.loads(pickle.dumps(model))
    assert torch.equal(run(restored, inputs), sparse)
    with torch.no_grad():
        restored.transformer_blocks[1].attn1.to_q.weight.mul_(2)
    assert not torch.equal(run(restored, inputs), sparse)


@pytest.mark.parametrize("name", ["ltx2", "kandinsky5"])
def test_regional_compile_equals_eager_in_one_graph(name):
    # Kandinsky 5 rounds its rotated queries and keys to bfloat16 on purpose (kept by inductor only when asked).
    contract.regional_compile_equals_eager(BUILDERS[name], backend="aot_eager", precision_casts=True)


def test_kandinsky5_context_parallelism_is_refused_by_name():
    """diffusers has no `_cp_plan` for Kandinsky 5 (`enable_parallelism` without a plan raises); under a plan of the
    user's own, MoC refuses rather than guess how the stream is split."""
    model, inputs = _kandinsky5()
    assert Kandinsky5Transformer3DModel._cp_plan is None
    apply_moc(model, SPARSE)
    cp = SimpleNamespace(ring_degree=1, ulysses_degree=2, ulysses_anything=False)
    model.visual_transformer_blocks[0].self_attention.processor._parallel_config = SimpleNamespace(
        context_parallel_config=cp
    )
    with pytest.raises(NotImplementedError, match="Kandinsky5Transformer3DModel has no context-parallel plan"):
        run(model, inputs)


# ---------------------------------------------------------------------------------------------- pipelines
def _start_image() -> PIL.Image.Image:
    pixels = torch.randint(0, 256, (32, 32, 3), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    return PIL.Image.fromarray(pixels.numpy())


def _ltx2_pipeline(image_to_video: bool = False):
    """`LTX2Pipeline` (or, from a start image, `LTX2ImageToVideoPipeline`) of tiny components built here: a Gemma 3
    text encoder from config with the word-level tokenizer of `diffusers_moc.tiny`, video and audio VAEs,
    connectors, vocoder."""
    from diffusers import (
        AutoencoderKLLTX2Audio,
        AutoencoderKLLTX2Video,
        FlowMatchEulerDiscreteScheduler,
        LTX2ImageToVideoPipeline,
        LTX2Pipeline,
    )
    from diffusers.pipelines.ltx2 import LTX2TextConnectors
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    from diffusers_moc.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    text = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=64,
        sliding_window=16,
    )
    vision = SiglipVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=8, patch_size=4
    )
    text_encoder = Gemma3ForConditionalGeneration(Gemma3Config(text_config=text, vision_config=vision)).eval()
    transformer, _ = _ltx2(caption_channels=32)
    torch.manual_seed(0)
    connectors = LTX2TextConnectors(
        caption_channels=32,
        text_proj_in_factor=3,  # the text encoder's layers + 1
        video_connector_num_attention_heads=4,
        video_connector_attention_head_dim=8,
        video_connector_num_layers=1,
        video_connector_num_learnable_registers=None,
        audio_connector_num_attention_heads=4,
        audio_connector_attention_head_dim=8,
        audio_connector_num_layers=1,
        audio_connector_num_learnable_registers=None,
        connector_rope_base_seq_len=32,
        rope_theta=10000.0,
        rope_double_precision=False,
        causal_temporal_positioning=False,
        rope_type="split",
    )
    torch.manual_seed(0)
    vae = AutoencoderKLLTX2Video(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8,),
        decoder_block_out_channels=(8,),
        layers_per_block=(1,),
        decoder_layers_per_block=(1, 1),
        spatio_temporal_scaling=(True,),
        decoder_spatio_temporal_scaling=(True,),
        decoder_inject_noise=(False, False),
        downsample_type=("spatial",),
        upsample_residual=(False,),
        upsample_factor=(1,),
        timestep_conditioning=False,
        patch_size=1,
        patch_size_t=1,
        encoder_causal=True,
        decoder_causal=False,
    )
    vae.use_framewise_encoding = vae.use_framewise_decoding = False
    torch.manual_seed(0)
    audio_vae = AutoencoderKLLTX2Audio(
        base_channels=4,
        output_channels=2,
        ch_mult=(1,),
        num_res_blocks=1,
        attn_resolutions=None,
        in_channels=2,
        resolution=32,
        latent_channels=2,
        norm_type="pixel",
        causality_axis="height",
        dropout=0.0,
        mid_block_add_attention=False,
        sample_rate=16000,
        mel_hop_length=160,
        is_causal=True,
        mel_bins=8,
    )
    torch.manual_seed(0)
    vocoder = LTX2Vocoder(
        in_channels=16,
        hidden_channels=32,
        out_channels=2,
        upsample_kernel_sizes=[4, 4],
        upsample_factors=[2, 2],
        resnet_kernel_sizes=[3],
        resnet_dilations=[[1, 3, 5]],
        leaky_relu_negative_slope=0.1,
        output_sampling_rate=16000,
    )
    pipe = (LTX2ImageToVideoPipeline if image_to_video else LTX2Pipeline)(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        audio_vae=audio_vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        connectors=connectors,
        transformer=transformer,
        vocoder=vocoder,
    )
    call = {"prompt": "a red car drives along a street", "negative_prompt": "", "guidance_scale": 1.0}
    if image_to_video:
        call["image"] = _start_image()  # a PIL image: the LTX-2 pipeline re-compresses it as trained
        # One transformer pass per step: the guidance passes (spatio-temporal, modality) are the text-to-video test's.
        call.update(stg_scale=0.0, audio_stg_scale=0.0, modality_scale=1.0, audio_modality_scale=1.0)
    return pipe, dict(call, num_frames=9, frame_rate=25.0, max_sequence_length=16)


#: Vocabulary of the tiny Qwen tokenizer trained on Kandinsky 5's prompt template: at this size the template's system
#: turn (up to the user's text) is the 128 tokens the pipeline drops (`prompt_template_encode_start_idx`, fixed), so
#: the caption rows are the prompt's, as they are meant to be.
_KANDINSKY5_QWEN_VOCAB = 582
_KANDINSKY5_PROMPT = "a dog runs on the beach"


def _kandinsky5_text_encoders(pipe) -> dict:
    """The components `pipe` encodes its prompt with: a tiny Qwen2.5-VL with its processor, the Qwen tokenizer
    trained on the pipeline's own prompt template, and a tiny CLIP text model, at the widths its transformer reads."""
    from _tiny_text_encoders import tiny_clip_text, tiny_qwen2_5_vl, tiny_qwen2_tokenizer, tiny_qwen_vl_processor
    from transformers import Qwen2_5_VLProcessor

    system_turn = pipe.prompt_template.split("{}")[0]
    tokenizer = tiny_qwen2_tokenizer([system_turn], vocab_size=_KANDINSKY5_QWEN_VOCAB)
    clip_tokenizer, clip = tiny_clip_text(hidden_size=pipe.transformer.config.in_text_dim2)
    return {
        "text_encoder": tiny_qwen2_5_vl(tokenizer, hidden_size=pipe.transformer.config.in_text_dim),
        "tokenizer": tiny_qwen_vl_processor(Qwen2_5_VLProcessor, tokenizer, patch_size=14),
        "text_encoder_2": clip,
        "tokenizer_2": clip_tokenizer,
    }


def _kandinsky5_pipeline(image_to_video: bool = False):
    """`Kandinsky5T2VPipeline` (or, from a start image, `Kandinsky5I2VPipeline`) of tiny components built here,
    run from a prompt: Qwen2.5-VL and CLIP text encoders (`_kandinsky5_text_encoders`), a HunyuanVideo VAE."""
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        Kandinsky5I2VPipeline,
        Kandinsky5T2VPipeline,
    )

    torch.manual_seed(0)
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3,
        out_channels=3,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
        latent_channels=4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        norm_num_groups=4,
    ).eval()
    transformer, _ = _kandinsky5(visual_cond=image_to_video)
    pipe = (Kandinsky5I2VPipeline if image_to_video else Kandinsky5T2VPipeline)(
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
    )
    # The constructor sets the prompt template the Qwen tokenizer is trained on, so the text encoders come after it.
    pipe.register_modules(**_kandinsky5_text_encoders(pipe))
    call = {"prompt": _KANDINSKY5_PROMPT, "guidance_scale": 1.0}
    if image_to_video:
        # 5 latent frames: the pipeline renormalises the first 4 to the statistics of those after them (NaN if none).
        return pipe, dict(call, image=_start_image(), num_frames=17)
    return pipe, dict(call, num_frames=9)  # 3 latent frames


def test_kandinsky5_caption_rows_are_the_prompt_turn():
    """The pipeline drops the first 128 Qwen tokens, meant to be the template's system turn: the tiny tokenizer is
    trained on the template to that length, so what reaches the transformer is the prompt and the turn's end."""
    pipe, call = _kandinsky5_pipeline()
    qwen, clip, cu_seqlens = pipe.encode_prompt(call["prompt"])
    num_tokens = len(pipe.tokenizer.tokenizer(call["prompt"] + "<|im_end|>")["input_ids"])
    assert qwen.shape == (1, num_tokens, pipe.transformer.config.in_text_dim)
    assert cu_seqlens.tolist() == [0, num_tokens]
    assert clip.shape == (1, pipe.transformer.config.in_text_dim2)


PIPELINES = {
    "LTX2Pipeline": _ltx2_pipeline,
    "LTX2ImageToVideoPipeline": lambda: _ltx2_pipeline(image_to_video=True),
    "Kandinsky5T2VPipeline": _kandinsky5_pipeline,
    "Kandinsky5I2VPipeline": lambda: _kandinsky5_pipeline(image_to_video=True),
}


@pytest.mark.parametrize("build", list(PIPELINES.values()), ids=list(PIPELINES))
def test_pipeline_with_moc_equals_stock_at_full_density_and_differs_sparse(build):
    pipe, call = build()

    def frames():
        generator = torch.Generator().manual_seed(0)
        out = pipe(**call, height=32, width=32, num_inference_steps=2, output_type="pt", generator=generator)
        return out.frames

    stock = frames()
    apply_moc(pipe, DENSE)
    assert torch.equal(frames(), stock)
    apply_moc(pipe, SPARSE)
    assert not torch.allclose(frames(), stock, atol=1e-3)
