"""LoRA fine-tuning of a Wan transformer through MoC attention, with accelerate (`diffusers-moc train`).

The loop follows diffusers' flow-matching LoRA scripts (SD3 / Flux DreamBooth LoRA): frozen base weights in the
mixed-precision dtype, fp32 LoRA parameters added with `transformer.add_adapter(LoraConfig(...))`, AdamW, checkpoints
through `accelerator.save_state` whose hooks write the adapter in diffusers' LoRA format. On top of that it applies MoC
(`apply_moc`), anneals `top_k` with the sparsity schedule and passes shots to MoC with `moc_context`.

Multi-shot clips are conditioned exactly as `LongVideoPipeline` conditions them: the global caption and each distinct
shot caption are encoded separately and concatenated (`pipelines.captions`), and the MoC processor, installed on the
cross-attention layers too (`apply_moc`), gives each shot's tokens only the global caption plus their own
caption. Clips with a single caption train with one prompt and stock cross-attention. Caption dropout replaces all
captions of a sample with the empty prompt (stock cross-attention), the unconditional input of guidance.

Exact resume: everything random is drawn from the global torch RNG, which `accelerator.save_state` saves and restores
(noise, timesteps, latent sampling, LoRA dropout, MoC drop-off / drop-in), or is a pure function of the step (data
order via `StepBatchSampler`, the sparsity schedule). Resuming from step N and training to M therefore gives the same
weights as training straight to M.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from typing import Any

import torch

from ..apply import apply_moc, get_moc_config, update_moc_config
from ..config import MoCConfig
from ..context import moc_context
from ..hub import push_to_hub, save_moc_lora
from ..layout import ChunkLayout
from .config import TrainConfig
from .data import CachedLatentDataset, StepBatchSampler, VideoClipDataset, collate_samples
from .schedule import SparsitySchedule, routed_density

__all__ = ["MoCLoRATrainer", "TrainResult", "train"]

logger = logging.getLogger(__name__)

_CHECKPOINT_PREFIX = "checkpoint-"


@dataclass
class TrainResult:
    r"""
    Attributes:
        global_step (`int`): optimizer steps done (including those before a resume).
        losses (`list[float]`): the loss of every optimizer step run in this call.
        densities (`list[float]`): the attended fraction at every optimizer step run in this call.
        learning_rates (`list[float]`): the learning rate of every optimizer step run in this call.
        final_dir (`str`, *optional*): the exported adapter folder (main process).
        validation_videos (`list[str]`): written validation videos.
    """

    global_step: int
    losses: list[float] = field(default_factory=list)
    densities: list[float] = field(default_factory=list)
    learning_rates: list[float] = field(default_factory=list)
    final_dir: str | None = None
    validation_videos: list[str] = field(default_factory=list)


class _TrainState:
    """Checkpointed with `accelerator.register_for_checkpointing`: the optimizer step count."""

    def __init__(self):
        self.step = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step = int(state["step"])


def _cast_keeping_fp32_modules(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    r"""
    Cast the floating-point weights of `module` to `dtype` in place, except those of its `_keep_in_fp32_modules`
    (Wan's time embedder, norms and modulation tables), which stay fp32 as `from_pretrained(torch_dtype=...)` keeps
    them: in bf16 they lose the precision the model relies on.

    Returns:
        `torch.nn.Module`: `module`.
    """
    keep = list(getattr(module, "_keep_in_fp32_modules", None) or [])
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if not tensor.is_floating_point():
            continue
        # The same name match as diffusers' loader: a keep entry is one component of the dotted name.
        target = torch.float32 if any(k in name.split(".") for k in keep) else dtype
        if tensor.dtype != target:
            tensor.data = tensor.data.to(target)
    return module


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    # TensorBoard hparams take scalars only.
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
    return out


def _resolve_trackers(report_to: list[str]) -> list[str]:
    names: list[str] = []
    for name in report_to:
        if name == "none":
            continue
        if name == "auto":
            names.append("tensorboard")
            try:
                import wandb  # noqa: F401

                names.append("wandb")
            except ImportError:
                pass
        else:
            names.append(name)
    if "wandb" in names:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ImportError("logging.report_to lists 'wandb' but wandb is not installed: pip install wandb") from None
    return list(dict.fromkeys(names))


class MoCLoRATrainer:
    r"""
    Fine-tune a Wan transformer with a PEFT LoRA adapter through Mixture-of-Contexts attention.

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
        self.pipeline = None  # the WanPipeline holding the trained transformer, after `train()`

    # ------------------------------------------------------------------ setup
    def _load_components(self, weight_dtype: torch.dtype) -> dict[str, Any]:
        m = self.config.model
        if m.pretrained == "tiny":
            from ..tiny import tiny_wan_components

            return tiny_wan_components(seed=m.tiny_seed)
        from diffusers import WanPipeline

        pipe = WanPipeline.from_pretrained(
            m.pretrained, revision=m.revision, variant=m.variant, torch_dtype=weight_dtype
        )
        return dict(pipe.components)

    def _latent_grid(self, pipe) -> tuple[int, int]:
        """(latent frames, tokens per latent frame) of a training sample."""
        d = self.config.data
        p_t, p_h, p_w = pipe.transformer.config.patch_size
        s = pipe.vae_scale_factor_spatial
        frames = ((d.num_frames - 1) // pipe.vae_scale_factor_temporal + 1) // p_t
        return frames, (d.height // s // p_h) * (d.width // s // p_w)

    # ------------------------------------------------------------------ train
    def train(self) -> TrainResult:
        """Run (or resume) training; returns a [`TrainResult`]. The trained pipeline stays in `self.pipeline`."""
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration, set_seed
        from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import (
            cast_training_params,
            compute_density_for_timestep_sampling,
            compute_loss_weighting_for_sd3,
        )
        from peft import LoraConfig
        from tqdm.auto import tqdm

        from ..captions import CaptionLayout, caption_layout, encode_caption

        c = self.config
        t = c.training
        os.makedirs(c.output_dir, exist_ok=True)
        trackers = _resolve_trackers(c.logging.report_to)
        accelerator = Accelerator(
            gradient_accumulation_steps=t.gradient_accumulation_steps,
            mixed_precision=t.mixed_precision,
            log_with=trackers or None,
            project_config=ProjectConfiguration(
                project_dir=c.output_dir, logging_dir=os.path.join(c.output_dir, "logs")
            ),
        )
        self.accelerator = accelerator
        weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, torch.float32)
        set_seed(c.seed)

        components = self._load_components(weight_dtype)
        set_seed(c.seed)  # the tiny builder reseeds; LoRA init must depend on `seed` only
        transformer, vae, text_encoder = components["transformer"], components["vae"], components["text_encoder"]
        for module in (transformer, vae, text_encoder):
            module.requires_grad_(False)
        # Wan's VAE is kept in fp32 (as diffusers' Wan pipelines do); the rest runs in the mixed-precision dtype.
        for module, dtype in ((vae, torch.float32), (text_encoder, weight_dtype), (transformer, weight_dtype)):
            module.to(accelerator.device)
            _cast_keeping_fp32_modules(module, dtype)
        vae.eval()
        text_encoder.eval()

        # MoC drop-off / drop-in draw from the global RNG in training: that RNG is saved by accelerate (exact
        # resume) and replayed by torch.utils.checkpoint, so a checkpointed block recomputes the very routing of its
        # forward.
        base_moc = c.moc
        apply_moc(transformer, base_moc)
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
            raise ValueError(f"lora.target_modules {c.lora.target_modules}: {e}") from None
        if weight_dtype != torch.float32:
            cast_training_params(transformer, dtype=torch.float32)
        if t.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()

        pipe = WanPipeline(**components)
        pipe.set_progress_bar_config(disable=True)
        self.pipeline = pipe

        # ---------------------------------------------------------- data
        d = c.data
        dataset = VideoClipDataset(
            d.root, d.num_frames, d.height, d.width, metadata=d.metadata, validate=d.validate_clips and not d.cache
        )
        latents_mean = torch.tensor(vae.config.latents_mean, device=accelerator.device).view(1, -1, 1, 1, 1)
        latents_std = torch.tensor(vae.config.latents_std, device=accelerator.device).view(1, -1, 1, 1, 1)

        @torch.no_grad()
        def encode_videos(video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            dist = vae.encode(video.to(accelerator.device, torch.float32)).latent_dist
            # Normalised as WanPipeline un-normalises before decoding.
            return (dist.mean - latents_mean) / latents_std, dist.std / latents_std

        @torch.no_grad()
        def encode_prompts(prompts: list[str]) -> torch.Tensor:
            embeds, _ = pipe.encode_prompt(
                prompts,
                do_classifier_free_guidance=False,
                max_sequence_length=d.max_sequence_length,
                device=accelerator.device,
                dtype=weight_dtype,
            )
            return embeds

        def text_layout(global_caption: str | None, shot_captions) -> CaptionLayout:
            return caption_layout(global_caption, shot_captions, d.max_sequence_length)

        @torch.no_grad()
        def encode_contexts(layouts: list[CaptionLayout]) -> list[torch.Tensor]:
            """The text context `(tokens, dim)` of each sample, each distinct caption of the batch encoded once."""
            single = [i for i, lay in enumerate(layouts) if lay.caption_spans is None]
            out: list[torch.Tensor | None] = [None] * len(layouts)
            if single:  # one caption: WanPipeline's batched prompt encoding, as for any single-prompt sample
                for i, embeds in zip(single, encode_prompts([layouts[i].segments[0] for i in single])):
                    out[i] = embeds
            captions: dict[str, torch.Tensor] = {}
            for i, lay in enumerate(layouts):
                if out[i] is not None:
                    continue
                for c in lay.segments:
                    if c not in captions:
                        embeds = encode_caption(
                            pipe.tokenizer, pipe.text_encoder, c, d.max_sequence_length, accelerator.device
                        )
                        captions[c] = embeds[0].to(weight_dtype)
                out[i] = torch.cat([captions[c] for c in lay.segments])
            return out

        if d.cache:

            def encode_one(video: torch.Tensor, record) -> dict[str, torch.Tensor]:
                mean, std = encode_videos(video[None])
                (context,) = encode_contexts([text_layout(record.global_caption, record.shot_captions)])
                return {"latent_mean": mean[0], "latent_std": std[0], "prompt_embeds": context}

            # Everything the cached tensors depend on besides the clip: the encoders, their dtype and the text length.
            tag = json.dumps(
                [
                    c.model.pretrained,
                    c.model.revision,
                    c.model.variant,
                    c.model.tiny_seed,
                    str(weight_dtype),
                    d.max_sequence_length,
                ]
            )
            with accelerator.main_process_first():  # rank 0 writes the cache, the others read it
                dataset = CachedLatentDataset(
                    dataset, d.cache_dir or os.path.join(c.output_dir, "cache"), encode_one, tag=tag
                )

        empty_embeds = encode_prompts([""])[0] if t.caption_dropout > 0 else None
        uncond = CaptionLayout(("",), d.max_sequence_length)
        frames, tokens_per_frame = self._latent_grid(pipe)
        vae_frames = (d.num_frames - 1) // pipe.vae_scale_factor_temporal + 1
        records = [r if isinstance(r, dict) else r.__dict__ for r in (dataset.items if d.cache else dataset.records)]
        shot_sets = {r["shot_frames"] for r in records}

        def layout_of(shots: tuple[int, ...] | None) -> ChunkLayout:
            return ChunkLayout.for_video(frames, tokens_per_frame, shots, c.moc.chunk_tokens)

        dense_top_k = max(layout_of(s).num_chunks for s in shot_sets)
        sp = c.sparsity
        start_top_k = dense_top_k if sp.start_top_k == "dense" else sp.start_top_k
        schedule = SparsitySchedule(
            start_top_k=max(start_top_k, c.moc.top_k),
            target_top_k=c.moc.top_k,
            warmup_steps=sp.warmup_steps,
            anneal_steps=sp.anneal_steps,
            shape=sp.shape,
            dense_top_k=dense_top_k,
        )
        if sp.warmup_steps + sp.anneal_steps > t.max_steps:
            logger.warning(
                "the sparsity schedule ends at step %d, after training.max_steps=%d: the model never trains at the "
                "target top_k=%d it is exported with",
                sp.warmup_steps + sp.anneal_steps,
                t.max_steps,
                c.moc.top_k,
            )

        # ---------------------------------------------------------- optimisation
        params = [p for p in transformer.parameters() if p.requires_grad]
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
        noise_scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=t.flow_shift)
        train_timesteps = noise_scheduler.timesteps.to(accelerator.device)
        train_sigmas = noise_scheduler.sigmas.to(accelerator.device)
        state = _TrainState()
        self._register_hooks(accelerator, transformer, weight_dtype)
        accelerator.register_for_checkpointing(state)
        transformer, optimizer, lr_scheduler = accelerator.prepare(transformer, optimizer, lr_scheduler)
        model = accelerator.unwrap_model(transformer)

        resume = self._resume_path()
        if resume is not None:
            logger.info("resuming from %s", resume)
            accelerator.load_state(resume)
        global_step = state.step

        if trackers:
            accelerator.init_trackers(c.logging.project_name, config=_flatten(c.to_dict()))

        sampler = StepBatchSampler(
            len(dataset),
            t.batch_size,
            seed=c.seed,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
            start=global_step * t.gradient_accumulation_steps,
        )
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=collate_samples,
            num_workers=d.num_workers,
            # An own generator keeps DataLoader's per-iterator seed draw off the global RNG (exact resume).
            generator=torch.Generator().manual_seed(c.seed),
        )
        batches = iter(loader)

        def micro_step(batch: dict) -> torch.Tensor:
            layouts = [text_layout(g, s) for g, s in zip(batch["global_caption"], batch["shot_captions"])]
            if d.cache:
                mean = batch["latent_mean"].to(accelerator.device)
                std = batch["latent_std"].to(accelerator.device)
                contexts = [e.to(accelerator.device, weight_dtype) for e in batch["prompt_embeds"]]
            else:
                mean, std = encode_videos(batch["video"])
                contexts = encode_contexts(layouts)
            if empty_embeds is not None:
                # A dropped sample loses all its captions: the empty prompt with stock cross-attention, which is the
                # unconditional input of classifier-free guidance in LongVideoPipeline and WanPipeline.
                drop = (torch.rand(len(contexts)) < t.caption_dropout).tolist()
                contexts = [empty_embeds.to(c.dtype) if dropped else c for dropped, c in zip(drop, contexts)]
                layouts = [uncond if dropped else lay for dropped, lay in zip(drop, layouts)]
            x0 = mean + std * torch.randn_like(mean)  # a sample of the VAE posterior, as latent_dist.sample()
            noise = torch.randn_like(x0)
            bsz = x0.shape[0]
            u = compute_density_for_timestep_sampling(
                weighting_scheme=t.weighting_scheme,
                batch_size=bsz,
                logit_mean=t.logit_mean,
                logit_std=t.logit_std,
                mode_scale=t.mode_scale,
            )
            indices = (u * noise_scheduler.config.num_train_timesteps).long().clamp(max=len(train_timesteps) - 1)
            indices = indices.to(accelerator.device)
            timesteps = train_timesteps[indices]
            sigmas = train_sigmas[indices].view(-1, 1, 1, 1, 1)
            noisy = (1.0 - sigmas) * x0 + sigmas * noise
            target = noise - x0
            weighting = compute_loss_weighting_for_sd3(weighting_scheme=t.weighting_scheme, sigmas=sigmas)

            # One forward per shot and caption structure in the batch (MoC's layout and the caption spans are per
            # call). Backward runs inside the same moc_context: gradient checkpointing recomputes the forward during
            # backward and must see the same shots.
            groups: dict[Any, list[int]] = {}
            for i, (shots, lay) in enumerate(zip(batch["shot_frames"], layouts)):
                key = (shots, lay.caption_spans, lay.global_caption_span, contexts[i].shape[0])
                groups.setdefault(key, []).append(i)
            total = torch.zeros((), device=accelerator.device)
            for g, ((shots, spans, global_span, _), idx) in enumerate(groups.items()):
                sel = torch.tensor(idx, device=accelerator.device)
                captions: dict[str, Any] = {}
                if spans is not None:
                    # Spans belong to shots: a single-shot clip with a global and a shot caption is one shot here.
                    captions = {"caption_spans": spans, "global_caption_span": global_span}
                    shots = shots or (vae_frames,)
                # Under DDP only the last group's backward all-reduces, so ranks with different group counts agree.
                sync = (
                    accelerator.no_sync(transformer)
                    if g < len(groups) - 1 and accelerator.num_processes > 1
                    else contextlib.nullcontext()
                )
                with moc_context(shot_frames=shots, **captions), sync:
                    pred = transformer(
                        hidden_states=noisy[sel].to(weight_dtype),
                        timestep=timesteps[sel],
                        encoder_hidden_states=torch.stack([contexts[i] for i in idx]),
                        return_dict=False,
                    )[0]
                    err = (weighting[sel].float() * (pred.float() - target[sel].float()) ** 2).reshape(len(idx), -1)
                    loss = err.mean(1).sum() / bsz
                    accelerator.backward(loss)
                total = total + loss.detach()
            return total

        result = TrainResult(global_step=global_step)
        progress = tqdm(
            total=t.max_steps,
            initial=global_step,
            desc="train",
            disable=not accelerator.is_local_main_process,
        )
        transformer.train()
        current: MoCConfig | None = None
        last_validated = -1
        while global_step < t.max_steps:
            step_config = schedule.moc_config(base_moc, global_step)
            if step_config != current:
                update_moc_config(model, **step_config.to_dict())
                current = step_config
            step_loss = torch.zeros((), device=accelerator.device)
            shots_seen: list = []
            for _ in range(t.gradient_accumulation_steps):
                batch = next(batches)
                shots_seen.extend(batch["shot_frames"])
                with accelerator.accumulate(transformer):
                    step_loss += micro_step(batch) / t.gradient_accumulation_steps
                    if accelerator.sync_gradients and t.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(params, t.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad()
            if not accelerator.sync_gradients:
                raise RuntimeError("gradient accumulation went out of step with the optimizer (internal error)")
            global_step += 1
            state.step = global_step
            loss_value = accelerator.gather(step_loss[None]).mean().item()
            result.learning_rates.append(lr_scheduler.get_last_lr()[0])
            density = sum(routed_density(layout_of(s), step_config) for s in shots_seen) / len(shots_seen)
            result.losses.append(loss_value)
            result.densities.append(density)
            progress.update(1)
            progress.set_postfix(loss=f"{loss_value:.4f}", density=f"{density:.3f}", top_k=step_config.top_k)
            if global_step % c.logging.log_every == 0 and trackers:
                accelerator.log(
                    {
                        "train/loss": loss_value,
                        "train/density": density,
                        "train/top_k": step_config.top_k,
                        "train/lr": lr_scheduler.get_last_lr()[0],
                    },
                    step=global_step,
                )
            if c.checkpointing.every and global_step % c.checkpointing.every == 0:
                self._save_checkpoint(accelerator, global_step)
            if c.validation.every and global_step % c.validation.every == 0:
                result.validation_videos += self._validate(accelerator, pipe, model, global_step, trackers)
                last_validated = global_step
        progress.close()
        result.global_step = global_step

        # The exported model is the target configuration: drop-off / drop-in off (eval) and moc as configured.
        model.eval()
        update_moc_config(model, **c.moc.to_dict())
        if c.validation.every and last_validated != global_step:
            result.validation_videos += self._validate(accelerator, pipe, model, global_step, trackers)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            final_dir = os.path.join(c.output_dir, "final")
            save_moc_lora(
                model,
                final_dir,
                c.moc,
                base_model=None if c.model.pretrained == "tiny" else c.model.pretrained,
                repo_id=c.hub.repo_id,
                training_info=self._training_info(global_step, dense_top_k),
            )
            result.final_dir = final_dir
            logger.info("saved the MoC LoRA to %s", final_dir)
            if c.hub.push:
                url = push_to_hub(final_dir, c.hub.repo_id, private=c.hub.private)
                logger.info("uploaded to %s", url)
        accelerator.end_training()
        return result

    # ------------------------------------------------------------------ helpers
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

    def _register_hooks(self, accelerator, transformer: torch.nn.Module, weight_dtype: torch.dtype) -> None:
        from diffusers import WanPipeline
        from diffusers.training_utils import cast_training_params
        from diffusers.utils import convert_unet_state_dict_to_peft
        from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

        model_cls = type(transformer)

        # Checkpoints hold only the adapter, in diffusers' LoRA format, not the frozen base weights.
        def save_hook(models, weights, output_dir):
            for m in models:
                m = accelerator.unwrap_model(m)
                if isinstance(m, model_cls) and accelerator.is_main_process:
                    WanPipeline.save_lora_weights(
                        output_dir,
                        transformer_lora_layers=get_peft_model_state_dict(m),
                        transformer_lora_adapter_metadata=m.peft_config["default"].to_dict(),
                    )
            while weights:
                weights.pop()

        def load_hook(models, input_dir):
            while models:
                m = accelerator.unwrap_model(models.pop())
                if not isinstance(m, model_cls):
                    raise ValueError(f"unexpected model {type(m).__name__} in the checkpoint")
                state = WanPipeline.lora_state_dict(input_dir)
                state = {k[len("transformer.") :]: v for k, v in state.items() if k.startswith("transformer.")}
                incompatible = set_peft_model_state_dict(m, convert_unet_state_dict_to_peft(state), "default")
                unexpected = getattr(incompatible, "unexpected_keys", None)
                if unexpected:
                    raise ValueError(f"checkpoint {input_dir} has LoRA weights this model lacks: {unexpected[:5]}")
                if weight_dtype != torch.float32:
                    cast_training_params(m, dtype=torch.float32)

        accelerator.register_save_state_pre_hook(save_hook)
        accelerator.register_load_state_pre_hook(load_hook)

    def _checkpoints(self) -> list[str]:
        out = self.config.output_dir
        if not os.path.isdir(out):
            return []
        names = [
            n for n in os.listdir(out) if n.startswith(_CHECKPOINT_PREFIX) and n[len(_CHECKPOINT_PREFIX) :].isdigit()
        ]
        return [os.path.join(out, n) for n in sorted(names, key=lambda n: int(n[len(_CHECKPOINT_PREFIX) :]))]

    def _resume_path(self) -> str | None:
        resume = self.config.checkpointing.resume_from
        if resume is None:
            return None
        if resume == "latest":
            found = self._checkpoints()
            if not found:
                logger.info(
                    "checkpointing.resume_from=latest: no checkpoint in %s, starting fresh", self.config.output_dir
                )
                return None
            return found[-1]
        if not os.path.isdir(resume):
            raise FileNotFoundError(f"checkpointing.resume_from: checkpoint folder {resume!r} does not exist")
        return resume

    def _save_checkpoint(self, accelerator, global_step: int) -> None:
        limit = self.config.checkpointing.total_limit
        if accelerator.is_main_process and limit is not None:
            existing = self._checkpoints()
            for old in existing[: max(0, len(existing) - limit + 1)]:
                shutil.rmtree(old)
        path = os.path.join(self.config.output_dir, f"{_CHECKPOINT_PREFIX}{global_step}")
        accelerator.save_state(path)
        if accelerator.is_main_process:
            logger.info("saved checkpoint %s", path)

    def _validate(self, accelerator, pipe, model: torch.nn.Module, step: int, trackers: list[str]) -> list[str]:
        """Generate the validation videos with the target MoC settings; write mp4s and log them. No global RNG use."""
        import imageio.v3 as iio
        import numpy as np

        v = self.config.validation
        if not accelerator.is_main_process:
            return []
        was_training = model.training
        before = get_moc_config(model)
        model.eval()
        update_moc_config(model, **self.config.moc.to_dict())
        out_dir = os.path.join(self.config.output_dir, "validation")
        os.makedirs(out_dir, exist_ok=True)
        paths, videos = [], []
        autocast = (
            torch.autocast(accelerator.device.type, dtype=torch.bfloat16)
            if accelerator.mixed_precision == "bf16"
            else contextlib.nullcontext()
        )
        try:
            with torch.no_grad(), autocast, moc_context(shot_frames=v.shot_frames):
                for i, prompt in enumerate(v.prompts):
                    generator = torch.Generator(device=accelerator.device).manual_seed(v.seed + i)
                    frames = pipe(
                        prompt=prompt,
                        height=v.height,
                        width=v.width,
                        num_frames=v.num_frames,
                        num_inference_steps=v.num_inference_steps,
                        guidance_scale=v.guidance_scale,
                        generator=generator,
                        output_type="np",
                        max_sequence_length=self.config.data.max_sequence_length,
                    ).frames[0]
                    video = (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)
                    path = os.path.join(out_dir, f"step-{step:06d}-{i}.mp4")
                    iio.imwrite(path, video, plugin="pyav", fps=v.fps, codec="libx264")
                    paths.append(path)
                    videos.append(video)
        finally:
            update_moc_config(model, **before.to_dict())
            model.train(was_training)
        for name in trackers:
            tracker = accelerator.get_tracker(name, unwrap=True)
            if name == "tensorboard":
                for i, video in enumerate(videos):
                    keep = np.linspace(0, len(video) - 1, num=min(8, len(video))).round().astype(int)
                    tracker.add_images(f"validation/{i}", video[keep], step, dataformats="NHWC")
            elif name == "wandb":
                import wandb

                tracker.log(
                    {"validation": [wandb.Video(p, caption=pr, format="mp4") for p, pr in zip(paths, v.prompts)]},
                    step=step,
                )
        logger.info("validation videos at step %d: %s", step, paths)
        return paths


def train(config: TrainConfig) -> TrainResult:
    """Shorthand for `MoCLoRATrainer(config).train()`."""
    return MoCLoRATrainer(config).train()
