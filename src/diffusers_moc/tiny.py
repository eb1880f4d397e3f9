"""Tiny random-weight Wan components built in-process: offline tests, `--tiny` CLI runs and examples.

Nothing is downloaded: the tokenizer is trained here on a few words and every model is built from a small config.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["tiny_wan_components", "tiny_tokenizer", "cast_like_from_pretrained", "TINY_TEXT_DIM"]

TINY_TEXT_DIM = 32
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


def tiny_wan_components(
    seed: int = 0,
    num_layers: int = 2,
    heads: int = 2,
    head_dim: int = 12,
    rope_max_seq_len: int = 32,
    dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    r"""
    Components of a tiny `WanPipeline` with random weights (`WanPipeline(**tiny_wan_components())`).

    The VAE compresses 4x in time and 8x in space, as Wan's does; the transformer has `heads` heads of `head_dim`.
    `rope_max_seq_len` bounds the latent frames (and patch rows/columns) the transformer can take. `dtype` casts the
    transformer and text encoder as `from_pretrained(torch_dtype=dtype)` would (fp32 modules kept); the VAE stays
    fp32, as diffusers' Wan examples run it.
    """
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
    from transformers import T5Config, UMT5EncoderModel

    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    ).eval()
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
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=16,
        out_channels=16,
        text_dim=TINY_TEXT_DIM,
        freq_dim=256,
        ffn_dim=32,
        num_layers=num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=rope_max_seq_len,
    ).eval()  # as from_pretrained returns it: MoC's training-only drop-off/drop-in stay off
    scheduler = FlowMatchEulerDiscreteScheduler(shift=7.0)
    if dtype is not None:
        cast_like_from_pretrained(transformer, dtype)
        cast_like_from_pretrained(text_encoder, dtype)
    return {
        "transformer": transformer,
        "vae": vae,
        "scheduler": scheduler,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
    }
