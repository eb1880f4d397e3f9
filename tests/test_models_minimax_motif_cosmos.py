"""MoC on MiniMax-H3, Motif-Video and Cosmos 3: tiny transformers built from config, checked against their stock
selves (the pattern of test_generic_models.py), and their stock pipelines run with `apply_moc`."""

from __future__ import annotations

import os
import sys

import _model_contract as contract
import pytest
import torch
from _model_contract import DENSE, SPARSE, run

from diffusers_moc import MoCConfig, apply_moc
from diffusers_moc.core.streams import minimax_h3_grid

sys.path.insert(0, os.path.dirname(__file__))
from _cp_worker import tiny_minimax_h3  # noqa: E402


def _minimax_h3():
    model, inputs, _ = tiny_minimax_h3()
    return model, inputs


def _motif_video(decoder_layers: int = 1, single_layers: int = 2):
    """Dual- and single-stream blocks with text cross-attention, a decoder block, and a caption with 2 padded
    tokens."""
    from diffusers import MotifVideoTransformer3DModel

    torch.manual_seed(0)
    model = MotifVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=1,
        num_single_layers=single_layers,
        num_decoder_layers=decoder_layers,
        mlp_ratio=2.0,
        text_embed_dim=16,
        rope_axes_dim=(4, 6, 6),
        enable_text_cross_attention_dual=True,
        enable_text_cross_attention_single=True,
    ).eval()
    g = torch.Generator().manual_seed(1)
    inputs = {
        "hidden_states": torch.randn(1, 4, 3, 8, 8, generator=g),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 6, 16, generator=g),
        "encoder_attention_mask": torch.tensor([[1, 1, 1, 1, 0, 0]]),
    }
    return model, inputs


def _cosmos3(sound: bool = True):
    """Grouped-query heads (2 query heads, 1 key/value head); 5 text tokens, 3 frames of 4x4 patches, 5 sound tokens."""
    from diffusers import Cosmos3OmniTransformer

    torch.manual_seed(0)
    model = Cosmos3OmniTransformer(
        head_dim=16,
        hidden_size=32,
        intermediate_size=32,
        latent_channel=4,
        latent_patch_size=2,
        num_attention_heads=2,
        num_hidden_layers=2,
        num_key_value_heads=1,
        patch_latent_dim=16,
        vocab_size=32,
        rope_axes_dim=(4, 2, 2),
        sound_dim=4,
        sound_gen=sound,
    ).eval()
    g = torch.Generator().manual_seed(1)
    text, frames, video, sounds = 5, 3, 48, 5 if sound else 0
    length = text + video + sounds
    vision = torch.arange(text, text + video)
    inputs = {
        "input_ids": torch.randint(0, 32, (text,), generator=g),
        "text_indexes": torch.arange(text),
        "position_ids": torch.arange(length).expand(3, length).clone(),
        "und_len": text,
        "sequence_length": length,
        "vision_tokens": [torch.randn(1, 4, frames, 8, 8, generator=g)],
        "vision_token_shapes": [(frames, 4, 4)],
        "vision_sequence_indexes": vision,
        "vision_mse_loss_indexes": vision,
        "vision_timesteps": torch.full((video,), 500.0),
        "vision_noisy_frame_indexes": [torch.arange(frames)],
    }
    if sound:
        audio = torch.arange(text + video, length)
        inputs.update(
            sound_tokens=[torch.randn(4, sounds, generator=g)],
            sound_token_shapes=[(sounds, 1, 1)],
            sound_sequence_indexes=audio,
            sound_mse_loss_indexes=audio,
            sound_timesteps=torch.full((sounds,), 500.0),
            sound_noisy_frame_indexes=[torch.arange(sounds)],
        )
    return model, inputs


BUILDERS = {
    "minimax_h3": _minimax_h3,
    "motif_video": _motif_video,
    "motif_video_no_decoder": lambda: _motif_video(decoder_layers=0),
    "motif_video_compile": lambda: _motif_video(decoder_layers=0, single_layers=1),
    "cosmos3": _cosmos3,
    "cosmos3_no_sound": lambda: _cosmos3(sound=False),
}
# The attention modules MoC must take over in each tiny model (everything else keeps its stock processor).
TARGETS = {
    "minimax_h3": {"transformer_blocks.0.attn", "transformer_blocks.1.attn"},
    "motif_video": {
        "transformer_blocks.0.attn",
        "single_transformer_blocks.0.attn",
        "single_transformer_blocks.1.attn",
    },
    "motif_video_no_decoder": {
        "transformer_blocks.0.attn",
        "single_transformer_blocks.0.attn",
        "single_transformer_blocks.1.attn",
    },
    "motif_video_compile": {"transformer_blocks.0.attn", "single_transformer_blocks.0.attn"},
    "cosmos3": {"layers.0.self_attn", "layers.1.self_attn"},
    "cosmos3_no_sound": {"layers.0.self_attn", "layers.1.self_attn"},
}
# One regional compile per model (the slowest tests).
# One single-stream block for Motif-Video: in stock diffusers too, a second one recompiles (its input is a slice of
# the first one's output, other strides), and so do decoder blocks (no mask).
COMPILED = ["minimax_h3", "motif_video_compile", "cosmos3"]


@pytest.mark.parametrize("name", list(BUILDERS))
def test_full_density_equals_stock_bit_for_bit(name):
    contract.full_density_equals_stock(BUILDERS[name])


@pytest.mark.parametrize("name", list(BUILDERS))
def test_sparse_moc_changes_the_output_and_backends_agree(name):
    contract.sparse_changes_output_and_backends_agree(BUILDERS[name])


@pytest.mark.parametrize("name", list(BUILDERS))
def test_apply_takes_the_video_self_attention_and_remove_restores_stock(name):
    contract.apply_and_remove(BUILDERS[name], TARGETS[name])


@pytest.mark.parametrize("name", COMPILED)
def test_regional_compile_equals_eager_in_one_graph(name):
    contract.regional_compile_equals_eager(BUILDERS[name], backend="aot_eager")


# ---------------------------------------------------------------------------------------------- MiniMax-H3
@pytest.mark.parametrize(
    ("anchors", "audio_latents"),
    [((), 3), (("first",), 3), (("first", "last"), 3), (("first",), 0), (("last",), 0)],
)
def test_minimax_h3_grid_is_the_generated_video_at_the_end_of_the_packed_sequence(anchors, audio_latents):
    # Without audio rows a keyframe sits right before the video, at the time of its first or last frame: it stays
    # with the conditions, not a fourth frame.
    model, inputs, _ = tiny_minimax_h3(anchors, audio_latents)
    assert minimax_h3_grid(model, (), inputs) == (3, 4, 4)
    apply_moc(model, SPARSE)
    run(model, inputs)
    facts = model.transformer_blocks[0].attn.processor.hook.last_facts
    assert facts.layout.sizes == (16, 16, 16)


def test_minimax_h3_without_video_rows_at_the_end_is_refused():
    model, inputs, _ = tiny_minimax_h3()
    video = inputs["video_indices"]
    inputs["video_indices"] = video - 1  # the last row is no video row
    with pytest.raises(ValueError, match="close the packed sequence"):
        minimax_h3_grid(model, (), inputs)


# ---------------------------------------------------------------------------------------------- Motif-Video
def test_motif_video_padded_caption_tokens_change_nothing_in_the_video():
    # MoC drops the padded caption tokens as keys, as the stock mask does: their values cannot reach the video.
    model, inputs = _motif_video()
    apply_moc(model, SPARSE)
    out = run(model, inputs)
    inputs["encoder_hidden_states"][:, 4:] = 7.0
    assert torch.equal(run(model, inputs), out)


def test_generic_processor_refuses_a_mask_that_is_not_a_key_padding_mask():
    model, inputs = _motif_video()
    apply_moc(model, SPARSE)
    model(**inputs)  # the forward's facts
    processor = model.transformer_blocks[0].attn.processor
    processor._layer, processor._attended = model.transformer_blocks[0].attn, False
    query = torch.randn(1, 54, 2, 16)
    full = torch.ones(1, 1, 54, 54, dtype=torch.bool)
    with pytest.raises(NotImplementedError, match="attn_mask"):
        processor.attend(query, query, query, full, 0.0, False, None, None, None)


# ---------------------------------------------------------------------------------------------- Cosmos 3
def test_cosmos3_layout_is_text_video_frames_then_sound():
    model, inputs = _cosmos3()
    apply_moc(model, SPARSE)
    run(model, inputs)
    facts = model.layers[0].self_attn.processor.hook.last_facts
    assert facts.grid == (3, 4, 4) and facts.layout.sizes == (16, 16, 16)


def test_cosmos3_with_several_vision_items_is_refused():
    model, inputs = _cosmos3(sound=False)
    apply_moc(model, SPARSE)
    inputs["vision_token_shapes"] = [(1, 4, 4), (2, 4, 4)]
    with pytest.raises(NotImplementedError, match="one video per Cosmos 3 sequence, but it has 2"):
        run(model, inputs)


# ---------------------------------------------------------------------------------------------- pipelines
def _pipeline_frames(pipe, config: MoCConfig | None, **call) -> torch.Tensor:
    if config is not None:
        apply_moc(pipe, config)
    generator = torch.Generator().manual_seed(0)
    return pipe(num_inference_steps=2, generator=generator, output_type="pt", **call).frames


def _motif_video_transformer(image_embed_dim: int | None = None):
    """A tiny `MotifVideoTransformer3DModel` (one dual- and one single-stream block) reading the tiny Wan VAE's 16
    latent channels and the tiny T5Gemma 2's 16-wide caption; with `image_embed_dim`, image embeddings too."""
    from diffusers import MotifVideoTransformer3DModel

    torch.manual_seed(0)
    return MotifVideoTransformer3DModel(
        in_channels=33,  # latents, first-frame condition, its mask
        out_channels=16,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=1,
        num_single_layers=1,
        mlp_ratio=2.0,
        text_embed_dim=16,
        image_embed_dim=image_embed_dim,
        rope_axes_dim=(4, 6, 6),
    ).eval()


def _t5gemma2_encoder(vocab_size: int):
    """A tiny T5Gemma 2 encoder from config: a one-layer text model over the word-level tokenizer's vocabulary and
    a one-layer SigLIP vision tower (8x8 pixels in 4x4 patches: 4 image tokens of width 8)."""
    from transformers import SiglipVisionConfig, T5Gemma2EncoderConfig, T5Gemma2TextConfig
    from transformers.models.t5gemma2.modeling_t5gemma2 import T5Gemma2Encoder

    text = T5Gemma2TextConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=64,
        sliding_window=16,
        query_pre_attn_scalar=8,
    )
    text.dropout_rate = 0.0  # the full T5Gemma 2 config sets it on its encoder's text config
    vision = SiglipVisionConfig(
        hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=8, patch_size=4
    )
    torch.manual_seed(0)
    return T5Gemma2Encoder(T5Gemma2EncoderConfig(text_config=text, vision_config=vision)).eval()


def test_motif_video_pipeline_runs_with_moc():
    """Stock `MotifVideoPipeline` from a prompt, with classifier-free guidance: the word-level tokenizer of
    `diffusers_moc.tiny` and a tiny T5Gemma 2 encoder built here encode the prompt and the negative prompt, padded to
    8 tokens, the two branches with different numbers of padded caption tokens; a tiny Wan VAE decodes. 9 frames of
    32x32 pixels: 3 latent frames of 2x2 tokens."""
    from diffusers import ClassifierFreeGuidance, FlowMatchEulerDiscreteScheduler, MotifVideoPipeline

    from diffusers_moc.tiny import _tiny_vae, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    pipe = MotifVideoPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_tiny_vae(16),
        text_encoder=_t5gemma2_encoder(len(tokenizer)),
        tokenizer=tokenizer,
        transformer=_motif_video_transformer(),
        guider=ClassifierFreeGuidance(guidance_scale=5.0),
    )
    pipe.set_progress_bar_config(disable=True)
    call = {
        "prompt": "a dog runs on the beach",  # 7 tokens with the end of text
        "negative_prompt": "a small old car",  # 5
        "height": 32,
        "width": 32,
        "num_frames": 9,
        "max_sequence_length": 8,
    }
    _, _, mask, negative_mask = pipe.encode_prompt(call["prompt"], call["negative_prompt"], max_sequence_length=8)
    assert mask.sum().item() == 7 and negative_mask.sum().item() == 5
    stock = _pipeline_frames(pipe, None, **call)
    assert torch.equal(_pipeline_frames(pipe, DENSE, **call), stock)
    assert not torch.allclose(_pipeline_frames(pipe, SPARSE, **call), stock, atol=1e-3)
    assert pipe.transformer.transformer_blocks[0].attn.processor.hook.last_facts.grid == (3, 2, 2)


def test_motif_video_image_to_video_pipeline_runs_with_moc():
    """Stock `MotifVideoImage2VideoPipeline` from a start image: a tiny T5Gemma 2 encoder built here encodes the
    caption and, through its SigLIP tower, the image embeddings the transformer puts before the caption; the start
    frame's latents condition the video. 9 frames of 32x32 pixels: 3 latent frames of 2x2 tokens."""
    import PIL.Image
    from diffusers import (
        ClassifierFreeGuidance,
        FlowMatchEulerDiscreteScheduler,
        MotifVideoImage2VideoPipeline,
    )
    from transformers import SiglipImageProcessor

    from diffusers_moc.tiny import _tiny_vae, tiny_tokenizer

    tokenizer = tiny_tokenizer()
    text_encoder = _t5gemma2_encoder(len(tokenizer))
    transformer = _motif_video_transformer(image_embed_dim=8)
    pipe = MotifVideoImage2VideoPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_tiny_vae(16),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        guider=ClassifierFreeGuidance(guidance_scale=5.0),
        feature_extractor=SiglipImageProcessor(size={"height": 8, "width": 8}),
    )
    pipe.set_progress_bar_config(disable=True)
    pixels = torch.randint(0, 256, (32, 32, 3), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)
    call = {
        "image": PIL.Image.fromarray(pixels.numpy()),
        "prompt": "a dog runs on the beach",
        "height": 32,
        "width": 32,
        "num_frames": 9,
        "max_sequence_length": 8,
    }
    stock = _pipeline_frames(pipe, None, **call)
    assert torch.equal(_pipeline_frames(pipe, DENSE, **call), stock)
    assert not torch.allclose(_pipeline_frames(pipe, SPARSE, **call), stock, atol=1e-3)
    assert transformer.transformer_blocks[0].attn.processor.hook.last_facts.grid == (3, 2, 2)


def test_minimax_h3_modular_pipeline_runs_with_moc():
    """The stock `MiniMaxH3ModularPipeline` of `MiniMaxH3Blocks`, text to video and audio (`t2va`) from the prompt
    through both decoders, on tiny components built here (`_tiny_minimax_h3`): its Qwen3-VL conditioner, the video
    and audio VAEs, both schedulers. The shortest video it makes, 5 s at 24 fps on a 64x64 canvas: 37 latent frames
    of 2x2 patches, 207 audio latents a stereo channel. 3 steps, i.e. 2 transformer calls."""
    from _tiny_minimax_h3 import AUDIO_HOP_LENGTH, AUDIO_SAMPLING_RATE, tiny_minimax_h3_pipeline

    pipe = tiny_minimax_h3_pipeline()
    pipe.set_progress_bar_config(disable=True)
    call = {"prompt": "a dog runs on the beach", "height": 64, "width": 64, "num_frames": 124}
    outputs = ["videos", "audio", "sampling_rate", "prompt_embeds"]

    def generate(config: MoCConfig | None) -> dict:
        if config is not None:
            apply_moc(pipe, config)
        generator = torch.Generator().manual_seed(0)
        return pipe(**call, num_inference_steps=3, generator=generator, output_type="pt", output=outputs)

    stock = generate(None)
    assert stock["videos"].shape == (1, 124, 3, 64, 64)
    assert stock["audio"].shape == (1, 2, 207 * AUDIO_HOP_LENGTH)
    assert stock["sampling_rate"] == AUDIO_SAMPLING_RATE
    # The caption rows come from the conditioner: one per token of the verbatim prompt, at the transformer's width.
    num_tokens = len(pipe.tokenizer(call["prompt"], add_special_tokens=False)["input_ids"])
    assert stock["prompt_embeds"].shape == (1, num_tokens, pipe.transformer.config.text_dim)

    dense = generate(DENSE)
    assert torch.equal(dense["videos"], stock["videos"]) and torch.equal(dense["audio"], stock["audio"])
    assert pipe.transformer.transformer_blocks[0].attn.processor.hook.last_facts.grid == (37, 2, 2)

    sparse = generate(SPARSE)
    # MoC routes the one packed sequence, so both modalities decoded from it change. The tiny random audio VAE
    # decodes to a waveform of ~0.15 peak, hence its smaller tolerance (the same 1e-3 relative to its scale).
    assert not torch.allclose(sparse["videos"], stock["videos"], atol=1e-3)
    assert not torch.allclose(sparse["audio"], stock["audio"], atol=1e-4)


def test_minimax_h3_reference_workflow_runs_with_moc_on_transformer_ref():
    """`ref2va` runs against the pipeline's second checkpoint, `transformer_ref`: `apply_moc(pipe)` puts MoC there
    too, the image reference's rows joining the anchor chunk before the video. Full density equals stock; sparse
    differs; `remove_moc` gives the stock pipeline back."""
    from _tiny_minimax_h3 import tiny_minimax_h3_pipeline, tiny_minimax_h3_transformer
    from diffusers.modular_pipelines.minimax_h3.references import MiniMaxH3ImageReference

    from diffusers_moc import remove_moc

    pipe = tiny_minimax_h3_pipeline()
    # A reference is encoded at a short edge of its own (2048 released); 64 keeps it a few tiny-VAE patches.
    pipe.update_components(transformer_ref=tiny_minimax_h3_transformer(seed=5), reference_image_short_edge=64)
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(2))
    call = {"prompt": "a dog", "references": [MiniMaxH3ImageReference(image=image)], "height": 64, "width": 64}

    def generate() -> torch.Tensor:
        out = pipe(
            **call,
            num_frames=124,
            num_inference_steps=3,
            generator=torch.Generator().manual_seed(0),
            output_type="pt",
            output=["videos"],
        )
        return out["videos"]

    stock = generate()
    apply_moc(pipe, DENSE)
    assert {type(b.attn.processor).__name__ for b in pipe.transformer_ref.transformer_blocks} == {
        "MoCDispatchAttnProcessor"
    }
    assert torch.equal(generate(), stock)
    assert pipe.transformer_ref.transformer_blocks[0].attn.processor.hook.last_facts.grid == (37, 2, 2)
    apply_moc(pipe, SPARSE)
    assert not torch.allclose(generate(), stock, atol=1e-3)
    remove_moc(pipe)
    assert torch.equal(generate(), stock)


# Cosmos 3's chat template, rendered as word-level tokens: each message between `<|im_start|>` and `<|im_end|>`.
_COSMOS3_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|> {{ message['content'] }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>{% endif %}"
)


def _cosmos3_tokenizer():
    """A word-level fast tokenizer standing in for Cosmos 3's Qwen one, trained here: a chat template, and the
    `<|vision_start|>` token the pipeline appends to open the generation."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from diffusers_moc.tiny import _WORDS

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    special = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "<|vision_start|>"]
    tok.train_from_iterator([_WORDS], trainer=trainers.WordLevelTrainer(special_tokens=special))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<|im_end|>",
        chat_template=_COSMOS3_CHAT_TEMPLATE,
    )


def test_cosmos3_omni_pipeline_text_to_video_runs_with_moc():
    """Stock `Cosmos3OmniPipeline`, text to video with classifier-free guidance: a tiny Wan 2.1 VAE, a tokenizer built
    here (the transformer reads token ids, there is no separate text encoder), no safety checker, no sound. 9 frames
    of 64x64 pixels: 3 latent frames of 4x4 patches."""
    from diffusers import Cosmos3OmniPipeline, Cosmos3OmniTransformer, UniPCMultistepScheduler

    from diffusers_moc.tiny import _tiny_vae

    tokenizer = _cosmos3_tokenizer()
    torch.manual_seed(0)
    transformer = Cosmos3OmniTransformer(
        head_dim=16,
        hidden_size=32,
        intermediate_size=32,
        latent_channel=16,
        latent_patch_size=2,
        num_attention_heads=2,
        num_hidden_layers=2,
        num_key_value_heads=1,
        patch_latent_dim=64,
        vocab_size=len(tokenizer),
        rope_axes_dim=(4, 2, 2),
    ).eval()
    pipe = Cosmos3OmniPipeline(
        transformer=transformer,
        text_tokenizer=tokenizer,
        vae=_tiny_vae(16),
        scheduler=UniPCMultistepScheduler(),
        sound_tokenizer=None,
        enable_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)

    def generate(config: MoCConfig | None) -> torch.Tensor:
        if config is not None:
            apply_moc(pipe, config)
        generator = torch.Generator().manual_seed(0)
        call = {"num_frames": 9, "height": 64, "width": 64, "num_inference_steps": 2, "output_type": "pt"}
        return pipe("a cat walks on the beach", generator=generator, **call).video

    stock = generate(None)
    assert torch.equal(generate(DENSE), stock)
    assert not torch.allclose(generate(SPARSE), stock, atol=1e-3)
    facts = transformer.layers[0].self_attn.processor.hook.last_facts
    assert facts.grid == (3, 4, 4)
