"""Tiny random-weight Wan components built in-process: offline tests, `--tiny` CLI runs and examples.

Nothing is downloaded: the tokenizer is trained here on a few words and every model is built from a small config.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["tiny_wan_components", "tiny_tokenizer", "cast_like_from_pretrained", "TINY_TEXT_DIM", "TINY_MODELS"]

TINY_TEXT_DIM = 32
#: The Wan families a tiny model can stand in for (see `diffusers_moc.model_families`).
TINY_MODELS = ("wan2.1-t2v", "wan2.1-i2v", "wan2.2-t2v-a14b", "wan2.2-i2v-a14b", "wan2.2-ti2v-5b")
#: CLIP hidden size of the tiny image encoder (the I2V transformers' `image_dim`).
_TINY_IMAGE_DIM = 4
_WORDS = (
    "a an the cat dog man woman child car street city forest river sea beach mountain room house night day sun rain "
    "walks runs sits looks smiles talks drives flies swims red blue green old young big small close up wide shot "
    "camera slowly quickly in on at with and of to from"
)


def cast_like_from_pretrained(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    r"""
    Cast the floating-point weights of `module` to `dtype` in place, except those of its `_keep_in_fp32_modules`
    (Wan's time embedder, norms and modulation tables; T5's `wo`), which stay fp32 as `from_pretrained(torch_dtype=...)`
    keeps them: in bf16 they lose the precision the model relies on.

    Returns:
        `torch.nn.Module`: `module`.
    """
    keep = list(getattr(module, "_keep_in_fp32_modules", None) or [])
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if not tensor.is_floating_point():
            continue
        # The same name match as diffusers' loader: a keep entry is one component of the dotted name.
        target = torch.float32 if any(k in name.split(".") for k in keep) else dtype
        if tensor.dtype != target:
            tensor.data = tensor.data.to(target)
    return module


def tiny_tokenizer():
    """A word-level fast tokenizer with `<pad>`, `</s>` and `<unk>`, trained here on a few words."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"])
    tok.train_from_iterator([_WORDS], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def _tiny_vae(z_dim: int):
    from diffusers import AutoencoderKLWan

    if z_dim == 16:  # Wan 2.1's VAE: 4x in time, 8x in space
        return AutoencoderKLWan(
            base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
        ).eval()
    # Wan 2.2's: 48 channels, 16x in space (8x of convolutions times a 2x2 pixel patchify), residual
    return AutoencoderKLWan(
        base_dim=3,
        z_dim=48,
        in_channels=12,
        out_channels=12,
        is_residual=True,
        patch_size=2,
        latents_mean=[0.0] * 48,
        latents_std=[1.0] * 48,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        scale_factor_spatial=16,
        scale_factor_temporal=4,
        temperal_downsample=[False, True, True],
    ).eval()


def _tiny_transformer(seed: int, in_channels: int, out_channels: int, image_dim: int | None, **kwargs):
    from diffusers import WanTransformer3DModel

    if image_dim is not None:  # Wan 2.1 I2V attends the CLIP tokens with added key/value projections
        kwargs["added_kv_proj_dim"] = kwargs["num_attention_heads"] * kwargs["attention_head_dim"]
    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        in_channels=in_channels,
        out_channels=out_channels,
        text_dim=TINY_TEXT_DIM,
        freq_dim=256,
        ffn_dim=32,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        image_dim=image_dim,
        **kwargs,
    ).eval()  # as from_pretrained returns it: MoC's training-only drop-off/drop-in stay off


def _tiny_image_encoder(seed: int) -> dict[str, Any]:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=_TINY_IMAGE_DIM,
        projection_dim=_TINY_IMAGE_DIM,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=8,
        intermediate_size=16,
        patch_size=4,
    )
    return {
        "image_encoder": CLIPVisionModel(config).eval(),  # 8x8 pixels in 4x4 patches: 5 image tokens
        "image_processor": CLIPImageProcessor(crop_size=8, size=8),
    }


def tiny_wan_components(
    seed: int = 0,
    num_layers: int = 2,
    heads: int = 2,
    head_dim: int = 12,
    rope_max_seq_len: int = 32,
    dtype: torch.dtype | None = None,
    model: str = "wan2.1-t2v",
) -> dict[str, Any]:
    r"""
    Components of a tiny Wan pipeline with random weights (`WanPipeline(**tiny_wan_components())`).

    `model` names the Wan family the components stand in for (`TINY_MODELS`): `"wan2.1-t2v"` (the default: the five
    components of `WanPipeline`), `"wan2.1-i2v"` (36 input channels, a tiny CLIP image encoder and processor, as
    `WanImageToVideoPipeline` takes them), `"wan2.2-t2v-a14b"` and `"wan2.2-i2v-a14b"` (two expert transformers,
    `transformer_2` seeded `seed + 1`, and `boundary_ratio`), `"wan2.2-ti2v-5b"` (a 48-channel VAE that compresses 16x
    in space and `expand_timesteps=True`). Pipeline settings come back as keys too, so
    `WanPipeline(**components)` (or `WanImageToVideoPipeline`) builds the family's pipeline.

    The Wan 2.1 VAE compresses 4x in time and 8x in space, as Wan's does; the transformers have `heads` heads of
    `head_dim`. `rope_max_seq_len` bounds the latent frames (and patch rows/columns) the transformer can take.
    `dtype` casts the transformers, text and image encoders as `from_pretrained(torch_dtype=dtype)` would (fp32
    modules kept); the VAE stays fp32, as diffusers' Wan examples run it.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import T5Config, UMT5EncoderModel

    if model not in TINY_MODELS:
        raise ValueError(f"no tiny model {model!r}; choose one of {list(TINY_MODELS)}")
    z_dim = 48 if model == "wan2.2-ti2v-5b" else 16
    image_in = model in ("wan2.1-i2v", "wan2.2-i2v-a14b")
    in_channels = 2 * z_dim + 4 if image_in else z_dim
    image_dim = _TINY_IMAGE_DIM if model == "wan2.1-i2v" else None
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    vae = _tiny_vae(z_dim)
    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=TINY_TEXT_DIM,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
    ).eval()
    shape = dict(
        num_attention_heads=heads, attention_head_dim=head_dim, num_layers=num_layers, rope_max_seq_len=rope_max_seq_len
    )
    transformer = _tiny_transformer(seed, in_channels, z_dim, image_dim, **shape)
    components: dict[str, Any] = {
        "transformer": transformer,
        "vae": vae,
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=7.0),
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
    }
    if model in ("wan2.2-t2v-a14b", "wan2.2-i2v-a14b"):
        components["transformer_2"] = _tiny_transformer(seed + 1, in_channels, z_dim, image_dim, **shape)
        # The checkpoints' own boundaries; with the tiny scheduler's 2 steps the first runs `transformer`, the
        # second `transformer_2`.
        components["boundary_ratio"] = 0.875 if model == "wan2.2-t2v-a14b" else 0.9
    if model == "wan2.2-ti2v-5b":
        components["expand_timesteps"] = True
    if model == "wan2.1-i2v":
        components.update(_tiny_image_encoder(seed))
    if dtype is not None:
        for name in ("transformer", "transformer_2", "text_encoder", "image_encoder"):
            if name in components:
                cast_like_from_pretrained(components[name], dtype)
    return components
