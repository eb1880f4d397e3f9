"""Tiny random-weight HunyuanVideo 1.5 components built in-process: offline tests, `--tiny` runs and examples.

Nothing is downloaded: the Qwen-style tokenizer is a word-level tokenizer trained here with a chat template, ByT5's
tokenizer needs no vocabulary file, and every model is built from a small config.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["TINY_HUNYUAN_VIDEO15_MODELS", "tiny_hunyuan_video15_components", "tiny_qwen_tokenizer"]

#: The HunyuanVideo 1.5 families a tiny model can stand in for (see `diffusers_moc.model_families`).
TINY_HUNYUAN_VIDEO15_MODELS = ("hunyuanvideo1.5-t2v", "hunyuanvideo1.5-i2v")
#: diffusers' HunyuanVideo 1.5 pipelines drop the first 108 tokens of the templated prompt (the system message).
_TEMPLATE_TOKENS = 108
_QWEN_DIM, _BYT5_DIM, _IMAGE_DIM, _LATENT_CHANNELS = 16, 8, 8, 4
_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ '<|im_start|> ' * "
    + str(_TEMPLATE_TOKENS)
    + " }}"
    "{% else %}{{ message['content'] }}{% endif %}{% endfor %}{% if add_generation_prompt %} <|im_end|>{% endif %}"
)


def tiny_qwen_tokenizer():
    r"""A word-level fast tokenizer standing in for Qwen2.5-VL's: its chat template renders the system message as
    exactly the 108 tokens diffusers' pipeline crops, then the prompt's words and an end token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from .tiny import _WORDS

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"])
    tok.train_from_iterator([_WORDS], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>", chat_template=_CHAT_TEMPLATE
    )


def _text_encoders(seed: int, vocab: int) -> dict[str, Any]:
    from transformers import ByT5Tokenizer, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    qwen = Qwen2_5_VLTextConfig(
        vocab_size=vocab,
        hidden_size=_QWEN_DIM,
        intermediate_size=32,
        num_hidden_layers=3,  # the pipeline reads the third hidden state from the end
        num_attention_heads=2,
        num_key_value_heads=1,
        rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
        max_position_embeddings=2048,
        bos_token_id=None,
        eos_token_id=None,
    )
    byt5 = ByT5Tokenizer()
    t5 = T5Config(
        vocab_size=len(byt5),
        d_model=_BYT5_DIM,
        d_kv=4,
        d_ff=16,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        pad_token_id=byt5.pad_token_id,
        eos_token_id=byt5.eos_token_id,
        decoder_start_token_id=byt5.pad_token_id,
    )
    torch.manual_seed(seed)
    text_encoder = Qwen2_5_VLTextModel(qwen).eval()
    torch.manual_seed(seed)
    return {"text_encoder": text_encoder, "text_encoder_2": T5EncoderModel(t5).eval(), "tokenizer_2": byt5}


def _image_encoder(seed: int) -> dict[str, Any]:
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed)
    config = SiglipVisionConfig(
        hidden_size=_IMAGE_DIM,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=8,
        patch_size=4,
    )
    # 8x8 pixels in 4x4 patches: 4 image tokens.
    return {
        "image_encoder": SiglipVisionModel(config).eval(),
        "feature_extractor": SiglipImageProcessor(size={"height": 8, "width": 8}),
    }


def tiny_hunyuan_video15_components(
    seed: int = 0, num_layers: int = 2, heads: int = 2, head_dim: int = 12, model: str = "hunyuanvideo1.5-t2v"
) -> dict[str, Any]:
    r"""
    Components of a tiny HunyuanVideo 1.5 pipeline with random weights: `HunyuanVideo15Pipeline(**components)`
    (`model="hunyuanvideo1.5-t2v"`) or `HunyuanVideo15ImageToVideoPipeline(**components)` (`"hunyuanvideo1.5-i2v"`,
    with a tiny SigLIP image encoder and its processor).

    The VAE compresses 4x in time and 16x in space into 4 channels, as HunyuanVideo 1.5's does into 32; the
    transformer (`heads` heads of `head_dim`, patch size 1) takes the latents, the condition latents and a mask.
    """
    from diffusers import (
        AutoencoderKLHunyuanVideo15,
        ClassifierFreeGuidance,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideo15Transformer3DModel,
    )

    if model not in TINY_HUNYUAN_VIDEO15_MODELS:
        raise ValueError(f"no tiny model {model!r}; choose one of {list(TINY_HUNYUAN_VIDEO15_MODELS)}")
    tokenizer = tiny_qwen_tokenizer()
    torch.manual_seed(seed)
    vae = AutoencoderKLHunyuanVideo15(
        latent_channels=_LATENT_CHANNELS, block_out_channels=(8, 8, 8, 8, 8), layers_per_block=1
    ).eval()
    torch.manual_seed(seed)
    rope = head_dim // 3 // 2 * 2
    transformer = HunyuanVideo15Transformer3DModel(
        in_channels=2 * _LATENT_CHANNELS + 1,
        out_channels=_LATENT_CHANNELS,
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        num_layers=num_layers,
        num_refiner_layers=1,
        text_embed_dim=_QWEN_DIM,
        text_embed_2_dim=_BYT5_DIM,
        image_embed_dim=_IMAGE_DIM,
        rope_axes_dim=(head_dim - 2 * rope, rope, rope),
        target_size=32,
        task_type="i2v" if model.endswith("i2v") else "t2v",
    ).eval()  # as from_pretrained returns it: MoC's training-only drop-off/drop-in stay off
    components: dict[str, Any] = {
        "transformer": transformer,
        "vae": vae,
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=5.0),
        "tokenizer": tokenizer,
        "guider": ClassifierFreeGuidance(guidance_scale=6.0),
        **_text_encoders(seed, len(tokenizer)),
    }
    if model.endswith("i2v"):
        components.update(_image_encoder(seed))
    return components
