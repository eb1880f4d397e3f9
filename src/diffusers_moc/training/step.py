"""One micro-batch of flow-matching training through MoC attention: noise, forward per shot structure, backward.

The loss is diffusers' flow-matching loss (SD3 / Flux LoRA scripts): `x_t = (1 - sigma) x_0 + sigma * noise`, target
`noise - x_0`, timesteps drawn by `compute_density_for_timestep_sampling` and weighted by
`compute_loss_weighting_for_sd3`. Everything random comes from the global torch RNG, which checkpoints save (exact
resume).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from ..captions import CaptionLayout
from ..context import moc_context
from .config import OptimConfig
from .encoding import SampleEncoder

__all__ = ["FlowMatchingStep"]


class FlowMatchingStep:
    r"""
    Runs forward and backward of one micro-batch and returns its (detached) loss.

    Args:
        accelerator (`accelerate.Accelerator`): runs the backward (and `no_sync` under DDP).
        transformer (`torch.nn.Module`): the prepared (possibly DDP-wrapped) transformer.
        encoder ([`SampleEncoder`]): the frozen encoders.
        config (`OptimConfig`): `training` settings (weighting, caption dropout, flow shift).
        cached (`bool`): batches hold cached latents and text contexts instead of pixels and captions.
        vae_frames (`int`): latent frames of a sample (a single-shot sample with caption spans is one shot of them).
    """

    def __init__(
        self,
        accelerator,
        transformer: torch.nn.Module,
        encoder: SampleEncoder,
        config: OptimConfig,
        cached: bool,
        vae_frames: int,
    ):
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.accelerator, self.transformer, self.encoder, self.config = accelerator, transformer, encoder, config
        self.cached, self.vae_frames = cached, vae_frames
        device = accelerator.device
        self.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=config.flow_shift)
        self.timesteps = self.scheduler.timesteps.to(device)
        self.sigmas = self.scheduler.sigmas.to(device)
        # A dropped sample loses all its captions: the empty prompt with stock cross-attention, which is the
        # unconditional input of classifier-free guidance in LongVideoPipeline and WanPipeline.
        self.empty_embeds = encoder.prompts([""])[0] if config.caption_dropout > 0 else None
        self.uncond = CaptionLayout(("",), encoder.max_sequence_length)

    def __call__(self, batch: dict[str, Any]) -> torch.Tensor:
        mean, std, contexts, layouts = self.encoder.batch(batch, self.cached)
        if self.empty_embeds is not None:
            drop = (torch.rand(len(contexts)) < self.config.caption_dropout).tolist()
            contexts = [self.empty_embeds.to(c.dtype) if d else c for d, c in zip(drop, contexts)]
            layouts = [self.uncond if d else lay for d, lay in zip(drop, layouts)]
        noisy, timesteps, target, weighting = self._noisy_inputs(mean, std)
        return self._forward_backward(batch["shot_frames"], layouts, contexts, noisy, timesteps, target, weighting)

    def _noisy_inputs(self, mean: torch.Tensor, std: torch.Tensor):
        from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

        t = self.config
        x0 = mean + std * torch.randn_like(mean)  # a sample of the VAE posterior, as latent_dist.sample()
        noise = torch.randn_like(x0)
        u = compute_density_for_timestep_sampling(
            weighting_scheme=t.weighting_scheme,
            batch_size=x0.shape[0],
            logit_mean=t.logit_mean,
            logit_std=t.logit_std,
            mode_scale=t.mode_scale,
        )
        indices = (u * self.scheduler.config.num_train_timesteps).long().clamp(max=len(self.timesteps) - 1)
        indices = indices.to(self.accelerator.device)
        sigmas = self.sigmas[indices].view(-1, 1, 1, 1, 1)
        noisy = (1.0 - sigmas) * x0 + sigmas * noise
        weighting = compute_loss_weighting_for_sd3(weighting_scheme=t.weighting_scheme, sigmas=sigmas)
        return noisy, self.timesteps[indices], noise - x0, weighting

    def _forward_backward(self, shot_frames, layouts, contexts, noisy, timesteps, target, weighting) -> torch.Tensor:
        # One forward per shot and caption structure in the batch (MoC's layout and the caption spans are per call).
        # Backward runs inside the same moc_context: gradient checkpointing recomputes the forward during backward
        # and must see the same shots.
        accelerator, bsz = self.accelerator, noisy.shape[0]
        weight_dtype = self.encoder.weight_dtype
        groups: dict[Any, list[int]] = {}
        for i, (shots, lay) in enumerate(zip(shot_frames, layouts)):
            key = (shots, lay.caption_spans, lay.global_caption_span, contexts[i].shape[0])
            groups.setdefault(key, []).append(i)
        total = torch.zeros((), device=accelerator.device)
        for g, ((shots, spans, global_span, _), idx) in enumerate(groups.items()):
            sel = torch.tensor(idx, device=accelerator.device)
            captions: dict[str, Any] = {}
            if spans is not None:
                # Spans belong to shots: a single-shot clip with a global and a shot caption is one shot here.
                captions = {"caption_spans": spans, "global_caption_span": global_span}
                shots = shots or (self.vae_frames,)
            # Under DDP only the last group's backward all-reduces, so ranks with different group counts agree.
            sync = (
                accelerator.no_sync(self.transformer)
                if g < len(groups) - 1 and accelerator.num_processes > 1
                else contextlib.nullcontext()
            )
            with moc_context(shot_frames=shots, **captions), sync:
                pred = self.transformer(
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
