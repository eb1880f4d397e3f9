"""Chunk layouts: how one self-attention token stream is cut into content-aligned chunks.

A layout is fully described by the size of each chunk, the shot each chunk belongs to and whether it is a text
chunk (see ``docs/semantics.md`` section 1). Everything else (offsets, the token -> chunk map, anchor masks) is derived.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["ChunkLayout"]

GLOBAL_SHOT = -1


def _as_int_list(name: str, values: Sequence[int]) -> list[int]:
    out = []
    for i, v in enumerate(values):
        try:
            if isinstance(v, bool):
                raise TypeError
            out.append(operator.index(v))
        except TypeError:
            raise ValueError(f"{name}[{i}] must be an integer, got {v!r}") from None
    return out


@dataclass(frozen=True)
class ChunkLayout:
    r"""
    The chunks of one token stream, in sequence order.

    Build it with [`ChunkLayout.from_chunks`] or one of the convenience constructors
    ([`ChunkLayout.for_video`], [`ChunkLayout.for_captions`], [`ChunkLayout.concat`]).

    Args:
        sizes (`tuple[int]`): token count of each chunk (all positive).
        shots (`tuple[int]`): shot id of each chunk; `-1` marks a global caption (text only).
        is_text (`tuple[bool]`): whether each chunk is a text segment.
    """

    sizes: tuple[int, ...]
    shots: tuple[int, ...]
    is_text: tuple[bool, ...]
    _device_cache: dict = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_chunks(
        cls,
        sizes: Sequence[int],
        shots: Sequence[int] | None = None,
        text: Sequence[bool] | None = None,
        num_tokens: int | None = None,
    ) -> ChunkLayout:
        r"""
        Build a layout from per-chunk token counts, shot ids and text flags, in sequence order.

        Args:
            sizes (`Sequence[int]`): number of tokens in each chunk.
            shots (`Sequence[int]`, *optional*): shot id of each chunk (default: all chunks in shot 0). A global
                caption has shot id `-1`. Video chunks of one shot must be contiguous and shots must appear in order.
            text (`Sequence[bool]`, *optional*): whether each chunk is text (default: all video).
            num_tokens (`int`, *optional*): if given, the sequence length the sizes must sum to.

        Raises:
            `ValueError`: if the lists have different lengths, a chunk is empty, a video chunk has a negative shot
                id, video shots are out of order, or the sizes do not sum to `num_tokens`.
        """
        sizes = _as_int_list("sizes", sizes)
        if len(sizes) == 0:
            raise ValueError("a ChunkLayout needs at least one chunk, got an empty `sizes` list")
        shots = [0] * len(sizes) if shots is None else _as_int_list("shots", shots)
        text = [False] * len(sizes) if text is None else [bool(t) for t in text]
        if len(shots) != len(sizes) or len(text) != len(sizes):
            raise ValueError(
                f"`sizes`, `shots` and `text` must have one entry per chunk, got lengths "
                f"{len(sizes)}, {len(shots)} and {len(text)}"
            )
        for i, s in enumerate(sizes):
            if s <= 0:
                raise ValueError(f"chunk {i} is empty or negative (size {s}); every chunk needs at least one token")
        last_video_shot = None
        for i, (shot, is_text) in enumerate(zip(shots, text)):
            if is_text:
                if shot < GLOBAL_SHOT:
                    raise ValueError(
                        f"text chunk {i} has shot id {shot}; use -1 for a global caption or a shot id >= 0"
                    )
                continue
            if shot < 0:
                raise ValueError(
                    f"video chunk {i} has negative shot id {shot}; only text chunks (global captions) may use -1"
                )
            if last_video_shot is not None and shot < last_video_shot:
                raise ValueError(
                    f"video chunk {i} has shot id {shot} after a chunk of shot {last_video_shot}; the video chunks of "
                    "a shot must be contiguous and shots must follow shot order"
                )
            last_video_shot = shot
        total = sum(sizes)
        if num_tokens is not None and total != num_tokens:
            raise ValueError(f"chunk sizes sum to {total} tokens but the sequence has {num_tokens} tokens")
        return cls(tuple(sizes), tuple(shots), tuple(text))

    @classmethod
    def for_video(
        cls,
        num_frames: int,
        tokens_per_frame: int,
        shot_frames: Sequence[int] | None = None,
        chunk_tokens: int | None = None,
        first_shot: int = 0,
    ) -> ChunkLayout:
        r"""
        Layout of a video of latent frames, split into shots (no text chunks).

        Args:
            num_frames (`int`): number of latent frames (after patchify in time).
            tokens_per_frame (`int`): patch tokens per latent frame (`height * width` after patchify).
            shot_frames (`Sequence[int]`, *optional*): latent frames in each shot, in order; must sum to
                `num_frames`. Defaults to one shot.
            chunk_tokens (`int`, *optional*): target chunk size. `None` (default) gives one chunk per frame. At least
                one frame: each chunk is a run of `chunk_tokens // tokens_per_frame` whole frames of one shot (the last
                run of a shot may be shorter). Less than a frame: each frame is split into
                `ceil(tokens_per_frame / chunk_tokens)` near-equal pieces.
            first_shot (`int`, defaults to 0): shot id of the first shot.
        """
        if num_frames <= 0 or tokens_per_frame <= 0:
            raise ValueError(
                f"`num_frames` and `tokens_per_frame` must be positive, got {num_frames} and {tokens_per_frame}"
            )
        shot_frames = [num_frames] if shot_frames is None else _as_int_list("shot_frames", shot_frames)
        if any(n <= 0 for n in shot_frames):
            raise ValueError(f"every shot needs at least one latent frame, got shot_frames={list(shot_frames)}")
        if sum(shot_frames) != num_frames:
            raise ValueError(
                f"shot_frames {list(shot_frames)} sum to {sum(shot_frames)}, but there are {num_frames} frames"
            )
        if chunk_tokens is not None and chunk_tokens <= 0:
            raise ValueError(f"`chunk_tokens` must be positive or None, got {chunk_tokens}")

        sizes: list[int] = []
        shots: list[int] = []
        for s, n_frames in enumerate(shot_frames):
            shot = first_shot + s
            if chunk_tokens is None or chunk_tokens >= tokens_per_frame:
                per_chunk = 1 if chunk_tokens is None else chunk_tokens // tokens_per_frame
                for start in range(0, n_frames, per_chunk):
                    sizes.append(min(per_chunk, n_frames - start) * tokens_per_frame)
                    shots.append(shot)
            else:
                pieces = math.ceil(tokens_per_frame / chunk_tokens)
                base, extra = divmod(tokens_per_frame, pieces)
                frame_sizes = [base + 1] * extra + [base] * (pieces - extra)
                for _ in range(n_frames):
                    sizes.extend(frame_sizes)
                    shots.extend([shot] * pieces)
        return cls.from_chunks(sizes, shots, [False] * len(sizes))

    @classmethod
    def for_captions(cls, token_counts: Sequence[int], shots: Sequence[int]) -> ChunkLayout:
        r"""
        Layout of text segments only (one chunk per caption), for joint-attention models.

        Args:
            token_counts (`Sequence[int]`): tokens of each caption.
            shots (`Sequence[int]`): the shot of each caption, `-1` for the global caption.
        """
        return cls.from_chunks(token_counts, shots, [True] * len(token_counts))

    @classmethod
    def concat(cls, *layouts: ChunkLayout) -> ChunkLayout:
        r"""Layouts placed one after the other in the sequence (e.g. captions before the video)."""
        if not layouts:
            raise ValueError("ChunkLayout.concat needs at least one layout")
        return cls.from_chunks(
            [s for lay in layouts for s in lay.sizes],
            [s for lay in layouts for s in lay.shots],
            [t for lay in layouts for t in lay.is_text],
        )

    @classmethod
    def for_video_with_captions(
        cls,
        num_frames: int,
        tokens_per_frame: int,
        caption_tokens: Sequence[int],
        caption_shots: Sequence[int],
        shot_frames: Sequence[int] | None = None,
        chunk_tokens: int | None = None,
        captions_first: bool = True,
    ) -> ChunkLayout:
        r"""Captions and video in one sequence (joint attention): captions before (default) or after the video."""
        video = cls.for_video(num_frames, tokens_per_frame, shot_frames, chunk_tokens)
        text = cls.for_captions(caption_tokens, caption_shots)
        return cls.concat(text, video) if captions_first else cls.concat(video, text)

    # ------------------------------------------------------------------ derived facts
    @property
    def num_chunks(self) -> int:
        return len(self.sizes)

    def _memo(self, key: str, build):
        # Python facts derived once per layout (not `cached_property`: its lock is opaque to torch.compile in
        # Python 3.11). Under compilation they are recomputed: no dict mutation enters the graph.
        if torch.compiler.is_compiling():
            return build()
        if key not in self._device_cache:
            self._device_cache[key] = build()
        return self._device_cache[key]

    @property
    def num_tokens(self) -> int:
        return self._memo("num_tokens", lambda: sum(self.sizes))

    @property
    def offsets(self) -> tuple[int, ...]:
        """Start of each chunk plus the total length (`cu_seqlens`-style, length `num_chunks + 1`)."""

        def build():
            out = [0]
            for s in self.sizes:
                out.append(out[-1] + s)
            return tuple(out)

        return self._memo("offsets", build)

    @property
    def num_shots(self) -> int:
        return len({s for s in self.shots if s >= 0})

    def __repr__(self) -> str:
        n_text = sum(self.is_text)
        return (
            f"ChunkLayout(num_tokens={self.num_tokens}, num_chunks={self.num_chunks}, text_chunks={n_text}, "
            f"shots={self.num_shots})"
        )

    def _cached(self, key: str, device: torch.device | str, build):
        """`build(device)`, cached per device in eager mode. Under `torch.compile` / `torch.export` the tensors are
        rebuilt from the layout's integers as graph constants, so no cache dict (nor its guards) enters the graph."""
        device = torch.device(device)
        if torch.compiler.is_compiling():
            return build(device)
        k = (key, str(device))
        if k not in self._device_cache:
            self._device_cache[k] = build(device)
        return self._device_cache[k]

    def token_chunks(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """`(L,)` long tensor: the chunk index of every token."""

        def build(device):
            sizes = torch.tensor(self.sizes, device=device)
            return torch.repeat_interleave(
                torch.arange(self.num_chunks, device=device), sizes, output_size=self.num_tokens
            )

        return self._cached("token_chunks", device, build)

    def chunk_sizes(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """`(C,)` long tensor of chunk sizes."""
        return self._cached("chunk_sizes", device, lambda d: torch.tensor(self.sizes, dtype=torch.long, device=d))

    def anchor_mask(
        self, local_window: int, anchor_own_shot: bool, text_anchors: str, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """`(C, C)` bool: `[a, c]` is True when chunk `c` is a mandatory anchor for queries of chunk `a`."""
        if text_anchors not in ("all", "shot"):
            raise ValueError(f"text_anchors must be 'all' or 'shot', got {text_anchors!r}")
        key = f"anchors:{local_window}:{anchor_own_shot}:{text_anchors}"
        return self._cached(
            key, device, lambda d: self._build_anchor_mask(local_window, anchor_own_shot, text_anchors, d)
        )

    def _video_ranks(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Per chunk: how many video chunks of its shot lie strictly before it, and at or before it."""
        before, upto, seen = [], [], {}
        for shot, is_text in zip(self.shots, self.is_text):
            n = seen.get(shot, 0)
            before.append(n)
            if not is_text:
                n += 1
                seen[shot] = n
            upto.append(n)
        return tuple(before), tuple(upto)

    def _build_anchor_mask(
        self, local_window: int, anchor_own_shot: bool, text_anchors: str, device: torch.device
    ) -> torch.Tensor:
        # Built from per-chunk vectors with broadcasting (no host reads, no data-dependent shapes), so that it is
        # cheap to trace; rows are queries' chunks `a`, columns attended chunks `c`.
        C = self.num_chunks
        shots = torch.tensor(self.shots, device=device)
        is_text = torch.tensor(self.is_text, device=device)
        idx = torch.arange(C, device=device)
        mask = idx[:, None] == idx[None, :]
        same_shot = (shots[:, None] == shots[None, :]) & (shots[:, None] >= 0)
        if local_window > 0:
            # Local window: the nearest `local_window` video chunks of the same shot on each side of `a`, counted
            # among that shot's video chunks only. `before[x]` / `upto[x]` count the shot's video chunks strictly
            # before / up to chunk x, so a video chunk c < a is within the window when before[a] - before[c] <= w.
            before, upto = (torch.tensor(v, device=device) for v in self._video_ranks())
            video_c = same_shot & ~is_text[None, :]
            left = (idx[None, :] < idx[:, None]) & (before[:, None] - before[None, :] <= local_window)
            right = (idx[None, :] > idx[:, None]) & (before[None, :] - upto[:, None] < local_window)
            mask |= video_c & (left | right)
        if anchor_own_shot:
            mask |= same_shot
        if text_anchors == "all":
            mask |= is_text[None, :]
        else:
            own_caption = is_text[None, :] & same_shot
            global_caption = is_text[None, :] & (shots[None, :] == GLOBAL_SHOT)
            mask |= own_caption | global_caption
        return mask

    def candidate_mask(
        self,
        local_window: int,
        anchor_own_shot: bool,
        text_anchors: str,
        causal: bool,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """`(C, C)` bool: `[a, c]` is True when chunk `c` may be routed to (top-k) by queries of chunk `a`."""
        key = f"cands:{local_window}:{anchor_own_shot}:{text_anchors}:{causal}"

        def build(device):
            cand = ~self.anchor_mask(local_window, anchor_own_shot, text_anchors, device)
            if causal:
                idx = torch.arange(self.num_chunks, device=device)
                cand = cand & (idx[None, :] < idx[:, None])
            return cand

        return self._cached(key, device, build)

    def block_counts(self, block_size: int) -> tuple[int, ...]:
        """Query blocks of `route_by="block"` in each chunk: `ceil(size / block_size)`."""
        return tuple(math.ceil(s / block_size) for s in self.sizes)

    def token_blocks(self, block_size: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """
        Query blocks for `route_by="block"`: tiles of `block_size` consecutive tokens that never cross a chunk.

        Returns `(token_block, block_chunk)`: the block of every token `(L,)` and the chunk of every block `(G,)`.
        """
        counts = self.block_counts(block_size)

        def build_block_chunk(device):
            n = torch.tensor(counts, device=device)
            return torch.repeat_interleave(torch.arange(self.num_chunks, device=device), n, output_size=sum(counts))

        def build_token_block(device):
            first_block = torch.tensor([0, *counts[:-1]], device=device).cumsum(0)
            starts = torch.tensor(self.offsets[:-1], device=device)
            tok_chunk = self.token_chunks(device)
            pos_in_chunk = torch.arange(self.num_tokens, device=device) - starts[tok_chunk]
            return first_block[tok_chunk] + torch.div(pos_in_chunk, block_size, rounding_mode="floor")

        token_block = self._cached(f"tb:{block_size}", device, build_token_block)
        block_chunk = self._cached(f"bc:{block_size}", device, build_block_chunk)
        return token_block, block_chunk
