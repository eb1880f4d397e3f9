"""Routing maps: what MoC attention attended, per layer, as query frame x key frame heatmaps and numbers.

>>> from diffusers_moc import moc_routing_map
>>> with moc_routing_map() as routing_map:   # around any MoC call: a pipeline, a transformer forward
...     video = pipe(prompt).frames[0]
>>> routing_map.save("map.png")               # heatmaps, and the numbers in map.json

For every MoC self-attention layer the recorder adds up, over all its calls (denoising steps, guidance branches,
batch and heads), which key frames each query token attends, as a mandatory anchor (own chunk, local window, own shot,
captions) or routed (chosen by top-k). A cell `(q, k)` is the fraction of query frame `q`'s (token, head) pairs that
attend at least one token of key frame `k` that way. With one chunk per frame (the default) a frame is attended
whole or not at all; with other `chunk_tokens` a chunk that covers frames `k` and `k + 1` counts for both, and a frame
can be attended partly as anchor and partly as routed, counting in both maps. Only video tokens are rows and columns
(a joint-attention model's one caption chunk counts in the density, not in the map), except in a stream with per-shot
captions (HunyuanVideo 1.5 with `caption_shots`): there each condition chunk (a shot's caption, its glyph text, the
global caption, the start image's tokens) is a row and a column of its own, placed in the stream order MoC routes in
(global chunks first, then each shot's captions before its frames), so the map shows which caption each shot's frames
attended and what each caption attended. The density of a layer is the attended fraction of all its query-key pairs,
text included (padded caption tokens counted as present).

Recording costs nothing when off: the attention step reads one attribute (`context.PROCESS_STATE.recorder`) and does
nothing else. While a recorder is active, each MoC call also returns its routing and the counts are computed and read
back to the host. A `torch.compile`d model works with recording off; asked to record, it raises an error that says to
record with the uncompiled model (the counts need host reads that a compiled graph cannot make; the compiled model
reads the recorder as a guarded constant, so entering one makes it retrace and refuse).
"""

from __future__ import annotations

import fnmatch
import json
import os
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from .atomic import deferred_interrupts, remove_path, remove_stale_partials
from .context import PROCESS_STATE
from .layout import ChunkLayout
from .routing import MoCRouting

__all__ = ["RoutingMap", "moc_routing_map", "active_routing_map", "MAP_EXTENSIONS"]

#: Image files a routing map is rendered to (matplotlib's formats without extra dependencies).
MAP_EXTENSIONS = (".png", ".pdf", ".svg")
# (B, H) rows of the routed-frame computation done at once: bounds its (rows, L, C) transient.
_ROW_ELEMS = 1 << 24


def active_routing_map() -> RoutingMap | None:
    """The routing map being recorded, or `None` (the check MoC attention makes on every call)."""
    return PROCESS_STATE.recorder


class _LayerCounts:
    def __init__(self, frames: int):
        self.anchor = torch.zeros(frames, frames, dtype=torch.float64)
        self.routed = torch.zeros(frames, frames, dtype=torch.float64)
        self.samples = torch.zeros(frames, dtype=torch.float64)  # (token, head) pairs per query frame
        self.pairs = 0.0  # attended query-key pairs
        self.total = 0.0  # all query-key pairs
        self.calls = 0

    def to_dict(self) -> dict[str, Any]:
        per_query = self.samples.clamp(min=1)[:, None]
        return {
            "calls": self.calls,
            "density": self.pairs / self.total if self.total else 0.0,
            "anchor": (self.anchor / per_query).tolist(),
            "routed": (self.routed / per_query).tolist(),
        }


@dataclass(frozen=True)
class _Rows:
    """The rows (and columns) of a map over a stream with labelled text chunks, in stream order."""

    labels: tuple[str, ...]  # "frame 3", "caption (shot 1)", ...
    shots: tuple[int, ...]  # shot of each row (-1: global)
    frame_shots: tuple[int, ...]  # shot of each latent frame
    token_rows: torch.Tensor  # (L,) long: row of each token, -1 for tokens left out (padding)
    cover: torch.Tensor  # (C, R) float: 1 where chunk c holds tokens of row r


def _stream_rows(layout: ChunkLayout, text_rows: Sequence[str | None], frames: int, per_frame: int) -> _Rows:
    """Rows of a stream whose video tokens (those of its non-text chunks, in stream order) are `frames` latent frames
    of `per_frame` tokens, interleaved with the text chunks `text_rows` labels."""
    if len(text_rows) != layout.num_chunks:
        raise ValueError(f"text_rows labels {len(text_rows)} chunks; the layout has {layout.num_chunks}")
    labels, shots, chunk_rows, frame_row = [], [], [], {}
    token_rows = torch.full((layout.num_tokens,), -1, dtype=torch.long)
    offsets, video = layout.offsets, 0
    for c in range(layout.num_chunks):
        start, end = offsets[c], offsets[c + 1]
        if layout.is_text[c]:
            rows = [] if text_rows[c] is None else [len(labels)]
            if rows:
                labels.append(text_rows[c])
                shots.append(layout.shots[c])
                token_rows[start:end] = rows[0]
        else:
            first, last = video // per_frame, (video + end - start - 1) // per_frame
            if last >= frames:
                raise ValueError(f"the stream holds more than {frames} latent frames of {per_frame} video tokens")
            for f in range(first, last + 1):
                if f not in frame_row:
                    frame_row[f] = len(labels)
                    labels.append(f"frame {f}")
                    shots.append(layout.shots[c])
            rows = [frame_row[f] for f in range(first, last + 1)]
            token_rows[start:end] = torch.tensor(rows)[torch.arange(video, video + end - start) // per_frame - first]
            video += end - start
        chunk_rows.append(rows)
    if video != frames * per_frame:
        raise ValueError(f"the stream holds {video} video tokens, not {frames} latent frames of {per_frame}")
    cover = torch.zeros(layout.num_chunks, len(labels), dtype=torch.float32)
    for c, rows in enumerate(chunk_rows):
        cover[c, rows] = 1.0
    frame_shots = tuple(shots[frame_row[f]] for f in range(frames))
    return _Rows(tuple(labels), tuple(shots), frame_shots, token_rows, cover)


def _frame_cover(layout: ChunkLayout, video_start: int, frames: int, per_frame: int) -> torch.Tensor:
    """`(C, F)` float: 1 where chunk `c` holds tokens of video frame `f`."""
    cover = torch.zeros(layout.num_chunks, frames, dtype=torch.float32)
    offsets = layout.offsets
    for c in range(layout.num_chunks):
        if layout.is_text[c]:
            continue
        first = (offsets[c] - video_start) // per_frame
        last = (offsets[c + 1] - 1 - video_start) // per_frame
        cover[c, first : last + 1] = 1.0
    return cover


class RoutingMap:
    r"""
    Per-layer counts of which key frames each query frame attends under MoC, as anchor or routed. Made by
    [`moc_routing_map`]; see the module docstring for what the numbers mean.

    Args:
        layers (`Sequence[int | str]`, *optional*): the layers to record: positions in the order the layers are first
            called (`0` is the first MoC self-attention layer of a forward; on Wan 2.2 A14B the low-noise expert's
            layers come after the high-noise expert's) or names and `fnmatch` patterns (`"blocks.3.attn1"`,
            `"*blocks.0.*"`). A layer of `transformer_2` applied through a pipeline is named
            `"transformer_2/blocks.0.attn1"`. `None` (default): every layer.
    """

    def __init__(self, layers: Sequence[int | str] | None = None):
        if layers is not None:
            if isinstance(layers, (str, int)):
                layers = [layers]
            for item in layers:
                if isinstance(item, bool) or not isinstance(item, (int, str)):
                    raise TypeError(f"layers must hold layer positions (int) or names (str), got {item!r}")
        self.layers = None if layers is None else list(layers)
        self._counts: dict[str, _LayerCounts] = {}
        self._seen: list[str] = []  # every layer key, in first-call order
        self._keys: dict[tuple[int, str], str] = {}
        self.frames: int | None = None
        self.tokens_per_frame: int | None = None
        self.frame_shots: list[int] | None = None
        #: With labelled text chunks: every row's label and shot, in stream order (`None`: video frames only).
        self.rows: list[str] | None = None
        self.row_shots: list[int] | None = None
        #: Calls of the same video without caption chunks, left out of a map with caption rows (classifier-free
        #: guidance's unconditional pass, whose negative prompt is one chunk of no shot).
        self.skipped_calls = 0

    # ------------------------------------------------------------------ recording
    def _key(self, layer: str | None, owner: object) -> str:
        name = layer or f"layer{len(self._seen)}"
        if (id(owner), name) not in self._keys:
            key, n = name, 2
            taken = set(self._keys.values())
            while key in taken:  # two transformers applied one by one share layer names
                key, n = f"{name}#{n}", n + 1
            self._keys[id(owner), name] = key
            self._seen.append(key)
        return self._keys[id(owner), name]

    def _wanted(self, key: str) -> bool:
        if self.layers is None:
            return True
        position = self._seen.index(key)
        return any(
            (isinstance(item, int) and item == position) or (isinstance(item, str) and fnmatch.fnmatchcase(key, item))
            for item in self.layers
        )

    def _check_video(self, frames: int, per_frame: int, shots: list[int], labels: list[str] | None = None) -> None:
        if self.frames is None:
            self.frames, self.tokens_per_frame, self.frame_shots, self.rows = frames, per_frame, shots, labels
        elif (self.frames, self.tokens_per_frame, self.frame_shots, self.rows) != (frames, per_frame, shots, labels):
            what = "" if labels is None and self.rows is None else f" (rows {self.rows}, this call {labels})"
            raise ValueError(
                f"a routing map records one video layout: it has {self.frames} latent frames of "
                f"{self.tokens_per_frame} tokens in shots {self.frame_shots}, this call {frames} of {per_frame} in "
                f"{shots}{what}; use one moc_routing_map per video"
            )

    @torch.no_grad()
    def record(
        self,
        layer: str | None,
        routing: MoCRouting,
        video_start: int,
        frames: int,
        tokens_per_frame: int,
        owner: object = None,
        text_rows: Sequence[str | None] | None = None,
    ) -> None:
        r"""
        Add one MoC attention call (called by the processors' shared step while this map is active).

        Args:
            layer (`str`, *optional*): the layer's name as `apply_moc` gives it (`"transformer_2/blocks.0.attn1"`);
                `None` for a processor set with `set_attn_processor` alone.
            routing ([`MoCRouting`]): the call's routing over its whole stream.
            video_start (`int`): position of the first video token in the stream (after a leading caption).
            frames (`int`), tokens_per_frame (`int`): the latent frame grid of the video tokens.
            owner (`object`, *optional*): what installed the layer (tells apart two transformers whose layers have
                the same name).
            text_rows (`Sequence[str | None]`, *optional*): a stream with per-shot caption chunks: per chunk of the
                layout, the label of a text chunk to show as its own row and column (`None` for video chunks and
                for text left out, such as padding). The video tokens are then those of the non-text chunks, in
                stream order (they need not be contiguous), and `video_start` is not read.
        """
        key = self._key(layer, owner)
        if not self._wanted(key):
            return
        layout = routing.layout
        if text_rows is not None:
            rows = _stream_rows(layout, text_rows, frames, tokens_per_frame)
            if self.rows is None and self._counts:
                # Calls without caption chunks came first (see `skipped_calls`): the map shows the captions.
                self._check_video(frames, tokens_per_frame, list(rows.frame_shots))
                self.skipped_calls += sum(c.calls for c in self._counts.values())
                self._counts.clear()
                self.frames = None
            self._check_video(frames, tokens_per_frame, list(rows.frame_shots), list(rows.labels))
            self.row_shots = list(rows.shots)
            self._record_rows(self._counts.setdefault(key, _LayerCounts(len(rows.labels))), routing, rows)
            return
        token_chunks = layout.token_chunks()
        firsts = token_chunks[video_start : video_start + frames * tokens_per_frame : tokens_per_frame].tolist()
        shots = [layout.shots[c] for c in firsts]
        if self.rows is not None:
            self._check_video(frames, tokens_per_frame, shots, self.rows)
            self.skipped_calls += 1
            return
        self._check_video(frames, tokens_per_frame, shots)
        counts = self._counts.setdefault(key, _LayerCounts(frames))
        B, H, L, _ = routing.selected.shape
        video = slice(video_start, video_start + frames * tokens_per_frame)
        selected = routing.selected.cpu()
        anchors = routing.anchors.cpu()
        cover = _frame_cover(layout, video_start, frames, tokens_per_frame)
        query_chunks = layout.token_chunks()[video]
        # Anchors are per chunk, the same for every head: each query token's anchored frames, summed per query frame.
        anchored = (anchors.float() @ cover > 0).double()[query_chunks]
        counts.anchor += anchored.view(frames, tokens_per_frame, frames).sum(1) * (B * H)
        counts.routed += self._routed_frames(selected[:, :, video], cover, layout.num_chunks, frames)
        counts.samples += tokens_per_frame * B * H
        self._add_density(counts, routing, selected, anchors)

    @staticmethod
    def _add_density(counts: _LayerCounts, routing: MoCRouting, selected: torch.Tensor, anchors: torch.Tensor) -> None:
        layout = routing.layout
        B, H, L, _ = selected.shape
        sizes = layout.chunk_sizes().double()
        anchor_tokens = (anchors.double() @ sizes)[layout.token_chunks()].sum() * (B * H)
        valid = selected >= 0
        routed_tokens = (sizes[selected.clamp(min=0)] * valid).sum()
        counts.pairs += float(anchor_tokens + routed_tokens)
        counts.total += float(B * H) * L * L
        counts.calls += 1

    def _record_rows(self, counts: _LayerCounts, routing: MoCRouting, rows: _Rows) -> None:
        """[`record`] over labelled rows: the same counts, with each token's row read off `rows.token_rows`."""
        layout = routing.layout
        B, H, L, S = routing.selected.shape
        selected, anchors = routing.selected.cpu(), routing.anchors.cpu()
        kept = rows.token_rows >= 0
        query_rows = rows.token_rows[kept]
        anchored = (anchors.float() @ rows.cover > 0).double()[layout.token_chunks()][kept]
        counts.anchor.index_add_(0, query_rows, anchored * (B * H))
        flat = selected.reshape(B * H, L, S)
        C = layout.num_chunks
        step = max(1, _ROW_ELEMS // max(1, L * (C + 1)))
        for start in range(0, B * H, step):
            part = flat[start : start + step]
            mask = torch.zeros(*part.shape[:2], C + 1, dtype=torch.float32)
            mask.scatter_(-1, part % (C + 1), 1.0)  # empty slots (-1) land in the dropped last column
            routed = (mask[..., :C] @ rows.cover > 0).double().sum(0)  # (L, R)
            counts.routed.index_add_(0, query_rows, routed[kept])
        counts.samples += torch.bincount(query_rows, minlength=len(rows.labels)).double() * (B * H)
        self._add_density(counts, routing, selected, anchors)

    @staticmethod
    def _routed_frames(selected: torch.Tensor, cover: torch.Tensor, num_chunks: int, frames: int) -> torch.Tensor:
        """`(F, F)`: per query frame, how many (token, head) pairs route to each key frame."""
        B, H, T, S = selected.shape
        rows = selected.reshape(B * H, T, S)
        out = torch.zeros(frames, frames, dtype=torch.float64)
        step = max(1, _ROW_ELEMS // max(1, T * (num_chunks + 1)))
        for start in range(0, B * H, step):
            part = rows[start : start + step]
            # Empty slots (-1) write into an extra column that is dropped.
            mask = torch.zeros(*part.shape[:2], num_chunks + 1, dtype=torch.float32)
            mask.scatter_(-1, part % (num_chunks + 1), 1.0)
            routed = (mask[..., :num_chunks] @ cover > 0).double()  # (rows, T, F)
            out += routed.view(-1, frames, T // frames, frames).sum((0, 2))
        return out

    # ------------------------------------------------------------------ results
    @property
    def layer_names(self) -> list[str]:
        """The recorded layers, in first-call order."""
        return list(self._counts)

    def shot_starts(self) -> list[int]:
        """Latent frame where each shot starts."""
        shots = self.frame_shots or []
        return [f for f in range(len(shots)) if f == 0 or shots[f] != shots[f - 1]]

    def to_dict(self) -> dict[str, Any]:
        r"""
        The numbers, as written to the JSON file: `frames`, `tokens_per_frame`, `shot_starts` (latent frames),
        `frame_shots` (shot of each frame) and `layers`, by layer name, each with `calls`, `density` and the `anchor`
        and `routed` matrices (`[query frame][key frame]`, fractions in [0, 1]), plus `mean` over the layers.

        A map over a stream with per-shot caption chunks also has `rows` (the label of each row and column, in
        stream order: `"caption (global)"`, `"glyph text (shot 0)"`, `"frame 0"`, ...), `row_shots` (shot of each
        row, -1 for global chunks) and `skipped_calls` (calls of the same video without caption chunks, left out:
        the unconditional pass of classifier-free guidance); its matrices are `[query row][key row]`.
        """
        if not self._counts:
            raise ValueError("the routing map recorded no MoC attention call (was MoC applied, and called inside it?)")
        layers = {name: counts.to_dict() for name, counts in self._counts.items()}
        n = len(layers)
        mean = {
            "density": sum(v["density"] for v in layers.values()) / n,
            "anchor": (sum(torch.tensor(v["anchor"]) for v in layers.values()) / n).tolist(),
            "routed": (sum(torch.tensor(v["routed"]) for v in layers.values()) / n).tolist(),
        }
        out = {
            "frames": self.frames,
            "tokens_per_frame": self.tokens_per_frame,
            "shot_starts": self.shot_starts(),
            "frame_shots": self.frame_shots,
        }
        if self.rows is not None:
            out.update(rows=self.rows, row_shots=self.row_shots, skipped_calls=self.skipped_calls)
        return {**out, "layers": layers, "mean": mean}

    def _row_starts(self, data: dict[str, Any]) -> list[int]:
        """Rows (columns) where a new group starts: each shot (its captions first), after the global chunks."""
        if "rows" not in data:
            return data["shot_starts"]
        shots = data["row_shots"]
        return [r for r in range(len(shots)) if r == 0 or shots[r] != shots[r - 1]]

    def figure(self):
        r"""
        The heatmaps as a matplotlib `Figure` (needs the `viz` extra: `pip install "diffusers-moc[viz]"`): one row per
        layer after a first row for the mean over layers, anchor and routed side by side, query frame (rows) by key
        frame (columns), shot boundaries drawn, the layer's density in the title. With caption rows (see
        [`~RoutingMap.to_dict`]) the rows and columns are the stream's chunks in order, captions labelled.
        """
        try:
            from matplotlib.figure import Figure
            from matplotlib.ticker import MaxNLocator
        except ImportError:
            raise ImportError('routing map pictures need matplotlib: pip install "diffusers-moc[viz]"') from None
        data = self.to_dict()
        rows = [("mean over layers", data["mean"]), *data["layers"].items()]
        size = len(data["rows"]) if "rows" in data else data["frames"]
        starts = self._row_starts(data)
        cell = max(2.2, min(5.0, 0.18 * size))
        fig = Figure(figsize=(2 * cell + 1.2, cell * len(rows) + 0.4), layout="constrained")
        axes = fig.subplots(len(rows), 2, squeeze=False)
        image = None
        for r, (name, values) in enumerate(rows):
            for c, kind in enumerate(("anchor", "routed")):
                ax = axes[r][c]
                image = ax.imshow(values[kind], vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
                for start in starts[1:]:
                    ax.axhline(start - 0.5, color="white", linewidth=1.0)
                    ax.axvline(start - 0.5, color="white", linewidth=1.0)
                ax.set_title(f"{name}: {kind} (density {values['density']:.1%})", fontsize=8)
                ax.tick_params(labelsize=6)
                if "rows" in data:
                    _label_rows(ax, data["rows"])
                    continue
                ax.set_xlabel("key frame", fontsize=7)
                ax.set_ylabel("query frame", fontsize=7)
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        bar = fig.colorbar(image, ax=axes, shrink=0.6)
        bar.set_label("fraction of the query frame's (token, head) pairs", fontsize=7)
        return fig

    # ------------------------------------------------------------------ files
    @staticmethod
    def json_path(path: str | os.PathLike) -> str:
        """Where the numbers of a map saved to `path` go: the same name with `.json`."""
        return os.path.splitext(os.fspath(path))[0] + ".json"

    def write_temporary(self, path: str | os.PathLike) -> list[tuple[str, str]]:
        r"""
        Render the picture and the numbers into hidden temporary files next to `path` and its `.json`.

        Returns:
            `list[tuple[str, str]]`: `(temporary file, destination)` pairs, for the caller to rename together with
            its other outputs (`video_io.write_videos(..., extra=...)`) or to remove.
        """
        path = os.fspath(path)
        ext = os.path.splitext(path)[1].lower()
        if ext not in MAP_EXTENSIONS:
            raise ValueError(f"{path}: a routing map picture must end in one of {list(MAP_EXTENSIONS)}")
        text = json.dumps(self.to_dict(), indent=1)
        fig = self.figure()
        pairs: list[tuple[str, str]] = []
        try:
            for dest in (path, self.json_path(path)):
                folder, name = os.path.split(os.path.abspath(dest))
                # Named as video_io's temporary folders (with the pid): what a killed run left is removed here.
                remove_stale_partials(folder, name)
                tmp = os.path.join(folder, f".{name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial")
                pairs.append((tmp, dest))
            from matplotlib.backends.backend_agg import FigureCanvasAgg

            FigureCanvasAgg(fig)
            fig.savefig(pairs[0][0], format=ext[1:], dpi=120)
            with open(pairs[1][0], "w", encoding="utf-8") as f:
                f.write(text)
        except BaseException:
            with deferred_interrupts():
                for tmp, _ in pairs:
                    remove_path(tmp)
            raise
        return pairs

    def save(self, path: str | os.PathLike) -> tuple[str, str]:
        r"""
        Write the heatmaps to `path` (`.png`, `.pdf` or `.svg`) and the numbers to the same name with `.json`,
        complete or not at all (temporary files renamed into place together).

        Returns:
            `tuple[str, str]`: the picture and the JSON file.
        """
        pairs = self.write_temporary(path)
        try:
            with deferred_interrupts():
                for tmp, dest in pairs:
                    os.replace(tmp, dest)
        finally:
            with deferred_interrupts():
                for tmp, _ in pairs:
                    remove_path(tmp)
        return pairs[0][1], pairs[1][1]


def _short_label(label: str) -> str:
    """A row's tick label: `"frame 3"` -> `"3"`, `"caption (shot 1)"` -> `"caption s1"`, `"image (global)"` ->
    `"image"`."""
    if label.startswith("frame "):
        return label.removeprefix("frame ")
    kind, _, where = label.partition(" (")
    where = where.rstrip(")")
    return kind if where == "global" and kind == "image" else f"{kind} {where.replace('shot ', 's')}"


def _label_rows(ax, labels: list[str]) -> None:
    """Tick every caption row by name; frame rows by number where they fit."""
    step = max(1, len(labels) // 24)
    ticks = [i for i, lab in enumerate(labels) if not lab.startswith("frame ") or i % step == 0]
    names = [_short_label(labels[i]) for i in ticks]
    ax.set_xticks(ticks, names, rotation=90)
    ax.set_yticks(ticks, names)
    ax.set_xlabel("key: frame or caption", fontsize=7)
    ax.set_ylabel("query: frame or caption", fontsize=7)


@contextmanager
def moc_routing_map(layers: Sequence[int | str] | None = None) -> Iterator[RoutingMap]:
    r"""
    Record what MoC attention attends inside the `with` block, for every MoC self-attention layer (or `layers`).

    Wrap any MoC call: a pipeline call (every transformer of it, both experts of Wan 2.2 A14B), a transformer
    forward, one layer. Only one routing map records at a time in a process; an inner one takes over until it ends.

    Args:
        layers (`Sequence[int | str]`, *optional*): the layers to record (see [`RoutingMap`]); default all.

    Yields:
        [`RoutingMap`]: `save(path)` writes the heatmaps and the numbers; `to_dict()` gives the numbers.

    Raises:
        `RuntimeError` (from the model's forward): a `torch.compile`d model cannot record; run it uncompiled.
    """
    recorder = RoutingMap(layers)
    outer = PROCESS_STATE.recorder
    PROCESS_STATE.recorder = recorder
    try:
        yield recorder
    finally:
        PROCESS_STATE.recorder = outer
