"""`TrainConfig`: the YAML training config of `diffusers-moc train`, validated into nested dataclasses.

Every error names the offending field by its dotted path (e.g. `training.learning_rate`), so a typo in a long YAML
file is found at start-up, not after the models are loaded.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Literal, Union

from ..core.config import MoCConfig
from ..errors import InputError
from ..textfiles import load_yaml, parse_yaml, short_repr

__all__ = [
    "ConfigError",
    "TrainConfig",
    "ModelConfig",
    "LoraSettings",
    "SparsityConfig",
    "DataConfig",
    "OptimConfig",
    "CheckpointConfig",
    "ValidationConfig",
    "LoggingConfig",
    "HubConfig",
    "load_train_config",
]


class ConfigError(InputError):
    """A training config value is missing, unknown or invalid; the message starts with the field's dotted path."""

    def __init__(self, path: str, message: str):
        self.path = path
        super().__init__(f"{path}: {message}")


#: `model.expert` values: which Wan 2.2 A14B expert(s) get a LoRA.
EXPERTS = ("high_noise", "low_noise", "both")


@dataclass
class ModelConfig:
    r"""
    Args:
        pretrained (`str`): a diffusers pipeline repo id or folder of a trainable family (Wan 2.1 T2V, Wan 2.2
            T2V-A14B, Wan 2.2 TI2V-5B, HunyuanVideo 1.5 T2V; e.g. `Wan-AI/Wan2.1-T2V-1.3B-Diffusers` or
            `hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_t2v`), or `"tiny"` for an in-process random tiny
            model (`diffusers_moc.tiny`, `diffusers_moc.tiny_hunyuan_video15`; tests, smoke runs).
        revision (`str`, *optional*), variant (`str`, *optional*): passed to `from_pretrained`.
        tiny_seed (`int`): seed of the tiny model's random weights.
        tiny_model (`str`): the family the tiny model stands in for: `wan2.1-t2v`, `wan2.2-t2v-a14b`,
            `wan2.2-ti2v-5b` or `hunyuanvideo1.5-t2v`.
        expert (`str`, *optional*): Wan 2.2 A14B only: `high_noise` (`transformer`, timesteps at or above the
            pipeline's `boundary_ratio * 1000`), `low_noise` (`transformer_2`, timesteps below) or `both` (the
            default: each optimizer step trains one expert, drawn with the share of timesteps it covers).
    """

    pretrained: str = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    revision: str | None = None
    variant: str | None = None
    tiny_seed: int = 0
    tiny_model: str = "wan2.1-t2v"
    expert: Literal["high_noise", "low_noise", "both"] | None = None


@dataclass
class LoraSettings:
    r"""
    PEFT `LoraConfig` settings of the adapter added to the transformer.

    Args:
        rank (`int`): LoRA rank `r`.
        alpha (`float`, *optional*): `lora_alpha` (scale `alpha / rank`); defaults to `rank`.
        dropout (`float`): `lora_dropout`.
        target_modules (`list[str]`): module names (or suffixes) to adapt; the default adapts the attention
            projections of self- and cross-attention, as diffusers' LoRA training scripts do.
    """

    rank: int = 32
    alpha: float | None = None
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])


@dataclass
class SparsityConfig:
    r"""
    Sparsity schedule (`docs/semantics.md` section 3): `top_k` goes from `start_top_k` to `moc.top_k`.

    Args:
        start_top_k (`int` or `"dense"`): `"dense"` starts from exactly dense attention (every chunk selected, causal
            routing off); an integer starts from that `top_k`.
        warmup_steps (`int`): steps held at `start_top_k` before annealing.
        anneal_steps (`int`): steps over which `top_k` decreases to the target (0: target from the first step).
        shape (`str`): `"linear"` or `"cosine"` interpolation.
    """

    start_top_k: int | str = "dense"
    warmup_steps: int = 0
    anneal_steps: int = 1000
    shape: Literal["linear", "cosine"] = "linear"


@dataclass
class DataConfig:
    r"""
    Args:
        root (`str`): folder with the clips and `metadata.jsonl` (paths in the metadata are relative to it).
        metadata (`str`): metadata file name inside `root`.
        num_frames (`int`): pixel frames per training sample, `4n + 1` for Wan's VAE.
        height, width (`int`): training resolution (clips are resized and center-cropped).
        max_sequence_length (`int`): text tokens of the prompt embeddings (per caption; on HunyuanVideo 1.5 the Qwen
            caption tokens, diffusers' pipelines use 1000).
        cache (`bool`): precompute VAE latent distributions and prompt embeddings once, before training.
        cache_dir (`str`, *optional*): where the cache lives (default `<output_dir>/cache`).
        validate_clips (`bool`): decode every clip once at start-up so unreadable ones are reported and skipped
            before training starts.
        num_workers (`int`): DataLoader workers.
    """

    root: str = ""
    metadata: str = "metadata.jsonl"
    num_frames: int = 81
    height: int = 480
    width: int = 832
    max_sequence_length: int = 512
    cache: bool = False
    cache_dir: str | None = None
    validate_clips: bool = True
    num_workers: int = 0


@dataclass
class OptimConfig:
    r"""
    Optimisation settings. The loss is diffusers' flow-matching loss: `x_t = (1 - sigma) x_0 + sigma * noise`,
    target `noise - x_0`, with timesteps drawn by `compute_density_for_timestep_sampling(weighting_scheme, ...)`.
    `flow_shift` is the shift of the training `FlowMatchEulerDiscreteScheduler` (3.0 suits Wan at 480p).
    `caption_dropout` is the probability of training a sample on the empty prompt (keeps classifier-free guidance
    working).

    `first_frame_condition` (Wan 2.2 TI2V-5B only) is the probability of training a sample image-to-video: its first
    latent frame stays clean with timestep 0 on its tokens and out of the loss, as `WanImageToVideoPipeline` and
    `LongVideoPipeline(image=...)` condition TI2V-5B on a start image.

    `compile: true` compiles the transformer's repeated blocks with `torch.compile` (diffusers'
    `compile_repeated_blocks`, regional compilation: one compiled block reused by every layer; static shapes) before
    training, with inductor's `fallback_random` on so random draws (drop-off, drop-in, LoRA dropout) equal eager
    mode's: a compiled run gives the eager run's losses and weights up to float rounding. `compile_fullgraph: true`
    asks for one graph per block without graph breaks (`fullgraph=True`, as diffusers recommends); MoC attention
    traces whole (one custom op), so Wan blocks compile in one graph. Off by default: compiling takes minutes for a
    large model and pays off over long runs.

    `context_parallel: N` splits each sample's tokens over `N` ranks with diffusers' Ulysses context parallelism
    (groups of `N` ranks train on the same samples; data parallelism runs across the groups): the number of
    processes, the model's heads and a sample's video tokens must divide by `N`. `fsdp: true` shards the parameters
    with accelerate's FSDP2 plugin (several processes on accelerators); `accelerate launch --config_file` with an
    FSDP2 config does the same. Validation videos need `validation.every: 0` with either (they are rendered on the
    main process alone).
    """

    max_steps: int = 2000
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = "constant"
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    mixed_precision: Literal["no", "bf16"] | None = "bf16"
    gradient_checkpointing: bool = True
    weighting_scheme: Literal["none", "logit_normal", "mode", "sigma_sqrt", "cosmap"] = "none"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    flow_shift: float = 3.0
    caption_dropout: float = 0.0
    first_frame_condition: float = 0.0
    compile: bool = False
    compile_fullgraph: bool = False
    context_parallel: int = 1
    fsdp: bool = False


@dataclass
class CheckpointConfig:
    r"""
    Args:
        every (`int`): save `accelerator.save_state` to `<output_dir>/checkpoint-<step>` every this many steps
            (0: never).
        total_limit (`int`, *optional*): keep at most this many checkpoints (oldest removed).
        resume_from (`str`, *optional*): a checkpoint folder, or `"latest"` for the newest in `output_dir`.
    """

    every: int = 500
    total_limit: int | None = None
    resume_from: str | None = None


@dataclass
class ValidationConfig:
    r"""
    Periodic validation videos, generated with the model being trained and written to `<output_dir>/validation`.

    Args:
        every (`int`): generate every this many steps (0: never); also after the last step when non-zero.
        prompts (`list[str]`): one video per prompt.
        shot_frames (`list[int]`, *optional*): latent frames per shot for the validation videos.
    """

    every: int = 0
    prompts: list[str] = field(default_factory=list)
    num_frames: int = 81
    height: int = 480
    width: int = 832
    num_inference_steps: int = 30
    guidance_scale: float = 5.0
    seed: int = 0
    fps: int = 16
    shot_frames: list[int] | None = None


@dataclass
class LoggingConfig:
    r"""
    Args:
        report_to (`list[str]`): accelerate trackers: `"tensorboard"`, `"wandb"`, or `"auto"` (TensorBoard, plus
            W&B when `wandb` is installed); `[]` or `["none"]` for none.
        project_name (`str`): tracker project / run name.
        log_every (`int`): log loss, learning rate and density every this many steps.
    """

    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    project_name: str = "diffusers-moc"
    log_every: int = 1


@dataclass
class HubConfig:
    r"""
    Args:
        push (`bool`): upload the exported adapter folder at the end of training.
        repo_id (`str`, *optional*): target repo (required when `push` is true).
        private (`bool`): create the repo private.
    """

    push: bool = False
    repo_id: str | None = None
    private: bool = False


@dataclass
class TrainConfig:
    r"""
    The full `diffusers-moc train` config. Build it with [`load_train_config`] or [`TrainConfig.from_dict`].

    Args:
        output_dir (`str`): checkpoints, logs, validation videos and the exported adapter (`<output_dir>/final`).
        seed (`int`): seeds LoRA init, data order, noise, timesteps and MoC drop-off / drop-in.
        moc (`MoCConfig`): the MoC settings of the fine-tuned model (`moc.top_k` is the schedule's target).
    """

    output_dir: str = "moc-lora"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    moc: MoCConfig = field(default_factory=lambda: MoCConfig(top_k=3))
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: OptimConfig = field(default_factory=OptimConfig)
    checkpointing: CheckpointConfig = field(default_factory=CheckpointConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    hub: HubConfig = field(default_factory=HubConfig)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build and validate a config from a (YAML-parsed) dict; raises [`ConfigError`] naming the bad field."""
        config = _build(cls, data, "")
        _check(config)
        return config

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (YAML / JSON serialisable), e.g. for tracker hyper-parameters and the model card."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if isinstance(value, MoCConfig) else _plain(value)
        return out


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, list):
        return list(value)
    return value


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a finite number", bool: "true or false", str: "a string"}.get(tp, str(tp))


_NO = object()


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """`value` converted to type `tp`, or `_NO`."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            out = _coerce(value, arg, path)
            if out is not _NO:
                return out
        return _NO
    if origin is Literal:
        # YAML 1.1 reads a bare `no` as false; `mixed_precision: no` means "no".
        if value is False and "no" in typing.get_args(tp):
            return "no"
        return value if not isinstance(value, bool) and value in typing.get_args(tp) else _NO
    if origin is list:
        if isinstance(value, str):  # `report_to: tensorboard` means a one-item list
            value = [value]
        if not isinstance(value, (list, tuple)):
            return _NO
        (item_tp,) = typing.get_args(tp)
        items = [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
        return _NO if any(v is _NO for v in items) else items
    if tp is type(None):
        return None if value is None else _NO
    if tp is bool:
        return value if isinstance(value, bool) else _NO
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _NO
    if tp is float:
        if isinstance(value, bool):
            return _NO
        if isinstance(value, str):
            # PyYAML reads `1e-4` (no dot) as a string; accept it as the number it obviously is.
            try:
                value = float(value)
            except ValueError:
                return _NO
        if isinstance(value, (int, float)):
            try:
                value = float(value)
            except OverflowError:  # an integer too large for a float
                return _NO
            return value if math.isfinite(value) else _NO  # nan or inf passes every range check: refuse it here
        return _NO
    if tp is str:
        return value if isinstance(value, str) else _NO
    raise TypeError(f"unsupported config type {tp} at {path}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(where, f"must be a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(map(str, set(data) - set(known)))
    if unknown:
        name = short_repr(unknown[0])[1:-1]
        raise ConfigError(f"{prefix}{name}", f"unknown field; known fields of {where} are {sorted(known)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        path = f"{prefix}{name}"
        tp = hints[name]
        if tp is MoCConfig:
            if not isinstance(value, (MoCConfig, dict, type(None))):
                raise ConfigError(path, f"must be a mapping of MoCConfig settings, got {short_repr(value)}")
            try:
                kwargs[name] = value if isinstance(value, MoCConfig) else MoCConfig.from_dict(value or {})
            except (TypeError, ValueError) as e:
                raise ConfigError(path, str(e)) from None
        elif dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{path}.")
        else:
            out = _coerce(value, tp, path)
            if out is _NO:
                raise ConfigError(path, f"must be {_describe(tp)}, got {short_repr(value)}")
            kwargs[name] = out
    return cls(**kwargs)


def _positive(path: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(path, f"must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def _check(c: TrainConfig) -> None:
    if not c.output_dir:
        raise ConfigError("output_dir", "must be a non-empty path")
    # numpy's seed (set by accelerate's set_seed) must be below 2**32.
    for path, seed in (
        ("seed", c.seed),
        ("model.tiny_seed", c.model.tiny_seed),
        ("validation.seed", c.validation.seed),
    ):
        if not 0 <= seed < 2**32:
            raise ConfigError(path, f"must be an integer in [0, 2**32), got {seed}")
    if not c.model.pretrained:
        raise ConfigError("model.pretrained", "must be a repo id, a folder or 'tiny'")
    from ..model_families import ALL_FAMILIES

    trainable = [name for name, f in ALL_FAMILIES.items() if f.trainable]
    if c.model.tiny_model not in trainable:
        raise ConfigError("model.tiny_model", f"must be one of {trainable}, got {short_repr(c.model.tiny_model)}")
    if c.model.pretrained == "tiny" and c.model.expert is not None and c.model.tiny_model != "wan2.2-t2v-a14b":
        raise ConfigError("model.expert", f"is for Wan 2.2 A14B's two experts; model.tiny_model={c.model.tiny_model}")
    _check_model_side(c)
    _check_data(c)
    _check_training(c.training)
    _check_validation(c.validation)
    if c.validation.every and (c.training.context_parallel > 1 or c.training.fsdp):
        raise ConfigError(
            "validation.every",
            "must be 0 with training.context_parallel > 1 or training.fsdp: validation videos are rendered on the "
            "main process alone; render them from a checkpoint with `diffusers-moc generate`",
        )
    allowed = {"tensorboard", "wandb", "auto", "none"}
    for i, name in enumerate(c.logging.report_to):
        if name not in allowed:
            raise ConfigError(f"logging.report_to[{i}]", f"must be one of {sorted(allowed)}, got {short_repr(name)}")
    _positive("logging.log_every", c.logging.log_every)
    if c.hub.push and not c.hub.repo_id:
        raise ConfigError("hub.repo_id", "is required when hub.push is true")
    if c.hub.repo_id is not None:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:  # found now, not when the upload fails at the end of a long run
            validate_repo_id(c.hub.repo_id)
        except HFValidationError:
            raise ConfigError("hub.repo_id", f"must look like 'user/name', got {short_repr(c.hub.repo_id)}") from None


def _check_model_side(c: TrainConfig) -> None:
    """lora, sparsity and checkpointing."""
    _positive("lora.rank", c.lora.rank)
    if c.lora.alpha is not None:
        _positive("lora.alpha", c.lora.alpha)
    if not 0 <= c.lora.dropout < 1:
        raise ConfigError("lora.dropout", f"must be in [0, 1), got {c.lora.dropout!r}")
    if not c.lora.target_modules:
        raise ConfigError("lora.target_modules", "must name at least one module")
    start = c.sparsity.start_top_k
    if isinstance(start, str) and start != "dense":
        raise ConfigError(
            "sparsity.start_top_k", f"must be 'dense' or an integer >= moc.top_k, got {short_repr(start)}"
        )
    if isinstance(start, int) and start < c.moc.top_k:
        raise ConfigError("sparsity.start_top_k", f"must be >= moc.top_k ({c.moc.top_k}), got {start}")
    _positive("sparsity.warmup_steps", c.sparsity.warmup_steps, allow_zero=True)
    _positive("sparsity.anneal_steps", c.sparsity.anneal_steps, allow_zero=True)
    _positive("checkpointing.every", c.checkpointing.every, allow_zero=True)
    if c.checkpointing.total_limit is not None:
        _positive("checkpointing.total_limit", c.checkpointing.total_limit)
    if c.checkpointing.resume_from == "":
        raise ConfigError("checkpointing.resume_from", "is empty; give a checkpoint folder, 'latest' or null")


def _check_data(c: TrainConfig) -> None:
    if not c.data.root:
        raise ConfigError("data.root", "is required: the folder holding the clips and metadata.jsonl")
    if c.data.num_frames < 1 or (c.data.num_frames - 1) % 4:
        raise ConfigError("data.num_frames", f"must be 4n + 1 for Wan's VAE (e.g. 17, 49, 81), got {c.data.num_frames}")
    for name in ("height", "width"):
        if getattr(c.data, name) <= 0 or getattr(c.data, name) % 16:
            raise ConfigError(f"data.{name}", f"must be a positive multiple of 16, got {getattr(c.data, name)}")
    _positive("data.max_sequence_length", c.data.max_sequence_length)
    _positive("data.num_workers", c.data.num_workers, allow_zero=True)
    if not c.data.metadata:
        raise ConfigError("data.metadata", "must name the metadata file inside data.root (e.g. metadata.jsonl)")


def _check_training(t: OptimConfig) -> None:
    for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "learning_rate", "adam_epsilon"):
        _positive(f"training.{name}", getattr(t, name))
    for name in ("lr_warmup_steps", "weight_decay", "max_grad_norm"):
        _positive(f"training.{name}", getattr(t, name), allow_zero=True)
    _positive("training.logit_std", t.logit_std)
    _positive("training.flow_shift", t.flow_shift)
    for name in ("caption_dropout", "first_frame_condition"):
        if not 0 <= getattr(t, name) <= 1:
            raise ConfigError(f"training.{name}", f"must be in [0, 1], got {getattr(t, name)!r}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(t, name) < 1:
            raise ConfigError(f"training.{name}", f"must be in [0, 1), got {getattr(t, name)!r}")
    if t.compile_fullgraph and not t.compile:
        raise ConfigError("training.compile_fullgraph", "needs training.compile: true")
    _positive("training.context_parallel", t.context_parallel)


def _check_validation(v: ValidationConfig) -> None:
    _positive("validation.every", v.every, allow_zero=True)
    if v.every and not v.prompts:
        raise ConfigError("validation.prompts", "must list at least one prompt when validation.every > 0")
    if any(not p.strip() for p in v.prompts):
        raise ConfigError("validation.prompts", "must not hold empty prompts")
    if v.num_frames < 1 or (v.num_frames - 1) % 4:
        raise ConfigError("validation.num_frames", f"must be 4n + 1, got {v.num_frames}")
    for name in ("height", "width"):
        if getattr(v, name) <= 0 or getattr(v, name) % 16:
            raise ConfigError(f"validation.{name}", f"must be a positive multiple of 16, got {getattr(v, name)}")
    _positive("validation.num_inference_steps", v.num_inference_steps)
    _positive("validation.guidance_scale", v.guidance_scale, allow_zero=True)
    _positive("validation.fps", v.fps)
    if v.fps > 1000:
        raise ConfigError("validation.fps", f"must be at most 1000, got {v.fps}")
    if v.shot_frames is not None and (
        not v.shot_frames or any(n <= 0 for n in v.shot_frames) or sum(v.shot_frames) != (v.num_frames - 1) // 4 + 1
    ):
        raise ConfigError(
            "validation.shot_frames",
            f"must be positive latent-frame counts summing to {(v.num_frames - 1) // 4 + 1} "
            f"(latent frames of validation.num_frames={v.num_frames}), got {short_repr(v.shot_frames)}",
        )


def load_train_config(
    path: str | os.PathLike, overrides: list[str] | None = None, resume_from: str | None = None
) -> TrainConfig:
    r"""
    Read a YAML training config and validate it.

    Args:
        path (`str` or `os.PathLike`): the YAML file.
        overrides (`list[str]`, *optional*): `dotted.key=value` strings applied on top (values parsed as YAML), as
            given to `diffusers-moc train --set`. An empty section in the YAML (`validation:`) takes overrides too.
        resume_from (`str`, *optional*): sets `checkpointing.resume_from` after the overrides, taken as is (not parsed
            as YAML, so a folder named `2024` or `yes` stays a path), as given to `diffusers-moc train --resume`.

    Returns:
        [`TrainConfig`]
    """
    try:
        data = load_yaml(path, "training config")
    except InputError as e:
        raise ConfigError("config", str(e)) from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError("config", f"{os.fspath(path)} must hold a mapping at the top level")
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError("--set", f"expected dotted.key=value, got {short_repr(item)}")
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            if node.get(p) is None:  # absent, or an empty section (`validation:` in YAML reads as None)
                node[p] = {}
            node = node[p]
            if not isinstance(node, dict):
                raise ConfigError(key, f"{p} is not a section")
        try:
            node[leaf] = parse_yaml(raw)
        except Exception as e:  # noqa: BLE001  (any YAML error: the value is bad)
            raise ConfigError(
                key, f"--set value {short_repr(raw)} is not valid YAML: {' '.join(str(e).split())}"
            ) from None
    if resume_from is not None:
        if data.get("checkpointing") is None:
            data["checkpointing"] = {}
        if not isinstance(data["checkpointing"], dict):
            raise ConfigError("checkpointing", f"must be a mapping, got {type(data['checkpointing']).__name__}")
        data["checkpointing"]["resume_from"] = str(resume_from)
    return TrainConfig.from_dict(data)
