"""What every MoC attention processor shares: config, drop-off/drop-in generator, layout building, grid reading."""

from __future__ import annotations

from functools import lru_cache

import torch

from ..attention import moc_attention
from ..config import MoCConfig
from ..context import current_moc_context
from ..layout import GLOBAL_SHOT, ChunkLayout
from ..parallel import ulysses_config

__all__ = ["MoCAttnProcessorBase", "frames_from_rotary", "video_text_layout"]


def first_change(x: torch.Tensor) -> int:
    """Index of the first row of `x` (L, d) that differs from row 0, or L when none does."""
    diff = (x != x[:1]).any(-1)
    return int(torch.argmax(diff.to(torch.uint8)).item()) if bool(diff.any()) else x.shape[0]


def qkv_heads(
    attn: torch.nn.Module,
    x: torch.Tensor,
    projections: tuple[str, str, str] = ("to_q", "to_k", "to_v"),
    norms: tuple[str, str] = ("norm_q", "norm_k"),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Query, key and value of `x` through the named projections of `attn`, as `(B, L, H, D)`, with the per-head
    QK-norms the module has (as diffusers' HunyuanVideo, CogVideoX and Mochi processors apply them)."""
    q, k, v = (getattr(attn, name)(x).unflatten(2, (attn.heads, -1)) for name in projections)
    norm_q, norm_k = (getattr(attn, name, None) for name in norms)
    return (q if norm_q is None else norm_q(q)), (k if norm_k is None else norm_k(k)), v


def frames_from_rotary(rotary_emb: tuple[torch.Tensor, torch.Tensor], time_column: int = 0) -> tuple[int, int]:
    r"""
    `(frames, tokens_per_frame)` of a video token stream in `(frame, row, column)` order, read off its 3D RoPE.

    Args:
        rotary_emb (`tuple[torch.Tensor, torch.Tensor]`): rotary cosines and sines of the video tokens, each
            `(L, D)` (one row per token).
        time_column (`int`, defaults to 0): a column whose angle depends on the frame index only (HunyuanVideo and
            CogVideoX put the time axis first; LTX-Video interleaves the axes after `D % 6` padding columns). Cosine
            and sine are read together: a cosine alone cannot tell angles `a` and `-a` apart (LTX-Video's frames 0 and
            1 are at `-a` and `a`).

    Raises:
        `ValueError`: when the column is not constant within frames of equal size, i.e. the table is not a 3D RoPE
            of a `(frame, row, column)` grid.
    """
    cos, sin = rotary_emb
    if cos.ndim != 2 or sin.shape != cos.shape:
        raise ValueError(f"expected rotary cosines and sines shaped (L, D), got {tuple(cos.shape)}, {tuple(sin.shape)}")
    col = torch.stack([cos[:, time_column], sin[:, time_column]], dim=-1)
    L = col.shape[0]
    per_frame = first_change(col)
    if L % per_frame:
        raise ValueError(
            f"could not read a frame grid from rotary embeddings of {L} tokens: the time axis first changes after "
            f"{per_frame} tokens, which does not divide {L}"
        )
    frames = col.view(L // per_frame, per_frame, 2)
    if not bool((frames == frames[:, :1]).all()):
        raise ValueError("rotary embeddings are not laid out as a (frame, row, column) grid with time first")
    return L // per_frame, per_frame


@lru_cache(maxsize=128)
def video_text_layout(
    frames: int,
    tokens_per_frame: int,
    shot_frames: tuple[int, ...] | None,
    chunk_tokens: int | None,
    text_tokens: int = 0,
    text_first: bool = False,
) -> ChunkLayout:
    r"""
    Layout of one joint-attention stream: the video (one chunk per latent frame, or `chunk_tokens`) and, when
    `text_tokens > 0`, one caption chunk (the global caption, a mandatory anchor) before or after it.
    """
    if shot_frames is not None and sum(shot_frames) != frames:
        raise ValueError(
            f"the MoC context says the shots have {list(shot_frames)} latent frames (sum {sum(shot_frames)}), but the "
            f"transformer input has {frames} latent frames; set `moc_context(shot_frames=...)` to match"
        )
    video = ChunkLayout.for_video(frames, tokens_per_frame, shot_frames, chunk_tokens)
    if text_tokens <= 0:
        return video
    text = ChunkLayout.for_captions([text_tokens], [GLOBAL_SHOT])
    return ChunkLayout.concat(text, video) if text_first else ChunkLayout.concat(video, text)


class MoCAttnProcessorBase:
    r"""
    Base class of the MoC processors of joint-attention and cross-attention video transformers.

    Subclasses implement `__call__` with the signature of the model's stock processor and call
    [`~MoCAttnProcessorBase.attend`] where the stock processor calls `dispatch_attention_fn`.

    Args:
        config (`MoCConfig`, *optional*): routing settings (defaults to `MoCConfig()`).
    """

    # Set by diffusers (`set_attention_backend`, `enable_parallelism`) as on its own processors.
    _attention_backend = None
    _parallel_config = None

    def __init__(self, config: MoCConfig | None = None):
        config = MoCConfig() if config is None else config
        if not isinstance(config, MoCConfig):
            raise TypeError(f"config must be a MoCConfig, got {type(config).__name__}")
        self.config = config
        # (frames, height, width) of the latest transformer input, recorded by the pre-hook `apply_moc` registers;
        # used by models whose attention call carries no rotary table to read the grid from.
        self._grid: tuple[int, int, int] | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"

    def refuse_context_parallel(self, model: str) -> None:
        """Raise when diffusers' context parallelism is on: `model` has no context-parallel plan in diffusers."""
        if ulysses_config(self._parallel_config) is not None:
            raise NotImplementedError(
                f"{model} has no context-parallel plan in diffusers; MoC context parallelism is supported on Wan and "
                "LTX-Video"
            )

    def layout(self, frames: int, tokens_per_frame: int, text_tokens: int = 0, text_first: bool = False) -> ChunkLayout:
        """The layout of a stream of `frames` latent frames (shots from [`moc_context`]) and one caption chunk."""
        shots = current_moc_context().shot_frames
        return video_text_layout(frames, tokens_per_frame, shots, self.config.chunk_tokens, text_tokens, text_first)

    def attend(
        self, attn: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: ChunkLayout
    ) -> torch.Tensor:
        """MoC attention of `(B, L, H, D)` tensors, with drop-off/drop-in when `attn` is in training mode."""
        if layout.num_tokens != query.shape[1]:
            raise ValueError(f"the MoC layout covers {layout.num_tokens} tokens but the sequence has {query.shape[1]}")
        # Drop-off / drop-in draw from the global RNG, which activation checkpointing replays.
        return moc_attention(query, key, value, layout, self.config, training=attn.training)

    def attend_video_then_text(
        self,
        attn: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        frames: int,
        tokens_per_frame: int,
        valid_text: list[torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        r"""
        MoC attention of a `[video, caption]` stream whose caption may be padded differently in each sample.

        Args:
            valid_text (`list`, *optional*): per sample, the indices (into the caption) of its valid caption tokens,
                or `None` when all are valid. Padded caption tokens are dropped before routing (neither keys nor
                part of a chunk mean) and get a zero output, as no other token attends to them.
        """
        B, N = query.shape[:2]
        video_len = frames * tokens_per_frame
        text_len = N - video_len
        if valid_text is None or all(v is None for v in valid_text):
            return self.attend(attn, query, key, value, self.layout(frames, tokens_per_frame, text_len))
        # Valid caption lengths differ per sample: route each sample over its video and valid caption tokens only.
        outs = []
        video = torch.arange(video_len, device=query.device)
        for b, keep in enumerate(valid_text):
            keep = torch.arange(text_len, device=query.device) if keep is None else keep.to(query.device)
            idx = torch.cat([video, video_len + keep])
            q, k, v = (x[b : b + 1, idx] for x in (query, key, value))
            res = self.attend(attn, q, k, v, self.layout(frames, tokens_per_frame, keep.numel()))
            outs.append(res.new_zeros((N,) + res.shape[2:]).index_copy(0, idx, res[0]))
        return torch.stack(outs)
