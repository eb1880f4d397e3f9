"""LoRA fine-tuning of a video transformer through MoC attention, with accelerate (`diffusers-moc train`).

Wan 2.1 T2V, Wan 2.2 TI2V-5B (per-token timesteps; `training.first_frame_condition` trains its image-to-video mode),
Wan 2.2 T2V-A14B (`model.expert`: each expert's LoRA on its own timesteps, see `experts`) and HunyuanVideo 1.5 T2V
are trained; the model family is known from its configs before any weights load.

The loop follows diffusers' flow-matching LoRA scripts (SD3 / Flux DreamBooth LoRA): frozen base weights in the
mixed-precision dtype, fp32 LoRA parameters added with `transformer.add_adapter(LoraConfig(...))`, AdamW, checkpoints
through `accelerator.save_state` whose hooks write the adapter in diffusers' LoRA format. On top of that it applies MoC
(`apply_moc`), anneals `top_k` with the sparsity schedule and passes shots to MoC with `moc_context`.

A run is built in steps, cheap checks first, each returning what the next one needs: the output folder and the run
plan (`checkpoints.plan_run`: resume, nothing to do, or only the export left), the clips (`data`), the models, a check
that the model takes the training and validation sizes, the encoders and latent cache (`encoding`), the optimiser,
then the loop of optimizer steps (`step.FlowMatchingStep` per micro-batch), checkpoints
(`checkpoints.save_checkpoint`) and validation videos (`validation`), and the export to `final/`. Every file is
written all-or-nothing, so an interrupted run leaves complete checkpoints and the next run with `resume_from: latest`
continues from the newest.

Multi-shot clips are conditioned exactly as `LongVideoPipeline` conditions them: the global caption and each distinct
shot caption are encoded separately and concatenated (`diffusers_moc.captions`), and the MoC processor, installed on the
cross-attention layers too (`apply_moc`), gives each shot's tokens only the global caption plus their own
caption. Clips with a single caption train with one prompt and stock cross-attention. Caption dropout replaces all
captions of a sample with the empty prompt (stock cross-attention), the unconditional input of guidance. On
HunyuanVideo 1.5 each caption is a text chunk of its shot in the joint stream, with the text and transformer inputs
`HunyuanVideo15LongVideoPipeline` builds (`diffusers_moc.hunyuan_video15_text`, `encoding_hunyuan_video15`).

Exact resume: everything random is drawn from the global torch RNG, which `accelerator.save_state` saves and restores
(noise, timesteps, latent sampling, LoRA dropout, MoC drop-off / drop-in), or is a pure function of the step (data
order via `StepBatchSampler`, the sparsity schedule). Resuming from step N and training to M therefore gives the same
weights as training straight to M.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.apply import apply_moc, update_moc_config
from ..core.atomic import pause_point
from ..core.attention_processors.base import patch_sizes
from ..core.config import MoCConfig, resolve_pretrained_source
from ..core.layout import ChunkLayout
from ..hub import ADAPTER_FILES, push_to_hub, save_moc_lora
from ..model_families import (
    ALL_FAMILIES,
    HUNYUAN_VIDEO15_FAMILIES,
    UnsupportedModelError,
    WanFamily,
    family_of_source,
)
from ..tiny import cast_like_from_pretrained
from .checkpoints import (
    RunPlan,
    check_writable,
    plan_run,
    prepare_output_dir,
    resume_differences,
    save_checkpoint,
    write_final,
)
from .config import ConfigError, TrainConfig
from .data import CachedLatentDataset, StepBatchSampler, VideoClipDataset, collate_samples
from .encoding import SampleEncoder
from .encoding_hunyuan_video15 import HunyuanVideo15SampleEncoder
from .experts import Expert, expert_for_step, needed_components, timestep_ranges, trained_components
from .parallel import (
    Parallelism,
    check_context_parallel,
    enable_context_parallel,
    fsdp_plugin,
    lora_state_dict,
    parallelism,
)
from .schedule import SparsitySchedule, routed_density
from .step import FlowMatchingStep
from .validation import render_validation

__all__ = ["MoCLoRATrainer", "TrainResult", "train"]

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    r"""
    Attributes:
        global_step (`int`): optimizer steps done (including those before a resume).
        losses (`list[float]`): the loss of every optimizer step run in this call.
        densities (`list[float]`): the attended fraction at every optimizer step run in this call.
        learning_rates (`list[float]`): the learning rate of every optimizer step run in this call.
        final_dir (`str`, *optional*): the exported adapter folder (main process; `None` when nothing was done).
        validation_videos (`list[str]`): written validation videos.
        message (`str`, *optional*): why the call trained nothing, or only exported `final/` (the run had already
            reached `training.max_steps`).
    """

    global_step: int
    losses: list[float] = field(default_factory=list)
    densities: list[float] = field(default_factory=list)
    learning_rates: list[float] = field(default_factory=list)
    final_dir: str | None = None
    validation_videos: list[str] = field(default_factory=list)
    message: str | None = None


class _TrainState:
    """Checkpointed with `accelerator.register_for_checkpointing`: the optimizer step count."""

    def __init__(self):
        self.step = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])


#: Config sections that may change between a checkpoint and its resume without changing the training itself.
_FREE_SECTIONS = ("checkpointing", "validation", "logging", "hub")


@dataclass(frozen=True)
class _Setup:
    """The run before any model loads: the accelerator, the run plan, the weights' dtype, trackers and model family."""

    accelerator: Any
    plan: RunPlan
    weight_dtype: torch.dtype
    trackers: list[str]
    family: WanFamily
    par: Parallelism = field(default_factory=Parallelism)


@dataclass(frozen=True)
class _Models:
    """The pipeline, MoC applied, and the transformers given a LoRA (by component name, in training order)."""

    pipe: Any
    trained: dict[str, torch.nn.Module]


@dataclass(frozen=True)
class _Data:
    r"""
    The samples and what follows from their shots: the encoders, the sparsity schedule and the densest layout's
    chunk count (`dense_top_k`).
    """

    dataset: VideoClipDataset | CachedLatentDataset
    encoder: SampleEncoder
    layout_of: Callable[[tuple[int, ...] | None], ChunkLayout]  # a sample's latent shot frames -> its MoC layout
    schedule: SparsitySchedule
    dense_top_k: int


@dataclass(frozen=True)
class _Optimisation:
    """The prepared experts, the optimizer and its scheduler, the micro-batch step and the checkpointed step count."""

    experts: list[Expert]
    params: list[torch.nn.Parameter]
    optimizer: Any
    lr_scheduler: Any
    step_fn: FlowMatchingStep
    state: _TrainState


@dataclass(frozen=True)
class _Training:
    """Everything the loop and the export use: each setup stage's result."""

    setup: _Setup
    models: _Models
    data: _Data
    optim: _Optimisation


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    # TensorBoard hparams take scalars only.
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
    return out


def _pipeline_class(family: WanFamily) -> type:
    """The diffusers pipeline that holds a family's components: `HunyuanVideo15Pipeline` or `WanPipeline`."""
    from diffusers import HunyuanVideo15Pipeline, WanPipeline

    return HunyuanVideo15Pipeline if family.name in HUNYUAN_VIDEO15_FAMILIES else WanPipeline


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _resolve_trackers(report_to: list[str]) -> list[str]:
    names: list[str] = []
    for name in report_to:
        if name == "none":
            continue
        if name == "auto":
            names += [n for n in ("tensorboard", "wandb") if _installed(n)]
        else:
            names.append(name)
    for name in dict.fromkeys(names):
        if not _installed(name):
            raise ConfigError(
                "logging.report_to", f"lists {name!r} but {name} is not installed: pip install {name} (or use [])"
            )
    return list(dict.fromkeys(names))


class MoCLoRATrainer:
    r"""
    Fine-tune a Wan or HunyuanVideo 1.5 (text-to-video) transformer with a PEFT LoRA adapter through
    Mixture-of-Contexts attention.

    Args:
        config (`TrainConfig`): the validated training config.

    Example:

    ```py
    >>> from diffusers_moc.training import MoCLoRATrainer, load_train_config

    >>> result = MoCLoRATrainer(load_train_config("examples/train_lora.yaml")).train()
    >>> result.final_dir  # diffusers LoRA + moc_config.json + README.md
    ```
    """

    def __init__(self, config: TrainConfig):
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        self.config = config
        self.pipeline = None  # the WanPipeline (HunyuanVideo15Pipeline) holding the trained transformer

    def train(self) -> TrainResult:
        r"""
        Run (or resume) training; returns a [`TrainResult`]. The trained pipeline stays in `self.pipeline`.

        Raises:
            [`ConfigError`]: naming the field, for every problem found before training starts (folders that cannot
                be written, a resume that would overwrite work, no usable clip, a model that cannot take the sizes).
        """
        setup = self._start()
        if setup.plan.action == "done":
            logger.info(setup.plan.message)  # also in the result (the command line prints it)
            setup.accelerator.end_training()
            return TrainResult(global_step=setup.plan.start_step, message=setup.plan.message)
        clips = self._clips()
        models = self._load_models(setup)
        self._check_model_fits(models.pipe, setup.par)
        data = self._prepare_data(setup, models.pipe, clips)
        optim = self._prepare_optimisation(setup, models, data.encoder)
        self._resume(setup, data.dataset, optim.state)
        run = _Training(setup, models, data, optim)
        batches = self._batches(run) if setup.plan.action == "train" else iter(())
        result = TrainResult(global_step=optim.state.step, message=setup.plan.message)
        last_validated = self._train_loop(run, batches, result)
        self._finish(run, result, last_validated)
        return result

    # ------------------------------------------------------------------ setup: folders and plan, before any model
    def _start(self) -> _Setup:
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        c, t = self.config, self.config.training
        if c.model.pretrained != "tiny":
            try:
                local = resolve_pretrained_source(c.model.pretrained)
            except FileNotFoundError as e:
                raise ConfigError("model.pretrained", str(e)) from None
            if local is not None and not os.path.isfile(os.path.join(local, "model_index.json")):
                raise ConfigError(
                    "model.pretrained", f"{local} is not a diffusers pipeline folder (no model_index.json)"
                )
        family = self._family()
        trackers = _resolve_trackers(c.logging.report_to)
        if c.hub.push:
            from huggingface_hub import get_token

            if get_token() is None:
                logger.warning(
                    "hub.push is true but no Hugging Face token is set: the upload at the end will fail; log in "
                    "with `hf auth login` or set HF_TOKEN"
                )
        accelerator = Accelerator(
            # Each Wan block is one FSDP2 unit (`accelerate launch` with an FSDP config gives the plugin instead).
            fsdp_plugin=fsdp_plugin(["WanTransformerBlock"]) if t.fsdp else None,
            gradient_accumulation_steps=t.gradient_accumulation_steps,
            mixed_precision=t.mixed_precision,
            log_with=trackers or None,
            project_config=ProjectConfiguration(
                project_dir=c.output_dir, logging_dir=os.path.join(c.output_dir, "logs")
            ),
        )
        par = parallelism(accelerator, t.context_parallel, t.fsdp)
        if par.fsdp and c.validation.every:
            raise ConfigError("validation.every", "must be 0 under FSDP: validation videos render on one process")
        # Every process checks (so all raise together); only the main one cleans up after interrupted runs.
        prepare_output_dir(c.output_dir, clean_up=accelerator.is_main_process)
        if c.data.cache:
            check_writable(c.data.cache_dir or os.path.join(c.output_dir, "cache"), "data.cache_dir")
        accelerator.wait_for_everyone()
        plan = plan_run(c.output_dir, c.checkpointing.resume_from, t.max_steps)
        if accelerator.is_main_process:
            for warning in plan.warnings:
                logger.warning(warning)
            if plan.action == "export":
                logger.warning(plan.message)
        weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, torch.float32)
        return _Setup(
            accelerator=accelerator, plan=plan, weight_dtype=weight_dtype, trackers=trackers, family=family, par=par
        )

    def _family(self) -> WanFamily:
        """The model's family, from its folder or Hub configs before any weights load; checked against `model`."""
        m = self.config.model
        if m.pretrained == "tiny":
            family = ALL_FAMILIES[m.tiny_model]
        else:
            try:
                family = family_of_source(m.pretrained, revision=m.revision)
            except UnsupportedModelError as e:
                raise ConfigError("model.pretrained", str(e)) from None
            except OSError as e:
                raise ConfigError("model.pretrained", f"cannot read its configuration: {e}") from None
        trainable = [f.title for f in ALL_FAMILIES.values() if f.trainable]
        if not family.trainable:
            raise ConfigError("model.pretrained", f"is a {family.title} model; training supports {trainable}")
        if m.expert is not None and not family.experts:
            raise ConfigError("model.expert", f"is for Wan 2.2 A14B's two experts; {family.title} has one transformer")
        if self.config.training.first_frame_condition and not family.expand_timesteps:
            raise ConfigError(
                "training.first_frame_condition", f"is for Wan 2.2 TI2V-5B (a clean first frame), not {family.title}"
            )
        if family.name in HUNYUAN_VIDEO15_FAMILIES:
            self._check_hunyuan_video15_options(family)
        return family

    def _check_hunyuan_video15_options(self, family: WanFamily) -> None:
        """The Wan-only parallelism options, refused on HunyuanVideo 1.5 before any model loads."""
        t = self.config.training
        # MoC's HunyuanVideo 1.5 attention does not split its joint stream over ranks; FSDP's units are Wan blocks.
        if t.context_parallel > 1:
            raise ConfigError("training.context_parallel", f"must be 1 on {family.title} (Wan only)")
        if t.fsdp:
            raise ConfigError("training.fsdp", f"must be false on {family.title} (Wan only)")

    def _clips(self) -> VideoClipDataset:
        d = self.config.data
        try:
            return VideoClipDataset(
                d.root, d.num_frames, d.height, d.width, metadata=d.metadata, validate=d.validate_clips and not d.cache
            )
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError("data.root", str(e)) from None

    # ------------------------------------------------------------------ setup: models
    def _load_components(self, family: WanFamily, weight_dtype: torch.dtype) -> dict[str, Any]:
        """The pipeline's components and settings; of A14B only the experts the run needs."""
        m = self.config.model
        needed = needed_components(family.experts, m.expert, bool(self.config.validation.every))
        skipped = {name: None for name in ("transformer", "transformer_2") if family.experts and name not in needed}
        hunyuan = family.name in HUNYUAN_VIDEO15_FAMILIES
        if m.pretrained == "tiny":
            from ..tiny import tiny_wan_components
            from ..tiny_hunyuan_video15 import tiny_hunyuan_video15_components

            build = tiny_hunyuan_video15_components if hunyuan else tiny_wan_components
            return {**build(seed=m.tiny_seed, model=m.tiny_model), **skipped}
        try:
            pipe = _pipeline_class(family).from_pretrained(
                m.pretrained, revision=m.revision, variant=m.variant, torch_dtype=weight_dtype, **skipped
            )
        except OSError as e:  # missing files, unknown repo, no network
            where = "the folder" if os.path.isdir(m.pretrained) else "it is not a local folder; as a Hub repo it"
            reason = " ".join(str(e).split())
            raise ConfigError(
                "model.pretrained", f"{m.pretrained!r} cannot be loaded ({where} failed): {reason}"
            ) from None
        settings = {k: pipe.config[k] for k in ("boundary_ratio", "expand_timesteps") if k in pipe.config}
        return {**dict(pipe.components), **settings}

    def _load_models(self, setup: _Setup) -> _Models:
        from accelerate.utils import set_seed

        c = self.config
        set_seed(c.seed)
        components = self._load_components(setup.family, setup.weight_dtype)
        set_seed(c.seed)  # the tiny builder reseeds; LoRA init must depend on `seed` only
        vae = components["vae"]
        # Wan has one text encoder; HunyuanVideo 1.5 a second one for glyph text (ByT5).
        text_encoders = [components[n] for n in ("text_encoder", "text_encoder_2") if components.get(n) is not None]
        transformers = {name: components[name] for name in ("transformer", "transformer_2") if components.get(name)}
        for module in (vae, *text_encoders, *transformers.values()):
            module.requires_grad_(False)
        # The VAE is kept in fp32 (as diffusers' Wan pipelines do); the rest runs in the mixed-precision dtype.
        for module, dtype in ((vae, torch.float32), *((e, setup.weight_dtype) for e in text_encoders)):
            module.to(setup.accelerator.device)
            cast_like_from_pretrained(module, dtype)
            module.eval()
        for module in transformers.values():
            module.to(setup.accelerator.device)
            cast_like_from_pretrained(module, setup.weight_dtype)
        # MoC drop-off / drop-in draw from the global RNG in training: that RNG is saved by accelerate (exact
        # resume) and replayed by torch.utils.checkpoint, so a checkpointed block recomputes the very routing of its
        # forward. `apply_moc` installs the per-shot caption cross-attention too (used when a sample has shot
        # captions). A frozen A14B expert (for validation videos) runs MoC too.
        for module in transformers.values():
            apply_moc(module, c.moc)
        trained = {name: transformers[name] for name in trained_components(setup.family.experts, c.model.expert)}
        for transformer in trained.values():
            self._add_lora(transformer, setup.weight_dtype)
        # Last: diffusers' split / gather hooks then wrap the LoRA-adapted modules (`proj_out` may be a target).
        for module in transformers.values():
            enable_context_parallel(module, setup.par)
        pipe = self.pipeline = _pipeline_class(setup.family)(**components)
        pipe.set_progress_bar_config(disable=True)
        return _Models(pipe, trained)

    def _add_lora(self, transformer: torch.nn.Module, weight_dtype: torch.dtype) -> None:
        """The PEFT LoRA adapter (fp32 parameters), gradient checkpointing and regional compilation."""
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig

        c, t = self.config, self.config.training
        lora = LoraConfig(
            r=c.lora.rank,
            lora_alpha=c.lora.alpha if c.lora.alpha is not None else c.lora.rank,
            lora_dropout=c.lora.dropout,
            init_lora_weights=True,
            target_modules=list(c.lora.target_modules),
        )
        try:
            transformer.add_adapter(lora)
        except ValueError as e:
            raise ConfigError("lora.target_modules", f"{c.lora.target_modules}: {e}") from None
        if weight_dtype != torch.float32:
            cast_training_params(transformer, dtype=torch.float32)
        if t.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        if t.compile:
            import torch._inductor.config as inductor_config

            # Random draws inside the compiled blocks (MoC drop-off / drop-in, LoRA dropout) as eager mode draws
            # them: a compiled run trains as the eager one does, and resumes exactly.
            inductor_config.fallback_random = True
            # Regional compilation: every repeated block (e.g. WanTransformerBlock) shares one compiled graph. Static
            # shapes: a training run has one sample shape, and MoC's layout is a per-shape constant.
            transformer.compile_repeated_blocks(fullgraph=t.compile_fullgraph, dynamic=False)

    @staticmethod
    def _denoiser(pipe) -> torch.nn.Module:
        return pipe.transformer if pipe.transformer is not None else pipe.transformer_2

    def _check_model_fits(self, pipe, par: Parallelism) -> None:
        """The training and validation sizes against the model, before anything is encoded."""
        c = self.config
        config = self._denoiser(pipe).config
        if par.context_parallel > 1:
            frames, per_frame = self._latent_grid(pipe)
            check_context_parallel(self._denoiser(pipe), par.context_parallel, frames * per_frame)
        rope = getattr(config, "rope_max_seq_len", None)
        p_t, p_h, p_w = patch_sizes(self._denoiser(pipe))
        spatial, temporal = pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal
        sizes = [("data", c.data)] + ([("validation", c.validation)] if c.validation.every else [])
        for section, s in sizes:
            latent_frames = ((s.num_frames - 1) // temporal + 1) // p_t
            if rope is not None and latent_frames > rope:
                raise ConfigError(
                    f"{section}.num_frames",
                    f"{s.num_frames} frames are {latent_frames} latent frames, more than the model's "
                    f"rope_max_seq_len={rope} (model.pretrained={c.model.pretrained})",
                )
            for name, patch in (("height", p_h), ("width", p_w)):
                value, multiple = getattr(s, name), spatial * patch
                if value % multiple:
                    raise ConfigError(f"{section}.{name}", f"must be a multiple of {multiple} for this model")
                if rope is not None and value // multiple > rope:
                    raise ConfigError(
                        f"{section}.{name}",
                        f"{value} pixels are {value // multiple} patches, more than the model's "
                        f"rope_max_seq_len={rope} (model.pretrained={c.model.pretrained}; at most "
                        f"{rope * multiple} pixels)",
                    )

    # ------------------------------------------------------------------ setup: data, schedule, optimiser
    def _prepare_data(self, setup: _Setup, pipe, clips: VideoClipDataset) -> _Data:
        c, d = self.config, self.config.data
        accelerator = setup.accelerator
        hunyuan = setup.family.name in HUNYUAN_VIDEO15_FAMILIES
        encoder_cls = HunyuanVideo15SampleEncoder if hunyuan else SampleEncoder
        encoder = encoder_cls(pipe, accelerator.device, setup.weight_dtype, d.max_sequence_length)
        dataset = clips
        if d.cache:
            # Everything the cached tensors depend on besides the clip: the encoders, their dtype and the text length.
            m = c.model
            tiny = [m.tiny_seed, m.tiny_model] if m.pretrained == "tiny" else [m.tiny_seed]
            tag = json.dumps(
                [m.pretrained, m.revision, m.variant, *tiny, str(setup.weight_dtype), d.max_sequence_length]
            )
            with accelerator.main_process_first():  # rank 0 writes the cache, the others read it
                dataset = CachedLatentDataset(
                    clips,
                    d.cache_dir or os.path.join(c.output_dir, "cache"),
                    encoder.encode_one,
                    tag=tag,
                    keys=encoder.cache_keys,
                )
        frames, tokens_per_frame = self._latent_grid(pipe)
        records = dataset.items if d.cache else [r.__dict__ for r in dataset.records]

        def layout_of(shots: tuple[int, ...] | None) -> ChunkLayout:
            return ChunkLayout.for_video(frames, tokens_per_frame, shots, c.moc.chunk_tokens)

        dense_top_k = max(layout_of(s).num_chunks for s in {r["shot_frames"] for r in records})
        return _Data(dataset, encoder, layout_of, self._sparsity_schedule(dense_top_k), dense_top_k)

    def _sparsity_schedule(self, dense_top_k: int) -> SparsitySchedule:
        c, sp = self.config, self.config.sparsity
        start_top_k = dense_top_k if sp.start_top_k == "dense" else sp.start_top_k
        schedule = SparsitySchedule(
            start_top_k=max(start_top_k, c.moc.top_k),
            target_top_k=c.moc.top_k,
            warmup_steps=sp.warmup_steps,
            anneal_steps=sp.anneal_steps,
            shape=sp.shape,
            dense_top_k=dense_top_k,
        )
        if sp.warmup_steps + sp.anneal_steps > c.training.max_steps:
            logger.warning(
                "the sparsity schedule ends at step %d, after training.max_steps=%d: the model never trains at the "
                "target top_k=%d it is exported with",
                sp.warmup_steps + sp.anneal_steps,
                c.training.max_steps,
                c.moc.top_k,
            )
        return schedule

    def _latent_grid(self, pipe) -> tuple[int, int]:
        """(latent frames, tokens per latent frame) of a training sample."""
        d = self.config.data
        p_t, p_h, p_w = patch_sizes(self._denoiser(pipe))
        s = pipe.vae_scale_factor_spatial
        frames = ((d.num_frames - 1) // pipe.vae_scale_factor_temporal + 1) // p_t
        return frames, (d.height // s // p_h) * (d.width // s // p_w)

    def _prepare_optimisation(self, setup: _Setup, models: _Models, encoder: SampleEncoder) -> _Optimisation:
        from diffusers.optimization import get_scheduler

        c, t = self.config, self.config.training
        accelerator, pipe = setup.accelerator, models.pipe
        params = [p for m in models.trained.values() for p in m.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params,
            lr=t.learning_rate,
            betas=(t.adam_beta1, t.adam_beta2),
            weight_decay=t.weight_decay,
            eps=t.adam_epsilon,
        )
        # The accelerate-wrapped scheduler steps once per process per optimizer step (as in diffusers' scripts).
        lr_scheduler = get_scheduler(
            t.lr_scheduler,
            optimizer=optimizer,
            num_warmup_steps=t.lr_warmup_steps * accelerator.num_processes,
            num_training_steps=t.max_steps * accelerator.num_processes,
        )
        self._register_hooks(accelerator, models.trained, setup.weight_dtype, setup.par.fsdp)
        state = _TrainState()
        accelerator.register_for_checkpointing(state)
        *prepared, optimizer, lr_scheduler = accelerator.prepare(*models.trained.values(), optimizer, lr_scheduler)
        patch = patch_sizes(self._denoiser(pipe)) if setup.family.expand_timesteps else None
        step_fn = FlowMatchingStep(accelerator, encoder, t, c.data.cache, patch, grad_scale=setup.par.context_parallel)
        ranges = timestep_ranges(step_fn.timesteps, pipe.config.get("boundary_ratio"))
        total = len(step_fn.timesteps)
        experts = [
            Expert(name, model, module, ranges[name], (ranges[name][1] - ranges[name][0]) / total)
            for (name, model), module in zip(models.trained.items(), prepared)
        ]
        return _Optimisation(experts, params, optimizer, lr_scheduler, step_fn, state)

    def _resume(self, setup: _Setup, dataset, state: _TrainState) -> None:
        """Load the checkpoint the run plan resumes from (checked against this run's settings); start the trackers."""
        c, accelerator, resume = self.config, setup.accelerator, setup.plan.resume
        if resume is not None:
            logger.info("resuming from %s (step %d)", resume.path, resume.step)
            changed = resume_differences(resume.path, self._run_info(dataset))
            if changed and accelerator.is_main_process:
                logger.warning(
                    "resuming %s with different settings, so the run does not continue as it would have: %s",
                    resume.path,
                    "; ".join(changed[:8]),
                )
            try:
                accelerator.load_state(resume.path)
            except (RuntimeError, ValueError, KeyError, OSError) as e:
                raise ConfigError(
                    "checkpointing.resume_from",
                    f"{resume.path} cannot be loaded (a damaged file, or written for another lora, model or "
                    "optimizer config): " + " ".join(str(e).split())[:300],
                ) from None
            if state.step != resume.step:
                raise ConfigError(
                    "checkpointing.resume_from", f"{resume.path} holds step {state.step}, not {resume.step}"
                )
        if setup.trackers:
            accelerator.init_trackers(c.logging.project_name, config=_flatten(c.to_dict()))

    def _batches(self, run: _Training) -> Iterator[dict[str, Any]]:
        """The micro-batches from the run's current step on (`StepBatchSampler`: exact resume)."""
        c, t = self.config, self.config.training
        dataset = run.data.dataset
        try:
            sampler = StepBatchSampler(
                len(dataset),
                t.batch_size,
                seed=c.seed,
                # The ranks of a context-parallel group train on the same samples.
                rank=run.setup.par.data_rank,
                world_size=run.setup.par.data_world,
                start=run.optim.state.step * t.gradient_accumulation_steps,
            )
        except ValueError as e:
            raise ConfigError("training.batch_size", str(e)) from None
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=collate_samples,
            num_workers=c.data.num_workers,
            # An own generator keeps DataLoader's per-iterator seed draw off the global RNG (exact resume).
            generator=torch.Generator().manual_seed(c.seed),
        )
        return iter(loader)

    # ------------------------------------------------------------------ the loop
    def _train_loop(self, run: _Training, batches: Iterator[dict[str, Any]], result: TrainResult) -> int:
        """Optimizer steps up to `training.max_steps`, with checkpoints and validation. Returns the last step with
        validation videos (-1: none)."""
        from tqdm.auto import tqdm

        c, t = self.config, self.config.training
        accelerator, state = run.setup.accelerator, run.optim.state
        progress = tqdm(
            total=t.max_steps, initial=state.step, desc="train", disable=not accelerator.is_local_main_process
        )
        for expert in run.optim.experts:
            expert.prepared.train()
        current: MoCConfig | None = None
        last_validated = -1
        try:
            while state.step < t.max_steps:
                step_config = run.data.schedule.moc_config(c.moc, state.step)
                if step_config != current:
                    update_moc_config(run.models.pipe, **step_config.to_dict())
                    current = step_config
                loss, density = self._optimizer_step(run, batches, step_config)
                state.step += 1
                self._record(run, result, progress, step_config.top_k, loss, density)
                step = state.step
                if c.checkpointing.every and step % c.checkpointing.every == 0:
                    limit, protected = c.checkpointing.total_limit, run.setup.plan.protected
                    run_info = self._run_info(run.data.dataset)
                    save_checkpoint(accelerator, c.output_dir, step, limit, protected, run_info)
                if c.validation.every and step % c.validation.every == 0:
                    result.validation_videos += self._validate(run, step)
                    last_validated = step
        finally:
            progress.close()  # ends the bar line, also when interrupted
        result.global_step = state.step
        return last_validated

    def _record(self, run: _Training, result: TrainResult, progress, top_k: int, loss: float, density: float) -> None:
        """The step's loss, density and learning rate: into the result, the progress bar and the trackers."""
        step, lr = run.optim.state.step, run.optim.lr_scheduler.get_last_lr()[0]
        result.losses.append(loss)
        result.densities.append(density)
        result.learning_rates.append(lr)
        progress.update(1)
        progress.set_postfix(loss=f"{loss:.4f}", density=f"{density:.3f}", top_k=top_k)
        if step % self.config.logging.log_every == 0 and run.setup.trackers:
            metrics = {"train/loss": loss, "train/density": density, "train/top_k": top_k, "train/lr": lr}
            run.setup.accelerator.log(metrics, step=step)

    def _optimizer_step(
        self, run: _Training, batches: Iterator[dict[str, Any]], step_config: MoCConfig
    ) -> tuple[float, float]:
        """One optimizer step over `gradient_accumulation_steps` micro-batches: `(loss, attended fraction)`."""
        t, optim = self.config.training, run.optim
        accelerator = run.setup.accelerator
        # The whole optimizer step (and its DDP gradient sync) trains one transformer.
        expert = expert_for_step(optim.experts, self.config.seed, optim.state.step)
        step_loss = torch.zeros((), device=accelerator.device)
        shots_seen: list = []
        for _ in range(t.gradient_accumulation_steps):
            batch = next(batches)
            shots_seen.extend(batch["shot_frames"])
            with accelerator.accumulate(expert.prepared):
                step_loss += optim.step_fn(batch, expert.prepared, expert.timesteps) / t.gradient_accumulation_steps
                if accelerator.sync_gradients and t.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(optim.params, t.max_grad_norm)
                optim.optimizer.step()
                optim.lr_scheduler.step()
                optim.optimizer.zero_grad()
        if not accelerator.sync_gradients:
            raise RuntimeError("gradient accumulation went out of step with the optimizer (internal error)")
        loss = accelerator.gather(step_loss[None]).mean().item()
        density = sum(routed_density(run.data.layout_of(s), step_config) for s in shots_seen) / len(shots_seen)
        return loss, density

    def _validate(self, run: _Training, step: int) -> list[str]:
        c = self.config
        out_dir = os.path.join(c.output_dir, "validation")
        return render_validation(
            run.setup.accelerator,
            run.models.pipe,
            c.validation,
            c.moc,
            c.data.max_sequence_length,
            out_dir,
            step,
            run.setup.trackers,
        )

    # ------------------------------------------------------------------ the export
    def _finish(self, run: _Training, result: TrainResult, last_validated: int) -> None:
        c = self.config
        accelerator, step = run.setup.accelerator, run.optim.state.step
        result.global_step = step
        # The exported model is the target configuration: drop-off / drop-in off (eval) and moc as configured.
        adapted = run.models.trained
        for model in adapted.values():
            model.eval()
        update_moc_config(run.models.pipe, **c.moc.to_dict())
        if c.validation.every and last_validated != step:
            result.validation_videos += self._validate(run, step)
        accelerator.wait_for_everyone()
        # Sharded (FSDP) adapters are gathered by every rank; the main process writes them.
        fsdp = run.setup.par.fsdp
        states = {name: lora_state_dict(m, fsdp) for name, m in adapted.items()} if fsdp else None
        if accelerator.is_main_process:

            def write(folder: str) -> None:
                save_moc_lora(
                    adapted.get("transformer"),
                    folder,
                    c.moc,
                    transformer_2=adapted.get("transformer_2"),
                    base_model=None if c.model.pretrained == "tiny" else c.model.pretrained,
                    repo_id=c.hub.repo_id,
                    training_info=self._training_info(step, run.data.dense_top_k),
                    lora_layers=states,
                )

            result.final_dir = write_final(c.output_dir, write)
            logger.info("saved the MoC LoRA to %s", result.final_dir)
            if c.hub.push:
                try:
                    url = push_to_hub(result.final_dir, c.hub.repo_id, private=c.hub.private)
                except Exception as e:  # the trained adapter is safe on disk: say so, and how to upload it later
                    raise RuntimeError(
                        f"training finished and {result.final_dir} is saved, but uploading it to {c.hub.repo_id} "
                        f"failed ({type(e).__name__}: {e}); upload it later with "
                        f"diffusers_moc.push_to_hub({result.final_dir!r}, {c.hub.repo_id!r})"
                    ) from e
                logger.info("uploaded to %s", url)
        accelerator.end_training()

    # ------------------------------------------------------------------ helpers
    def _run_info(self, dataset) -> dict[str, Any]:
        """What an exact resume depends on (saved in each checkpoint's marker): the settings and the data size."""
        keep = {k: v for k, v in _flatten(self.config.to_dict()).items() if k.split(".")[0] not in _FREE_SECTIONS}
        keep.pop("training.max_steps", None)  # raising max_steps is how a run is continued
        keep.pop("output_dir", None)
        # How many ranks split a sample does not change what is trained (drop-off / drop-in draw as on one rank).
        keep.pop("training.context_parallel", None)
        return {**keep, "data.usable_clips": len(dataset)}

    def _training_info(self, global_step: int, dense_top_k: int) -> dict[str, Any]:
        c = self.config
        t = c.training
        return {
            "steps": global_step,
            "learning_rate": t.learning_rate,
            "lr_scheduler": t.lr_scheduler,
            "batch_size": t.batch_size,
            "gradient_accumulation_steps": t.gradient_accumulation_steps,
            "mixed_precision": t.mixed_precision,
            "weighting_scheme": t.weighting_scheme,
            "flow_shift": t.flow_shift,
            "caption_dropout": t.caption_dropout,
            "resolution": [c.data.num_frames, c.data.height, c.data.width],
            "sparsity_schedule": {
                "start_top_k": c.sparsity.start_top_k,
                "dense_top_k": dense_top_k,
                "target_top_k": c.moc.top_k,
                "warmup_steps": c.sparsity.warmup_steps,
                "anneal_steps": c.sparsity.anneal_steps,
                "shape": c.sparsity.shape,
            },
            "seed": c.seed,
        }

    def _register_hooks(
        self, accelerator, trained: dict[str, torch.nn.Module], weight_dtype: torch.dtype, fsdp: bool = False
    ) -> None:
        from diffusers import WanPipeline
        from diffusers.training_utils import cast_training_params
        from diffusers.utils import convert_unet_state_dict_to_peft
        from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

        # Each trained transformer's adapter is its own file, named as in the exported folder (hub.ADAPTER_FILES).
        files = {id(model): ADAPTER_FILES[name] for name, model in trained.items()}

        def weight_file(m) -> str:
            if id(m) not in files:
                raise ValueError(f"unexpected model {type(m).__name__} in the checkpoint")
            return files[id(m)]

        # Checkpoints hold only the adapters, in diffusers' LoRA format, not the frozen base weights.
        def save_hook(models, weights, output_dir):
            # Under FSDP every rank gathers the sharded adapters (a collective); the main process writes them.
            layers = [lora_state_dict(accelerator.unwrap_model(m), fsdp) for m in models] if fsdp else None
            if accelerator.is_main_process:
                for i, m in enumerate(models):
                    m = accelerator.unwrap_model(m)
                    WanPipeline.save_lora_weights(
                        output_dir,
                        transformer_lora_layers=layers[i] if fsdp else get_peft_model_state_dict(m),
                        transformer_lora_adapter_metadata=m.peft_config["default"].to_dict(),
                        weight_name=weight_file(m),
                    )
                # output_dir is `.checkpoint-<step>.partial`: the pause point names the checkpoint being saved.
                pause_point(f"{os.path.basename(output_dir).strip('.').removesuffix('.partial')}:weights-saved")
            while weights:
                weights.pop()

        def load_hook(models, input_dir):
            if fsdp:
                # accelerate's FSDP loader restores the sharded model, adapters included, from its own files.
                return
            while models:
                m = accelerator.unwrap_model(models.pop())
                state = WanPipeline.lora_state_dict(input_dir, weight_name=weight_file(m))
                state = {k[len("transformer.") :]: v for k, v in state.items() if k.startswith("transformer.")}
                incompatible = set_peft_model_state_dict(m, convert_unet_state_dict_to_peft(state), "default")
                unexpected = getattr(incompatible, "unexpected_keys", None)
                if unexpected:
                    raise ValueError(f"checkpoint {input_dir} has LoRA weights this model lacks: {unexpected[:5]}")
                if weight_dtype != torch.float32:
                    cast_training_params(m, dtype=torch.float32)

        accelerator.register_save_state_pre_hook(save_hook)
        accelerator.register_load_state_pre_hook(load_hook)


def train(config: TrainConfig) -> TrainResult:
    """Shorthand for `MoCLoRATrainer(config).train()`."""
    return MoCLoRATrainer(config).train()
