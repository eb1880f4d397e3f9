"""Storyboard files: a long video described in YAML or JSON (global prompt, shots, settings), validated up front.

Example (YAML)::

    global_prompt: a red car in a small city, cinematic
    fps: 16
    height: 480
    width: 832
    shots:
      - prompt: wide shot of the car driving down the street
        seconds: 5
      - prompt: close up of the driver smiling
        num_frames: 81
    moc:
      top_k: 5
      anchor_own_shot: true

Every error names the field it is about (`shots[1].num_frames: ...`). Settings a storyboard leaves out take the
defaults of its model's family once the model is known ([`Storyboard.with_model_defaults`]: e.g. 24 fps on Wan 2.2
TI2V-5B); without a model, Wan 2.1's. `image:` (a path relative to the storyboard's folder) starts the first shot.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..core.config import MoCConfig
from ..errors import InputError
from ..textfiles import load_yaml, read_text, short_repr
from .long_video import Shot, check_shot_frames, frames_for_seconds

__all__ = ["Storyboard", "StoryboardError", "load_storyboard", "TOP_LEVEL_KEYS", "SHOT_KEYS"]

#: Keys a storyboard may have, with their defaults (`shots` is required).
TOP_LEVEL_KEYS: dict[str, Any] = {
    "model": None,
    "global_prompt": None,
    "negative_prompt": None,
    "shots": None,
    "fps": 16,
    "height": 480,
    "width": 832,
    "num_inference_steps": 50,
    "guidance_scale": 5.0,
    "guidance_scale_2": None,
    "seed": 0,
    "max_sequence_length": 512,
    "image": None,
    "moc": None,
}
#: Keys whose defaults come from the model's family (`WanFamily.defaults`).
MODEL_DEFAULT_KEYS = (
    "fps",
    "height",
    "width",
    "num_inference_steps",
    "guidance_scale",
    "guidance_scale_2",
    "max_sequence_length",
)
#: Keys a family may default to `None`: the loaded model's own value (HunyuanVideo 1.5's size from its
#: `target_size`, its guider's scale), filled in by [`Storyboard.with_model_settings`] once it is loaded.
MODEL_CHOSEN_KEYS = ("height", "width", "guidance_scale")
SHOT_KEYS = ("prompt", "num_frames", "seconds")
#: Pixel multiple of height/width for Wan (8x VAE, 2x2 patches).
SIZE_MULTIPLE = 16
#: Frame rates a storyboard may ask for (the video writers are exact in this range).
MIN_FPS, MAX_FPS = 0.1, 1000
#: Most pixel frames of one shot (about 100 minutes at 16 fps; Wan 2.1's rotary tables cover about 4k frames in all).
MAX_SHOT_FRAMES = 100_001


class StoryboardError(InputError):
    """A storyboard that cannot be used; the message names the file and the field."""


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class Storyboard:
    r"""
    A validated storyboard. Build it with [`Storyboard.from_dict`] or [`load_storyboard`].

    Args:
        shots (`tuple[Shot]`): the shots, in order.
        global_prompt (`str`, *optional*): caption attended by every shot.
        negative_prompt (`str`, *optional*): negative prompt for classifier-free guidance.
        model (`str`, *optional*): model id or folder to load (the CLI's `--model` overrides it).
        fps (`float`): frame rate of the video (and of `seconds` -> frames).
        height (`int`) / width (`int`): size in pixels, multiples of 16 (`None`, with `guidance_scale`: the loaded
            model picks it, where its family says so; see `MODEL_CHOSEN_KEYS`).
        num_inference_steps (`int`), guidance_scale (`float`), seed (`int`, *optional*), max_sequence_length (`int`).
        guidance_scale_2 (`float`, *optional*): guidance of the low-noise expert (Wan 2.2 A14B).
        image (`str`, *optional*): the start image of the first shot (a checked path; relative paths in a file are
            relative to the storyboard's folder).
        moc (`MoCConfig`): MoC settings.
        explicit (`frozenset[str]`): the keys the storyboard set itself (the others took defaults).
    """

    shots: tuple[Shot, ...]
    global_prompt: str | None = None
    negative_prompt: str | None = None
    model: str | None = None
    fps: float = 16
    height: int = 480
    width: int = 832
    num_inference_steps: int = 50
    guidance_scale: float = 5.0
    seed: int | None = 0
    max_sequence_length: int = 512
    moc: MoCConfig = field(default_factory=MoCConfig)
    guidance_scale_2: float | None = None
    image: str | None = None
    explicit: frozenset[str] = field(default=frozenset(), compare=False)
    model_chosen: frozenset[str] = field(default=frozenset(), compare=False)

    @classmethod
    def from_dict(
        cls,
        data: Any,
        source: str = "storyboard",
        defaults: Mapping[str, Any] | None = None,
        base_dir: str | None = None,
    ) -> Storyboard:
        r"""
        Validate a parsed storyboard.

        Args:
            data (`dict`): the parsed file.
            source (`str`): name used in error messages (the file path).
            defaults (`Mapping`, *optional*): defaults for the keys `data` leaves out (a model family's
                `WanFamily.defaults`); Wan 2.1's otherwise.
            base_dir (`str`, *optional*): folder a relative `image:` path is relative to (default: the current one).

        Raises:
            [`StoryboardError`]: naming the first bad field.
        """

        def fail(where: str, message: str) -> StoryboardError:
            return StoryboardError(f"{source}: {where}: {message}")

        if not isinstance(data, dict):
            raise StoryboardError(f"{source}: a storyboard must be a mapping of settings, got {type(data).__name__}")
        unknown = sorted(set(map(str, data)) - set(TOP_LEVEL_KEYS))
        if unknown:
            names = ", ".join(short_repr(k)[1:-1] if isinstance(k, str) else short_repr(k) for k in unknown[:5])
            raise fail(names, f"unknown key(s); known keys are {sorted(TOP_LEVEL_KEYS)}")
        model_defaults = {k: v for k, v in (defaults or {}).items() if k in MODEL_DEFAULT_KEYS}
        values = {**TOP_LEVEL_KEYS, **model_defaults, **data}
        if "guidance_scale" in data and "guidance_scale_2" not in data:
            # As `WanPipeline` and `LongVideoPipeline`: the low-noise expert takes the given guidance_scale.
            values["guidance_scale_2"] = data["guidance_scale"] if model_defaults.get("guidance_scale_2") else None
        # Left to the loaded model: what its family defaults to None and the storyboard leaves out.
        chosen = {k for k in MODEL_CHOSEN_KEYS if k in model_defaults and model_defaults[k] is None and k not in data}

        cls._check_settings({k: v for k, v in values.items() if k not in chosen}, fail)
        image = cls._image(values["image"], base_dir, fail)
        fps, seed = values["fps"], values["seed"]

        moc = values["moc"]
        if moc is None:
            moc_config = MoCConfig()
        elif isinstance(moc, dict):
            try:
                moc_config = MoCConfig.from_dict(moc)
            except (TypeError, ValueError) as e:
                raise fail("moc", str(e)) from None
        else:
            raise fail("moc", f"must be a mapping of MoCConfig settings, got {short_repr(moc)}")

        shots = values["shots"]
        if shots is None:
            raise fail("shots", "missing; a storyboard needs at least one shot")
        if not isinstance(shots, list):
            raise fail("shots", f"must be a list of shots, got {type(shots).__name__}")
        if not shots:
            raise fail("shots", "is empty; a storyboard needs at least one shot")
        parsed = tuple(cls._shot(i, s, fps, fail) for i, s in enumerate(shots))

        return cls(
            shots=parsed,
            global_prompt=values["global_prompt"],
            negative_prompt=values["negative_prompt"],
            model=values["model"],
            fps=fps,
            height=values["height"],
            width=values["width"],
            num_inference_steps=values["num_inference_steps"],
            guidance_scale=None if values["guidance_scale"] is None else float(values["guidance_scale"]),
            seed=seed,
            max_sequence_length=values["max_sequence_length"],
            moc=moc_config,
            guidance_scale_2=None if values["guidance_scale_2"] is None else float(values["guidance_scale_2"]),
            image=image,
            explicit=frozenset(map(str, data)),
            model_chosen=frozenset(chosen),
        )

    @staticmethod
    def _image(value: Any, base_dir: str | None, fail) -> str | None:
        """The start image: a path to a file PIL can read, made absolute."""
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            raise fail("image", f"must be the path of an image file, got {short_repr(value)}")
        path = os.path.abspath(os.path.join(base_dir or "", os.path.expanduser(value)))
        if not os.path.isfile(path):
            raise fail("image", f"{value}: no such file" + (f" (relative to {base_dir})" if base_dir else ""))
        try:
            import PIL.Image

            with PIL.Image.open(path) as im:
                im.verify()
        except Exception as e:  # noqa: BLE001  (any decoding failure: not a usable image)
            raise fail("image", f"{value}: cannot be read as an image ({type(e).__name__}: {e})") from None
        return path

    def with_model_defaults(self, defaults: Mapping[str, Any], source: str | None = None) -> Storyboard:
        r"""
        This storyboard with the settings it leaves out taken from `defaults` (a model family's
        `WanFamily.defaults`), validated again: `seconds` become frames at the model's frame rate.
        """
        data = {k: v for k, v in self.to_dict().items() if k in self.explicit or k in ("shots", "moc")}
        return type(self).from_dict(data, source or "storyboard", defaults=defaults)

    def with_model_settings(self, settings: Mapping[str, Any], source: str | None = None) -> Storyboard:
        r"""
        This storyboard with the settings left to the loaded model (`model_chosen`) taken from `settings` (e.g.
        `HunyuanVideo15LongVideoPipeline.default_settings(image)`), validated again.
        """
        if not self.model_chosen:
            return self
        overrides = {k: settings[k] for k in self.model_chosen}
        board = self.with_overrides(overrides, source or "storyboard")
        return dataclasses.replace(board, explicit=self.explicit)

    def check_model(self, family, source: str = "storyboard") -> None:
        r"""
        Refuse what the model `family` (`WanFamily`) cannot do, naming the field: an image on a text-to-video
        model, no image on an image-to-video one, `guidance_scale_2` on one transformer.
        """
        if self.image is not None and not family.takes_image:
            raise StoryboardError(
                f"{source}: image: {family.title} is a text-to-video model; an image start needs an image-to-video "
                "model (Wan 2.1 I2V, Wan 2.2 I2V-A14B or TI2V-5B, HunyuanVideo 1.5 I2V)"
            )
        if self.image is None and family.image == "required":
            raise StoryboardError(
                f"{source}: image: {family.title} is an image-to-video model: set `image:` to the first frame (or "
                "pass --image)"
            )
        if self.guidance_scale_2 is not None and not family.experts:
            raise StoryboardError(
                f"{source}: guidance_scale_2: only two-expert models (Wan 2.2 A14B) have it, not {family.title}"
            )

    def load_image(self):
        """The start image as an RGB `PIL.Image.Image`, or `None`."""
        if self.image is None:
            return None
        import PIL.Image

        with PIL.Image.open(self.image) as im:
            return im.convert("RGB")

    @staticmethod
    def _check_settings(values: dict[str, Any], fail) -> None:
        """The scalar settings: prompts, model, fps, size, steps, guidance and seed."""
        for name in ("model", "global_prompt", "negative_prompt"):
            v = values[name]
            if v is not None and not isinstance(v, str):
                raise fail(name, f"must be a string, got {short_repr(v)}")
        if values["global_prompt"] is not None and not values["global_prompt"].strip():
            raise fail("global_prompt", "is empty; leave it out for no global caption")
        if values["model"] is not None and not values["model"].strip():
            raise fail("model", "is empty")

        fps = values["fps"]
        if not _is_number(fps) or fps <= 0:
            raise fail("fps", f"must be a positive number, got {short_repr(fps)}")
        if not MIN_FPS <= fps <= MAX_FPS:
            raise fail("fps", f"must be between {MIN_FPS} and {MAX_FPS} frames per second, got {short_repr(fps)}")
        for name in ("height", "width"):
            if name not in values:  # left to the loaded model
                continue
            v = values[name]
            if not _is_int(v) or v <= 0 or v % SIZE_MULTIPLE:
                raise fail(name, f"must be a positive multiple of {SIZE_MULTIPLE}, got {short_repr(v)}")
        for name in ("num_inference_steps", "max_sequence_length"):
            v = values[name]
            if not _is_int(v) or v < 1:
                raise fail(name, f"must be a positive integer, got {short_repr(v)}")
        for name in ("guidance_scale", "guidance_scale_2"):
            if name not in values:
                continue
            v = values[name]
            if (v is not None or name == "guidance_scale") and (not _is_number(v) or v < 0):
                raise fail(name, f"must be a number >= 0, got {short_repr(v)}")
        seed = values["seed"]
        # torch generators take 64-bit seeds; a larger one would only fail later, after the model has loaded.
        if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**64):
            raise fail("seed", f"must be an integer in [0, 2**64) or null, got {short_repr(seed)}")

    @staticmethod
    def _shot(i: int, shot: Any, fps: float, fail) -> Shot:
        where = f"shots[{i}]"
        if not isinstance(shot, dict):
            raise fail(where, f"must be a mapping with prompt and num_frames or seconds, got {short_repr(shot)}")
        unknown = sorted(set(map(str, shot)) - set(SHOT_KEYS))
        if unknown:
            raise fail(f"{where}.{short_repr(unknown[0])[1:-1]}", f"unknown key; a shot has {list(SHOT_KEYS)}")
        prompt = shot.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise fail(f"{where}.prompt", f"must be a non-empty string, got {short_repr(prompt)}")
        frames, seconds = shot.get("num_frames"), shot.get("seconds")
        if frames is None and seconds is None:
            raise fail(where, "needs num_frames or seconds")
        if frames is not None and seconds is not None:
            raise fail(where, "give num_frames or seconds, not both")
        if frames is not None:
            if not _is_int(frames):
                raise fail(f"{where}.num_frames", f"must be an integer, got {short_repr(frames)}")
            if frames <= 0:
                raise fail(f"{where}.num_frames", f"must be positive (a shot cannot be empty), got {frames}")
            if frames > MAX_SHOT_FRAMES:
                raise fail(f"{where}.num_frames", f"must be at most {MAX_SHOT_FRAMES}, got {frames}")
            try:
                check_shot_frames(frames, "num_frames")
            except ValueError as e:
                raise fail(f"{where}.num_frames", str(e).removeprefix("num_frames=")) from None
            return Shot(prompt, num_frames=frames)
        if not _is_number(seconds) or seconds <= 0:
            raise fail(
                f"{where}.seconds", f"must be a positive number (a shot cannot be empty), got {short_repr(seconds)}"
            )
        if seconds * fps < 1:
            raise fail(f"{where}.seconds", f"{seconds:g} s is shorter than one frame at {fps:g} fps")
        if frames_for_seconds(seconds, fps) > MAX_SHOT_FRAMES:
            raise fail(
                f"{where}.seconds", f"{seconds:g} s at {fps:g} fps is more than {MAX_SHOT_FRAMES} frames, got {seconds}"
            )
        return Shot(prompt, seconds=float(seconds))

    # ------------------------------------------------------------------ derived
    @property
    def shot_frames(self) -> list[int]:
        """Pixel frames of each shot."""
        return [s.frames(self.fps) for s in self.shots]

    @property
    def num_frames(self) -> int:
        """Pixel frames of the whole video."""
        return sum(self.shot_frames)

    @property
    def duration(self) -> float:
        """Length of the video in seconds."""
        return self.num_frames / self.fps

    def pipeline_kwargs(self) -> dict[str, Any]:
        r"""Keyword arguments for [`LongVideoPipeline`] (all but `generator`, which needs a device: see `seed`)."""
        return {
            "shots": list(self.shots),
            "global_prompt": self.global_prompt,
            "negative_prompt": self.negative_prompt,
            "height": self.height,
            "width": self.width,
            "fps": self.fps,
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "guidance_scale_2": self.guidance_scale_2,
            "image": self.load_image(),
            "max_sequence_length": self.max_sequence_length,
            "moc_config": self.moc,
        }

    def to_dict(self) -> dict[str, Any]:
        """The storyboard as plain data (what `from_dict` reads back)."""
        shots = [
            {"prompt": s.prompt, "num_frames": s.num_frames}
            if s.num_frames is not None
            else {"prompt": s.prompt, "seconds": s.seconds}
            for s in self.shots
        ]
        out = {k: getattr(self, k) for k in TOP_LEVEL_KEYS if k not in ("shots", "moc")}
        return {**out, "shots": shots, "moc": self.moc.to_dict()}

    def with_overrides(self, overrides: Mapping[str, Any], source: str) -> Storyboard:
        """This storyboard with some settings replaced (validated again; the replaced keys count as set, the
        settings still left to the loaded model stay so)."""
        chosen = self.model_chosen - set(overrides)
        data = {k: v for k, v in self.to_dict().items() if k not in chosen}
        board = type(self).from_dict({**data, **overrides}, source, defaults=dict.fromkeys(chosen))
        return dataclasses.replace(board, explicit=self.explicit | set(overrides))


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # JSON, like YAML, would silently keep the last of two equal keys.
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {short_repr(key)} is given twice in one object")
        out[key] = value
    return out


def load_storyboard(path: str | os.PathLike) -> Storyboard:
    r"""
    Read and validate a storyboard file: `.yaml` / `.yml` (PyYAML's safe loader, bounded: see
    `diffusers_moc.textfiles`) or `.json`, UTF-8, at most `MAX_FILE_BYTES` bytes.

    Raises:
        [`StoryboardError`]: the file is missing, too large, not UTF-8, does not parse, or a field is invalid (the
            message names the file and the field).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise StoryboardError(f"{path}: is a folder, not a storyboard file")
    if not os.path.isfile(path):
        raise StoryboardError(f"{path}: no such storyboard file")
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".yaml", ".yml", ".json"):
        raise StoryboardError(f"{path}: a storyboard must be a .yaml, .yml or .json file")
    try:
        if ext == ".json":
            text = read_text(path, "storyboard")
            try:
                data = json.loads(text, object_pairs_hook=_unique_keys)
            except RecursionError:
                raise InputError(f"{path}: cannot parse: the JSON is nested too deeply") from None
            except ValueError as e:
                raise InputError(f"{path}: cannot parse: {' '.join(str(e).split())}") from None
        else:
            data = load_yaml(path, "storyboard")
    except InputError as e:
        raise StoryboardError(str(e)) from None
    return Storyboard.from_dict(data, source=path, base_dir=os.path.dirname(os.path.abspath(path)))
