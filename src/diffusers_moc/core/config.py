"""`MoCConfig`: the settings of Mixture-of-Contexts routing, validated on construction and saved as JSON."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import asdict, dataclass, fields
from typing import Any

from .backends import backend_names

__all__ = ["MoCConfig", "CONFIG_NAME", "resolve_pretrained_source"]

CONFIG_NAME = "moc_config.json"
ROUTE_BY = ("token", "block")
TEXT_ANCHORS = ("all", "shot")


@dataclass(frozen=True)
class MoCConfig:
    r"""
    Settings of Mixture-of-Contexts sparse attention (see `docs/semantics.md`).

    Args:
        top_k (`int`, defaults to 5):
            Routed chunks per query token and head, on top of the mandatory anchors. `0` keeps only the anchors.
        local_window (`int`, defaults to 1):
            Nearest video chunks of the same shot before and after the query's chunk that are always attended.
        anchor_own_shot (`bool`, defaults to `False`):
            Always attend every chunk of the query's own shot (intra-shot links; the paper's multi-shot setting).
            Off by default: on a single shot it makes attention dense.
        text_anchors (`str`, defaults to `"all"`):
            `"all"`: every text chunk in the sequence is an anchor (the paper's rule); `"shot"`: only the global
            caption and the caption of the query's own shot.
        causal (`bool`, defaults to `True`):
            Only chunks strictly before the query's chunk can be routed to, so the routing graph is a DAG.
        route_by (`str`, defaults to `"token"`):
            `"token"`: every query token routes on its own (the paper's rule, exact). `"block"`: tiles of
            `block_size` consecutive tokens of one chunk share the selection of their mean query (an approximation).
        block_size (`int`, defaults to 64): query tile size for `route_by="block"`.
        chunk_tokens (`int`, *optional*):
            Chunk size used when a processor builds the layout: `None` is one chunk per latent frame; see
            [`ChunkLayout.for_video`].
        drop_off (`float`, defaults to 0.5):
            Training only. Context drop-off: each query drops `floor(p * top_k)` routed chunks, `p ~ U(0, drop_off)`.
            The paper does not publish its value; 0.5 is our default: with `top_k` 3 or 5 it drops 0, 1 or 2
            chunks (a smaller value would drop nothing at such `top_k`, since `floor(p * top_k)` stays 0).
        drop_in (`float`, defaults to 0.1):
            Training only. Context drop-in: each query adds `m ~ Poisson(drop_in)` random candidates.
            The paper does not publish its value; 0.1 is our default. Processors draw drop-off and drop-in from
            torch's global RNG (seed it with `torch.manual_seed`), which activation checkpointing saves and replays,
            so a recomputed block routes exactly as its forward did; `route(..., generator=...)` takes any generator.
        backend (`str`, defaults to `"auto"`): one of `"auto"`, `"reference"`, `"torch"`, `"flash"`,
            `"flash_attn"`, `"flex"`, `"triton"`. `"auto"` takes, on CUDA, the backend measured fastest on an H200
            for the inputs' dtype and length (bfloat16: `"triton"` up to 128k tokens, `"flash_attn"` then `"flash"`
            beyond; see [`resolve_backend`]), and `"torch"` elsewhere.
    """

    top_k: int = 5
    local_window: int = 1
    anchor_own_shot: bool = False
    text_anchors: str = "all"
    causal: bool = True
    route_by: str = "token"
    block_size: int = 64
    chunk_tokens: int | None = None
    drop_off: float = 0.5
    drop_in: float = 0.1
    backend: str = "auto"

    def __post_init__(self):
        def check_int(name, minimum, allow_none=False):
            value = getattr(self, name)
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"MoCConfig.{name} must be an integer >= {minimum}, got {value!r}")

        def check_bool(name):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"MoCConfig.{name} must be True or False, got {getattr(self, name)!r}")

        def check_choice(name, choices):
            if getattr(self, name) not in choices:
                raise ValueError(f"MoCConfig.{name} must be one of {list(choices)}, got {getattr(self, name)!r}")

        check_int("top_k", 0)
        check_int("local_window", 0)
        check_int("block_size", 1)
        check_int("chunk_tokens", 1, allow_none=True)
        check_bool("anchor_own_shot")
        check_bool("causal")
        check_choice("text_anchors", TEXT_ANCHORS)
        check_choice("route_by", ROUTE_BY)
        check_choice("backend", backend_names())
        if (
            isinstance(self.drop_off, bool)
            or not isinstance(self.drop_off, (int, float))
            or not 0 <= self.drop_off <= 1
        ):
            raise ValueError(f"MoCConfig.drop_off must be a number in [0, 1], got {self.drop_off!r}")
        if (
            isinstance(self.drop_in, bool)
            or not isinstance(self.drop_in, (int, float))
            or not 0 <= self.drop_in < math.inf  # NaN fails too
        ):
            raise ValueError(f"MoCConfig.drop_in must be a finite number >= 0, got {self.drop_in!r}")

    # ------------------------------------------------------------------ convenience
    def replace(self, **changes: Any) -> MoCConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoCConfig:
        r"""Build a config from a dict; unknown keys raise a `ValueError` naming them."""
        data = {k: v for k, v in data.items() if not k.startswith("_")}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown MoCConfig keys {unknown}; known keys are {sorted(known)}")
        return cls(**data)

    def to_json_string(self) -> str:
        data = {"_class_name": type(self).__name__, **self.to_dict()}
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike) -> str:
        r"""
        Write the config to `save_directory/moc_config.json` (the directory is created if needed).

        Returns:
            `str`: the path of the written file.
        """
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {save_directory!r} is a file; MoCConfig.save_pretrained needs a folder")
        from .atomic import write_text_atomic

        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, CONFIG_NAME)
        write_text_atomic(path, self.to_json_string())  # complete or absent, never a truncated file
        return path

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        subfolder: str | None = None,
        **hub_kwargs: Any,
    ) -> MoCConfig:
        r"""
        Load `moc_config.json` from a local folder or a Hub repository.

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`): a folder or a Hub repo id.
            subfolder (`str`, *optional*): subfolder inside the folder or repo.
            hub_kwargs: passed to `huggingface_hub.hf_hub_download` (`revision`, `token`, `cache_dir`, ...).

        Raises:
            `FileNotFoundError`: no such folder (and not a valid Hub repo id), no such repo, or no `moc_config.json`
                in it. `ValueError`: the file is not UTF-8 JSON, not an object, or holds unknown keys or invalid
                values (the message starts with its path).
        """
        root = os.fspath(pretrained_model_name_or_path)
        local = resolve_pretrained_source(root)
        if local is not None:
            folder = os.path.join(local, subfolder or "")
            path = os.path.join(folder, CONFIG_NAME)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"no {CONFIG_NAME} in {folder}")
        else:
            from huggingface_hub import hf_hub_download
            from huggingface_hub.errors import (
                EntryNotFoundError,
                LocalEntryNotFoundError,
                RepositoryNotFoundError,
                RevisionNotFoundError,
            )

            try:
                path = hf_hub_download(root, CONFIG_NAME, subfolder=subfolder, **hub_kwargs)
            except LocalEntryNotFoundError:  # (a subclass of EntryNotFoundError: caught first)
                raise FileNotFoundError(
                    f"{root!r} is not a local folder, and its {CONFIG_NAME} could not be downloaded from the Hub nor "
                    "found in the local cache (offline, or HF_HUB_OFFLINE set?)"
                ) from None
            except RepositoryNotFoundError:
                raise FileNotFoundError(
                    f"{root!r} is not a local folder, and the Hub has no repo of that name (or it is private and "
                    "you are not logged in)"
                ) from None
            except RevisionNotFoundError:
                raise FileNotFoundError(
                    f"the Hub repo {root!r} has no revision {hub_kwargs.get('revision')!r}"
                ) from None
            except EntryNotFoundError:
                where = f"{root}/{subfolder}" if subfolder else root
                raise FileNotFoundError(f"the Hub repo {where!r} has no {CONFIG_NAME}: not a MoC model") from None
        return cls._from_file(path)

    @classmethod
    def _from_file(cls, path: str) -> MoCConfig:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except UnicodeDecodeError:
            raise ValueError(f"{path}: not UTF-8 text") from None
        except RecursionError:
            raise ValueError(f"{path}: the JSON is nested too deeply") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: must hold a JSON object of MoCConfig settings, got a {type(data).__name__}")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None


def resolve_pretrained_source(name: str | os.PathLike) -> str | None:
    r"""
    Whether `name` is a local folder or a Hub repo id, for `from_pretrained`-style loaders.

    Returns:
        `str` (the folder) for an existing local folder, `None` for a Hub repo id.

    Raises:
        `FileNotFoundError`: `name` is neither an existing folder nor a valid Hub repo id (e.g. `./typo/dir`), or is
            a file.
    """
    name = os.fspath(name)
    if os.path.isdir(name):
        return name
    if os.path.exists(name):
        raise FileNotFoundError(f"{name!r} is a file; expected a folder or a Hub repo id")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    # What only a path can look like: relative or absolute prefixes, a trailing slash, or more than one folder.
    looks_local = name.startswith((".", "/", "~")) or name.endswith(("/", os.sep)) or os.sep in name.replace("/", "", 1)
    try:
        validate_repo_id(name)
    except HFValidationError:
        looks_local = True
    if looks_local:
        raise FileNotFoundError(f"{name!r}: no such folder, and not a valid Hub repo id (user/name)")
    return None
