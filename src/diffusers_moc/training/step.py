"""One micro-batch of flow-matching training through MoC attention: noise, forward per shot structure, backward.

The loss is diffusers' flow-matching loss (SD3 / Flux LoRA scripts): `x_t = (1 - sigma) x_0 + sigma * noise`, target
`noise - x_0`, timesteps drawn by `compute_density_for_timestep_sampling` and weighted by
`compute_loss_weighting_for_sd3`. Everything random comes from the global torch RNG, which checkpoints save (exact
resume). A Wan 2.2 A14B expert draws its timesteps from its own range (`experts.timestep_ranges`); TI2V-5B
(`expand_timesteps`) gets the timestep per token, as `WanPipeline` passes it. The transformer's inputs and MoC context
come from the encoder (`SampleEncoder.model_inputs`): Wan's cross-attention context, or HunyuanVideo 1.5's text and
condition inputs (`encoding_hunyuan_video15`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from ..core.context import moc_context
from ..shot_plan import ShotPlan
from .config import OptimConfig
from .encoding import SampleEncoder

__all__ = ["FlowMatchingStep", "Noised"]


@dataclass(frozen=True)
class Noised:
    r"""
    A micro-batch noised for flow matching.

    Attributes:
        x0 (`torch.Tensor`): the clean latents, a sample of the VAE posterior.
        noisy (`torch.Tensor`): `(1 - sigma) * x0 + sigma * noise`, the transformer's input.
        timesteps (`torch.Tensor`): `(B,)` the timestep of each sample.
        target (`torch.Tensor`): `noise - x0`, the flow the transformer predicts.
        weighting (`torch.Tensor`): the loss weight of each sample.
    """

    x0: torch.Tensor
    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    weighting: torch.Tensor


class FlowMatchingStep:
    r"""
    Runs forward and backward of one micro-batch and returns its (detached) loss.

    Args:
        accelerator (`accelerate.Accelerator`): runs the backward (and `no_sync` under DDP).
        encoder ([`SampleEncoder`]): the frozen encoders.
        config (`OptimConfig`): `training` settings (weighting, caption dropout, flow shift).
        cached (`bool`): batches hold cached latents and text contexts instead of pixels and captions.
        patch (`tuple[int, int, int]`, *optional*): the transformer's patch size; given, timesteps are passed per
            token (`expand_timesteps`, Wan 2.2 TI2V-5B).
        grad_scale (`int`, defaults to 1): the loss is multiplied by this for the backward only: the context-parallel
            degree, so that DDP's average over all ranks is the average of whole-sample gradients (see
            `training.parallel`).
    """

    def __init__(
        self,
        accelerator,
        encoder: SampleEncoder,
        config: OptimConfig,
        cached: bool,
        patch: tuple[int, int, int] | None = None,
        grad_scale: int = 1,
    ):
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.accelerator, self.encoder, self.config = accelerator, encoder, config
        self.cached, self.patch, self.grad_scale = cached, patch, grad_scale
        device = accelerator.device
        self.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=config.flow_shift)
        self.timesteps = self.scheduler.timesteps.to(device)
        self.sigmas = self.scheduler.sigmas.to(device)
        # A dropped sample loses all its captions: the unconditional input of classifier-free guidance.
        self.empty = encoder.empty_condition() if config.caption_dropout > 0 else None

    def __call__(
        self, batch: dict[str, Any], transformer: torch.nn.Module, timestep_range: tuple[int, int] | None = None
    ) -> torch.Tensor:
        r"""
        Args:
            batch (`dict`): a collated micro-batch.
            transformer (`torch.nn.Module`): the prepared (possibly DDP-wrapped) transformer to train.
            timestep_range (`tuple[int, int]`, *optional*): the timestep indices it trains on (default: all).
        """
        encoded = self.encoder.batch(batch, self.cached)
        contexts, plans = encoded.contexts, encoded.plans
        if self.empty is not None:
            drop = (torch.rand(len(contexts)) < self.config.caption_dropout).tolist()
            dropped = [self.encoder.drop(p, c, self.empty) if d else (p, c) for d, p, c in zip(drop, plans, contexts)]
            plans, contexts = [p for p, _ in dropped], [c for _, c in dropped]
        lo, hi = timestep_range or (0, len(self.timesteps))
        noised = self._noisy_inputs(encoded.latent_mean, encoded.latent_std, lo, hi)
        first = None
        if self.patch is not None and self.config.first_frame_condition > 0:
            # Image-to-video samples (TI2V): the first latent frame stays clean, as a start image conditions it.
            first = torch.rand(len(contexts)) < self.config.first_frame_condition
            noised.noisy[first.to(noised.noisy.device), :, :1] = noised.x0[first.to(noised.noisy.device), :, :1]
        return self._forward_backward(transformer, plans, contexts, noised, first)

    def _noisy_inputs(self, mean: torch.Tensor, std: torch.Tensor, lo: int, hi: int) -> Noised:
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
        # The density over [0, 1) mapped onto this expert's indices (all of them for one transformer).
        indices = lo + (u * (hi - lo)).long().clamp(max=hi - lo - 1)
        indices = indices.to(self.accelerator.device)
        sigmas = self.sigmas[indices].view(-1, 1, 1, 1, 1)
        noisy = (1.0 - sigmas) * x0 + sigmas * noise
        weighting = compute_loss_weighting_for_sd3(weighting_scheme=t.weighting_scheme, sigmas=sigmas)
        return Noised(x0=x0, noisy=noisy, timesteps=self.timesteps[indices], target=noise - x0, weighting=weighting)

    @staticmethod
    def _loss(err: torch.Tensor, first: torch.Tensor | None) -> torch.Tensor:
        """Sum over samples of each sample's mean error; a clean first frame (`first`) is not part of the loss."""
        if first is None:
            return err.reshape(err.shape[0], -1).mean(1).sum()
        mask = torch.ones(err.shape[0], 1, err.shape[2], 1, 1, device=err.device)
        mask[first.to(err.device), :, 0] = 0
        mask = mask.expand_as(err)
        return ((err * mask).reshape(err.shape[0], -1).sum(1) / mask.reshape(err.shape[0], -1).sum(1)).sum()

    def _timestep(self, timesteps: torch.Tensor, noisy: torch.Tensor, first: torch.Tensor | None = None):
        r"""
        `(B,)`, or per token `(B, tokens)` for a model with `expand_timesteps` (as WanPipeline passes them), with 0 on
        the first frame's tokens of the samples in `first` (as `WanImageToVideoPipeline` gives a start image).
        """
        if self.patch is None:
            return timesteps
        p_t, p_h, p_w = self.patch
        frames, height, width = noisy.shape[2:]
        per_frame = (height // p_h) * (width // p_w)
        out = timesteps[:, None].expand(-1, (frames // p_t) * per_frame)
        if first is not None and bool(first.any()):
            out = out.clone()
            out[first.to(out.device), :per_frame] = 0
        return out

    def _forward_backward(
        self,
        transformer,
        plans: list[ShotPlan],
        contexts: list[torch.Tensor],
        noised: Noised,
        first: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # One forward per shot and caption structure in the batch (MoC's layout and the caption spans are per call).
        # Backward runs inside the same moc_context: gradient checkpointing recomputes the forward during backward
        # and must see the same shots.
        accelerator, bsz = self.accelerator, noised.noisy.shape[0]
        groups: dict[Any, list[int]] = {}
        for i, plan in enumerate(plans):
            groups.setdefault(self.encoder.group_key(plan, contexts[i]), []).append(i)
        total = torch.zeros((), device=accelerator.device)
        for g, idx in enumerate(groups.values()):
            sel = torch.tensor(idx, device=accelerator.device)
            # Under DDP only the last group's backward all-reduces, so ranks with different group counts agree.
            sync = (
                accelerator.no_sync(transformer)
                if g < len(groups) - 1 and accelerator.num_processes > 1
                else contextlib.nullcontext()
            )
            timestep = self._timestep(noised.timesteps[sel], noised.noisy, None if first is None else first[idx])
            inputs, context = self.encoder.model_inputs(
                noised.noisy[sel], timestep, [plans[i] for i in idx], [contexts[i] for i in idx]
            )
            with moc_context(**context), sync:
                pred = transformer(**inputs, return_dict=False)[0]
                err = noised.weighting[sel].float() * (pred.float() - noised.target[sel].float()) ** 2
                loss = self._loss(err, None if first is None else first[idx]) / bsz
                accelerator.backward(loss * self.grad_scale if self.grad_scale != 1 else loss)
            total = total + loss.detach()
        return total
