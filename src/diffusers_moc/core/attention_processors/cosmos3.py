"""MoC processor for Cosmos 3 (`Cosmos3OmniTransformer`): its generation pathway routed, its causal text pathway
stock."""

from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_cosmos3 import _rotate_half

from ..attention import moc_attention
from ..layout import GLOBAL_SHOT, ChunkLayout
from ..recording import active_routing_map
from .base import MoCAttnProcessorBase

__all__ = ["MoCCosmos3AttnProcessor"]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


def _text(tokens: int) -> ChunkLayout:
    return ChunkLayout.for_captions([tokens], [GLOBAL_SHOT])


class MoCCosmos3AttnProcessor(MoCAttnProcessorBase):
    r"""
    diffusers' `Cosmos3AttnProcessor` with MoC in its generation pathway.

    Cosmos 3 packs one sequence `[text | video | sound | action]` and attends it in two calls: the text (the
    "understanding" prefix) causally over itself, which stays stock, and the generation tokens (video, then sound and
    action) over all keys, text included. MoC routes the second call over the layout `[text chunk | video frames |
    one chunk of the sound and action tokens]`, both non-video chunks mandatory anchors. The video grid is the one
    vision item's `vision_token_shapes` (a transformer input, so nothing is read on the host); the video tokens must
    lead the generation tokens, as `Cosmos3OmniPipeline` packs them. Grouped key/value heads are repeated to the
    query heads (the grouping `enable_gqa` computes), and the text queries that the layout needs as its first chunk
    are the pathway's own, their outputs discarded. At full density the call is the stock one.
    """

    @staticmethod
    def input_grid(transformer: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[int, int, int]:
        if getattr(transformer, "_cp_shard_fn", None) is not None:
            raise NotImplementedError(
                "Cosmos3OmniTransformer has no context-parallel plan in diffusers (its external sharding seam is "
                "set); MoC does not run on sequence shards of it"
            )
        shapes = MoCAttnProcessorBase._call_arg(args, kwargs, "vision_token_shapes", 6)
        if shapes is None or len(shapes) != 1:
            count = 0 if shapes is None else len(shapes)
            raise NotImplementedError(f"MoC routes one video per Cosmos 3 sequence, but it has {count} vision items")
        frames, height, width = (int(n) for n in shapes[0])
        return frames, height, width

    def __call__(
        self,
        attn: torch.nn.Module,
        und_seq: torch.Tensor,
        gen_seq: torch.Tensor,
        rotary_emb: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.refuse_context_parallel("Cosmos3OmniTransformer")
        heads, kv_heads, dim = attn.num_attention_heads, attn.num_key_value_heads, attn.head_dim
        q_und = attn.norm_q(attn.to_q(und_seq).view(-1, heads, dim))
        k_und = attn.norm_k(attn.to_k(und_seq).view(-1, kv_heads, dim))
        v_und = attn.to_v(und_seq).view(-1, kv_heads, dim)
        q_gen = attn.norm_added_q(attn.add_q_proj(gen_seq).view(-1, heads, dim))
        k_gen = attn.norm_added_k(attn.add_k_proj(gen_seq).view(-1, kv_heads, dim))
        v_gen = attn.add_v_proj(gen_seq).view(-1, kv_heads, dim)
        k_und_for_gen = attn.k_norm_und_for_gen(k_und) if attn.k_norm_und_for_gen is not None else k_und

        cos_und, sin_und, cos_gen, sin_gen = (x.unsqueeze(1) for x in rotary_emb)
        q_und, k_und = _rotate(q_und, cos_und, sin_und), _rotate(k_und, cos_und, sin_und)
        k_und_for_gen = _rotate(k_und_for_gen, cos_und, sin_und)
        q_gen, k_gen = _rotate(q_gen, cos_gen, sin_gen), _rotate(k_gen, cos_gen, sin_gen)

        causal_out = dispatch_attention_fn(
            q_und.unsqueeze(0),
            k_und.unsqueeze(0),
            v_und.unsqueeze(0),
            is_causal=True,
            enable_gqa=True,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        all_k = torch.cat([k_und_for_gen, k_gen], dim=0)
        all_v = torch.cat([v_und, v_gen], dim=0)
        full_out = self._generation(attn, q_und, q_gen, all_k, all_v)
        return attn.to_out(causal_out.squeeze(0).flatten(-2, -1)), attn.to_add_out(full_out.flatten(-2, -1))

    def _generation(self, attn, q_und, q_gen, key, value) -> torch.Tensor:
        """The generation pathway: `(L_gen, H, D)` queries over `(L_und + L_gen, H_kv, D)` keys -> `(L_gen, H, D)`."""
        facts = self.forward_facts(attn)
        text, video = q_und.shape[0], facts.layout.num_tokens
        rest = q_gen.shape[0] - video
        if rest < 0:
            raise ValueError(f"Cosmos 3's generation pathway has {q_gen.shape[0]} tokens, fewer than {video} video")
        parts = ([_text(text)] if text else []) + [facts.layout] + ([_text(rest)] if rest else [])
        layout = ChunkLayout.concat(*parts)
        config = self.config
        dropping = facts.regularise and config.drop_off > 0
        if not config.causal and config.top_k >= layout.num_chunks - 1 and not dropping:
            if active_routing_map() is None:  # dense: the stock call, bit-identical
                out = dispatch_attention_fn(
                    q_gen.unsqueeze(0),
                    key.unsqueeze(0),
                    value.unsqueeze(0),
                    is_causal=False,
                    enable_gqa=True,
                    backend=self._attention_backend,
                    parallel_config=self._parallel_config,
                )
                return out.squeeze(0)
        if active_routing_map() is not None:
            raise NotImplementedError("routing maps are not recorded on Cosmos 3")
        groups = q_gen.shape[1] // key.shape[1]
        key, value = (x.repeat_interleave(groups, dim=1) for x in (key, value))
        query = torch.cat([q_und, q_gen], dim=0)
        out = moc_attention(query[None], key[None], value[None], layout, config, training=facts.regularise)
        return out[0, text:]
