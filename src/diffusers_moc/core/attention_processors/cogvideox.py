"""MoC joint attention for `CogVideoXTransformer3DModel` (caption tokens first, then video, in one sequence)."""

from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb

from .base import MoCAttnProcessorBase, frames_from_rotary, qkv_heads

__all__ = ["MoCCogVideoXAttnProcessor", "refuse_fused_processors"]


def refuse_fused_processors(transformer: torch.nn.Module) -> None:
    r"""
    Raise when diffusers' QKV fusion has taken MoC off a CogVideoX transformer that [`apply_moc`] set up.

    CogVideoX's `fuse_qkv_projections()` sets diffusers' dense `FusedCogVideoXAttnProcessor2_0` on every attention
    layer, and `unfuse_qkv_projections()` puts back the processors from before fusing; either way the layers would run
    dense attention without a word. MoC keeps CogVideoX's separate projections, which fusing leaves in place.
    """
    attn = transformer.transformer_blocks[0].attn1
    if getattr(attn, "fused_projections", False) and not isinstance(attn.processor, MoCAttnProcessorBase):
        raise RuntimeError(
            f"the attention layers of this CogVideoX transformer run {type(attn.processor).__name__}, not MoC: "
            "diffusers' `fuse_qkv_projections()` replaces every processor of CogVideoX by its dense fused one "
            "(and `unfuse_qkv_projections()` restores those from before fusing). MoC runs CogVideoX unfused: call "
            "`transformer.unfuse_qkv_projections()` after fusing, or `apply_moc(transformer)` again; "
            "`remove_moc(transformer)` for dense attention"
        )


class MoCCogVideoXAttnProcessor(MoCAttnProcessorBase):
    r"""
    Drop-in for diffusers' `CogVideoXAttnProcessor2_0` that computes the joint text-video attention with MoC.

    The stream is `[caption tokens, video tokens]`; the caption (all its tokens: CogVideoX attends to its T5 padding
    too, without a mask) is one text chunk, a mandatory anchor; video chunks are latent frames.

    With [`apply_moc`] the frame grid comes from the input shape. `set_attn_processor` alone works in eager mode for
    checkpoints with RoPE (CogVideoX 1.0 5B, CogVideoX 1.5: the grid is read off the rotary table); without RoPE
    (CogVideoX-2b) nothing in the attention call reveals the grid, so use `apply_moc`.

    Args:
        config (`MoCConfig`, *optional*): routing settings (defaults to `MoCConfig()`).
    """

    @staticmethod
    def input_grid(transformer, args, kwargs) -> tuple[int, int, int]:
        """Post-patchify `(frames, height, width)`: `hidden_states` is `(B, F, C, H, W)`."""
        # Runs once per forward, before any layer: where a processor swap by diffusers can still be noticed.
        refuse_fused_processors(transformer)
        _, frames, _, height, width = MoCAttnProcessorBase._call_arg(args, kwargs, "hidden_states").shape
        p, p_t = transformer.config.patch_size, transformer.config.patch_size_t
        return (frames if p_t is None else frames // p_t), height // p, width // p

    @staticmethod
    def check_replaced(transformer: torch.nn.Module) -> None:
        refuse_fused_processors(transformer)

    def grid_from_rotary(self, rotary_emb) -> tuple[int, int]:
        return frames_from_rotary(rotary_emb, time_column=0)

    @staticmethod
    def stock_processor(module: torch.nn.Module):
        """The dense diffusers processor (for [`remove_moc`])."""
        from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0

        return CogVideoXAttnProcessor2_0()

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if attention_mask is not None:
            raise NotImplementedError(
                "MoCCogVideoXAttnProcessor does not take an attention mask (CogVideoX passes none)"
            )
        self.refuse_context_parallel("CogVideoXTransformer3DModel")
        text_len = encoder_hidden_states.shape[1]
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)

        query, key, value = qkv_heads(attn, hidden_states)
        if image_rotary_emb is not None:
            # RoPE on the video part only, as diffusers' CogVideoXAttnProcessor2_0 does.
            query = torch.cat(
                [query[:, :text_len], apply_rotary_emb(query[:, text_len:], image_rotary_emb, sequence_dim=1)], 1
            )
            if not attn.is_cross_attention:
                key = torch.cat(
                    [key[:, :text_len], apply_rotary_emb(key[:, text_len:], image_rotary_emb, sequence_dim=1)], 1
                )

        hidden_states = self.moc_attend(
            attn, query, key, value, rotary_emb=image_rotary_emb, text_tokens=text_len, text_first=True
        )
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        encoder_hidden_states, hidden_states = hidden_states.split([text_len, hidden_states.shape[1] - text_len], dim=1)
        return hidden_states, encoder_hidden_states
