"""Training data: a folder of (multi-shot) clips described by `metadata.jsonl`, with an optional latent cache.

`metadata.jsonl` has one JSON object per clip (paths relative to the folder; frame ranges in pixel frames,
`[start, end)`, end exclusive)::

    {"file": "clips/0001.mp4", "caption": "a rainy night in the city",
     "shots": [{"caption": "a man walks", "frames": [0, 9]}, {"caption": "close up", "frames": [9, 17]}]}
    {"file": "clips/0002.mp4", "caption": "a dog runs on the beach"}

A sample is the `num_frames` pixel frames starting at the first shot; shots past it are not used and the last shot
kept is cut at its end. A multi-shot clip is conditioned as `LongVideoPipeline` conditions its shots: the global
`caption` and each distinct shot caption are encoded separately and concatenated, and each shot's video tokens attend
only to the global caption plus their own shot's caption (`caption_layout`, `moc_context(caption_spans=...)`). A shot
without a caption attends to the global caption only (so it needs one). A clip with a single caption (no `shots`, or
all its captions equal) is one prompt with stock cross-attention. The shots reach MoC self-attention as latent frames
per shot.

Clips that cannot be read (corrupt, missing, too short, bad metadata) are reported with a warning naming them and
skipped; only when no clip is usable is it an error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ..core.atomic import deferred_interrupts
from ..shot_plan import latent_shot_frames

__all__ = [
    "ClipRecord",
    "VideoClipDataset",
    "CachedLatentDataset",
    "StepBatchSampler",
    "collate_samples",
    "latent_shot_frames",
    "read_clip",
]

logger = logging.getLogger(__name__)

#: Bumped when what a cache file holds changes: `prompt_embeds` is the per-caption text context since format 2.
_CACHE_FORMAT = 2
_CACHE_KEYS = frozenset({"latent_mean", "latent_std", "prompt_embeds"})


@dataclass(frozen=True)
class ClipRecord:
    r"""
    One usable line of `metadata.jsonl`.

    Attributes:
        path (`str`): absolute path of the clip.
        start (`int`): first pixel frame of the sample.
        prompt (`str`): all captions of the sample joined, for logs and display.
        shot_frames (`tuple[int]` or `None`): latent frames per shot; `None` for a single shot.
        shot_pixel_frames (`tuple[int]`): pixel frames per shot in the sample (one entry for a single shot); the
            sample's [`ShotPlan`] is built from them as `plan_shots(..., one_clip=True)`.
        line (`int`): 1-based line in the metadata file.
        global_caption (`str`, *optional*): the clip's `caption` (stripped; `None` when absent or empty).
        shot_captions (`tuple[str | None, ...]`): the caption of each shot in the sample (stripped; `None` when
            absent or empty); `(None,)` for a clip without `shots`. With `global_caption` they make the
            text context via [`caption_layout`].
    """

    path: str
    start: int
    prompt: str
    shot_frames: tuple[int, ...] | None
    shot_pixel_frames: tuple[int, ...]
    line: int
    global_caption: str | None = None
    shot_captions: tuple[str | None, ...] = (None,)


def _parse_line(obj: object, root: str, num_frames: int) -> ClipRecord:
    if not isinstance(obj, dict):
        raise ValueError("each line must be a JSON object")
    if not isinstance(obj.get("file"), str) or not obj["file"]:
        raise ValueError("'file' (the clip path) is required")
    caption = obj.get("caption")
    if caption is not None and not isinstance(caption, str):
        raise ValueError("'caption' must be a string")
    shots = obj.get("shots")
    if shots is None:
        if not caption:
            raise ValueError("a clip without 'shots' needs a 'caption'")
        shots = [{"caption": "", "frames": [0, None]}]
    if not isinstance(shots, list) or not shots:
        raise ValueError("'shots' must be a non-empty list")
    ranges, captions = [], []
    for i, shot in enumerate(shots):
        frames = shot.get("frames") if isinstance(shot, dict) else None
        if (
            not isinstance(frames, list)
            or len(frames) != 2
            or not isinstance(frames[0], int)
            or isinstance(frames[0], bool)
            or not (frames[1] is None or (isinstance(frames[1], int) and not isinstance(frames[1], bool)))
            or frames[0] < 0
            or (frames[1] is not None and frames[1] <= frames[0])
        ):
            raise ValueError(f"shots[{i}].frames must be [start, end] with 0 <= start < end (end exclusive or null)")
        if not isinstance(shot.get("caption", ""), str):
            raise ValueError(f"shots[{i}].caption must be a string")
        ranges.append(frames)
        captions.append(shot.get("caption", ""))
    for i in range(1, len(ranges)):
        if ranges[i - 1][1] != ranges[i][0]:
            raise ValueError(f"shots[{i}] must start where shots[{i - 1}] ends (frame {ranges[i - 1][1]})")
    start = ranges[0][0]
    if ranges[-1][1] is not None and ranges[-1][1] - start < num_frames:
        raise ValueError(
            f"the shots cover frames [{start}, {ranges[-1][1]}), {ranges[-1][1] - start} frames; a sample needs "
            f"{num_frames} (data.num_frames)"
        )
    # Shots past the sample window are not seen in training; the last kept shot is cut at the window end.
    starts = [r[0] - start for r in ranges if r[0] - start < num_frames]
    captions = captions[: len(starts)]
    shot_frames = latent_shot_frames(starts, num_frames) if len(starts) > 1 else None
    prompt = " ".join(t.strip() for t in [caption or "", *captions] if t and t.strip())
    if not prompt:
        raise ValueError("no caption: give a global 'caption' or shot captions")
    global_caption = caption.strip() if caption and caption.strip() else None
    shot_captions = tuple(c.strip() if c.strip() else None for c in captions)
    if global_caption is None:
        missing = [i for i, c in enumerate(shot_captions) if c is None]
        if missing:
            raise ValueError(
                f"shots[{missing[0]}] has no caption and the clip has no global 'caption' for it to attend to"
            )
    path = obj["file"] if os.path.isabs(obj["file"]) else os.path.join(root, obj["file"])
    return ClipRecord(
        path=os.path.abspath(path),
        start=start,
        prompt=prompt,
        shot_frames=shot_frames,
        shot_pixel_frames=tuple(b - a for a, b in zip(starts, [*starts[1:], num_frames])),
        line=0,
        global_caption=global_caption,
        shot_captions=shot_captions,
    )


#: Longest metadata line read (bytes); a longer line is skipped with a warning.
MAX_METADATA_LINE = 1 << 20


def _metadata_lines(f) -> Iterator[tuple[int, bytes | None]]:
    """`(line number, bytes)` of a binary file; a line over `MAX_METADATA_LINE` bytes comes back as `None`."""
    line_no = 0
    while True:
        line = f.readline(MAX_METADATA_LINE + 1)
        if not line:
            return
        line_no += 1
        if len(line) > MAX_METADATA_LINE and not line.endswith(b"\n"):
            while (rest := f.readline(MAX_METADATA_LINE)) and not rest.endswith(b"\n"):
                pass  # skip the rest of the over-long line
            line = None
        yield line_no, line


def _decode_line(line: bytes | None) -> object:
    if line is None:
        raise ValueError(f"the line is longer than {MAX_METADATA_LINE} bytes")
    try:
        text = line.decode("utf-8-sig")  # a byte-order mark at the start of the file is not part of the JSON
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 text (byte {line[e.start]:#04x} at column {e.start + 1})") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("the JSON is nested too deeply") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON: {e}") from None


def _text_fields(r: ClipRecord) -> dict:
    # What a sample carries besides its pixels or latents: the text and the shots.
    return {
        "prompt": r.prompt,
        "global_caption": r.global_caption,
        "shot_captions": r.shot_captions,
        "shot_frames": r.shot_frames,
        "shot_pixel_frames": r.shot_pixel_frames,
    }


def read_clip(path: str, start: int, num_frames: int, height: int, width: int) -> torch.Tensor:
    r"""
    Decode `num_frames` frames from `start`, resize (shorter side) and center-crop to `height x width`.

    Returns:
        `torch.Tensor` of shape `(3, num_frames, height, width)` in `[-1, 1]`.

    Raises:
        `ValueError` or `OSError` when the clip cannot be decoded or is too short.
    """
    import av
    import numpy as np

    # PyAV directly: imageio's pyav plugin runs gc.collect() on close, which costs more than decoding a short clip.
    frames = []
    with av.open(path) as container:
        if not container.streams.video:
            raise ValueError("has no video stream")
        for i, frame in enumerate(container.decode(video=0)):
            if i >= start:
                frames.append(frame.to_ndarray(format="rgb24"))
            if len(frames) == num_frames:
                break
    if len(frames) < num_frames:
        raise ValueError(f"has {start + len(frames)} frames, needs {start + num_frames}")
    video = torch.from_numpy(np.stack(frames)[..., :3].copy()).permute(0, 3, 1, 2).float()  # F, 3, H, W
    h, w = video.shape[-2:]
    scale = max(height / h, width / w)
    size = (max(height, math.ceil(h * scale)), max(width, math.ceil(w * scale)))
    if size != (h, w):
        video = torch.nn.functional.interpolate(video, size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    video = video[:, :, top : top + height, left : left + width]
    return (video / 127.5 - 1.0).clamp(-1, 1).permute(1, 0, 2, 3).contiguous()


class VideoClipDataset(torch.utils.data.Dataset):
    r"""
    The clips listed in `root/metadata.jsonl` (see the module docstring for the format).

    Args:
        root (`str`): folder of the clips and the metadata file.
        num_frames (`int`): pixel frames per sample (`4n + 1`).
        height, width (`int`): sample resolution.
        metadata (`str`, defaults to `"metadata.jsonl"`): metadata file name inside `root`.
        validate (`bool`, defaults to `True`): decode every clip once now, so unreadable clips are reported and
            skipped before training. Without it, only missing files are caught here; a clip that fails later is
            reported and replaced by the next usable one.

    Raises:
        `FileNotFoundError` when the metadata file is missing; `ValueError` when no clip is usable.
    """

    def __init__(
        self,
        root: str,
        num_frames: int,
        height: int,
        width: int,
        metadata: str = "metadata.jsonl",
        validate: bool = True,
    ):
        self.root = os.path.abspath(root)
        self.num_frames, self.height, self.width = num_frames, height, width
        meta_path = os.path.join(self.root, metadata)
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"no metadata file {meta_path}; see diffusers_moc.training.data for its format")
        records, skipped = [], 0
        with open(meta_path, "rb") as f:
            for line_no, line in _metadata_lines(f):
                if line is not None and not line.strip():
                    continue
                try:
                    record = _parse_line(_decode_line(line), self.root, num_frames)
                    record = ClipRecord(**{**record.__dict__, "line": line_no})
                except (ValueError, TypeError, AttributeError) as e:
                    logger.warning("skipping %s line %d: %s", meta_path, line_no, e)
                    skipped += 1
                    continue
                problem = self._check(record, decode=validate)
                if problem:
                    logger.warning(
                        "skipping unreadable clip %s (%s line %d): %s", record.path, meta_path, line_no, problem
                    )
                    skipped += 1
                    continue
                records.append(record)
        if not records and not skipped:
            raise ValueError(f"no usable clips in {meta_path}: it lists no clips (one JSON object per line)")
        if not records:
            raise ValueError(
                f"no usable clips in {meta_path}: all {skipped} entries were skipped (see the warnings above for each "
                "clip and the reason)"
            )
        self.records: list[ClipRecord] = records
        self.num_skipped = skipped
        self._bad: set[int] = set()

    def _check(self, record: ClipRecord, decode: bool) -> str | None:
        if not os.path.isfile(record.path):
            return "file not found"
        if decode:
            try:
                read_clip(record.path, record.start, self.num_frames, self.height, self.width)
            except Exception as e:  # any decoder failure means: skip this clip, with its reason
                return f"{type(e).__name__}: {e}"
        return None

    def __len__(self) -> int:
        return len(self.records)

    def load(self, index: int) -> dict:
        """Sample `index` without fallback (raises when the clip cannot be read)."""
        r = self.records[index]
        video = read_clip(r.path, r.start, self.num_frames, self.height, self.width)
        return {"video": video, "path": r.path, **_text_fields(r)}

    def __getitem__(self, index: int) -> dict:
        # A clip that breaks mid-run (e.g. a network file system hiccup) must not end a long run: report it and use
        # the next readable clip, deterministically, so data order stays reproducible.
        for offset in range(len(self.records)):
            i = (index + offset) % len(self.records)
            if i in self._bad:
                continue
            try:
                return self.load(i)
            except Exception as e:
                logger.warning("skipping unreadable clip %s: %s: %s", self.records[i].path, type(e).__name__, e)
                self._bad.add(i)
        raise RuntimeError(f"no clip of {self.root} can be read any more (all {len(self.records)} failed)")


class CachedLatentDataset(torch.utils.data.Dataset):
    r"""
    Precomputed VAE latent distributions and text contexts of a [`VideoClipDataset`], one safetensors file per
    clip under `cache_dir` (reused across runs while the clip file, its window, resolution, captions and `tag` are
    unchanged).

    Args:
        dataset (`VideoClipDataset`): the clips.
        cache_dir (`str`): cache folder.
        encode (`Callable[[torch.Tensor, ClipRecord], dict[str, torch.Tensor]]`): `(video (3,F,H,W), record)` to
            `{"latent_mean", "latent_std", "prompt_embeds"}` (unbatched; `prompt_embeds` is the whole text context,
            the captions' embeddings concatenated, so clips may differ in its length).
        tag (`str`): everything else the encoding depends on (encoder models, their dtype, the text length
            `max_sequence_length`); part of the cache key, so changing any of them re-encodes.
        keys (`frozenset[str]`, *optional*): the tensors `encode` returns (default: Wan's three); a cache file holding
            others is re-encoded.
    """

    def __init__(
        self,
        dataset: VideoClipDataset,
        cache_dir: str,
        encode: Callable[[torch.Tensor, str], dict[str, torch.Tensor]],
        tag: str,
        keys: frozenset[str] = _CACHE_KEYS,
    ):
        from safetensors.torch import load_file, save_file

        os.makedirs(cache_dir, exist_ok=True)
        self.items: list[dict] = []
        for i, r in enumerate(dataset.records):
            stat = os.stat(r.path)
            key = json.dumps(
                [r.path, stat.st_size, stat.st_mtime_ns, r.start, dataset.num_frames, dataset.height, dataset.width]
                + [_CACHE_FORMAT, r.global_caption, list(r.shot_captions), tag]
            )
            path = os.path.join(cache_dir, hashlib.sha1(key.encode()).hexdigest() + ".safetensors")
            tensors = None
            if os.path.isfile(path):
                try:
                    tensors = load_file(path)
                    if set(tensors) != keys:
                        raise ValueError(f"holds {sorted(tensors)}, expected {sorted(keys)}")
                except Exception as e:  # a damaged cache file is re-encoded, not fatal
                    logger.warning("re-encoding %s: its cache file %s is unreadable (%s)", r.path, path, e)
                    tensors = None
            if tensors is None:
                try:
                    sample = dataset.load(i)
                except Exception as e:
                    logger.warning("skipping unreadable clip %s: %s: %s", r.path, type(e).__name__, e)
                    continue
                with torch.no_grad():
                    tensors = {k: v.detach().cpu().contiguous() for k, v in encode(sample["video"], r).items()}
                # Written under a temporary name and renamed: an interrupted run never leaves a truncated cache file.
                tmp = f"{path}.{os.getpid()}.partial"
                try:
                    save_file(tensors, tmp)
                    os.replace(tmp, path)
                finally:
                    with deferred_interrupts():
                        if os.path.exists(tmp):
                            os.remove(tmp)
            self.items.append({**tensors, "path": r.path, **_text_fields(r)})
        if not self.items:
            raise ValueError(f"no usable clips in {dataset.root}: none could be decoded (see the warnings above)")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        return self.items[index]


def collate_samples(samples: list[dict]) -> dict:
    """Stack the tensors of a batch (a list when their shapes differ, e.g. text contexts); the rest stay lists."""
    out: dict = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if isinstance(values[0], torch.Tensor) and all(v.shape == values[0].shape for v in values):
            out[key] = torch.stack(values)
        else:
            out[key] = values
    return out


class StepBatchSampler(torch.utils.data.Sampler):
    r"""
    Endless, resumable batches: micro-batch `m` of the run is a pure function of `(seed, m)`.

    Each epoch is a fresh permutation seeded by `seed + epoch` (incomplete last global batches are dropped). With
    several processes every rank takes its slice of the global batch. Starting at `start` reproduces exactly the
    batches an uninterrupted run would see from micro-batch `start` on, which is what exact resume needs; it never
    touches the global RNG.

    Args:
        num_items (`int`): dataset size.
        batch_size (`int`): per-process batch size.
        seed (`int`): data-order seed.
        rank, world_size (`int`): this process and the number of processes.
        start (`int`): first micro-batch to yield.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, start: int = 0):
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world_size, self.start = rank, world_size, start
        self.global_batch = batch_size * world_size
        if num_items < self.global_batch:
            raise ValueError(
                f"the dataset has {num_items} usable clips, fewer than one global batch "
                f"(batch_size {batch_size} x {world_size} processes)"
            )
        self.batches_per_epoch = num_items // self.global_batch

    def batch(self, micro_batch: int) -> list[int]:
        """Indices of this rank's part of micro-batch `micro_batch`."""
        epoch, pos = divmod(micro_batch, self.batches_per_epoch)
        perm = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed + epoch))
        begin = pos * self.global_batch + self.rank * self.batch_size
        return perm[begin : begin + self.batch_size].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        m = self.start
        while True:
            yield self.batch(m)
            m += 1
