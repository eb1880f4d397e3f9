"""One micro-batch of flow-matching training through MoC attention: noise, forward per shot structure, backward.

The loss is diffusers' flow-matching loss (SD3 / Flux LoRA scripts): `x_t = (1 - sigma) x_0 + sigma * noise`, target
`noise - x_0`, timesteps drawn by `compute_density_for_timestep_sampling` and weighted by
`compute_loss_weighting_for_sd3`. Everything random comes from the global torch RNG, which checkpoints save (exact
resume). A Wan 2.2 A14B expert draws its timesteps from its own range (`experts.timestep_ranges`); TI2V-5B
(`expand_timesteps`) gets the timestep per token, as `WanPipeline` passes it.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from ..captions import CaptionLayout
from ..core.context import moc_context
from .config import OptimConfig
from .encoding import SampleEncoder

__all__ = ["FlowMatchingStep"]


class FlowMatchingStep:
    r"""
    Runs forward and backward of one micro-batch and returns its (detached) loss.

    Args:
        accelerator (`accelerate.Accelerator`): runs the backward (and `no_sync` under DDP).
        encoder ([`SampleEncoder`]): the frozen encoders.
        config (`OptimConfig`): `training` settings (weighting, caption dropout, flow shift).
        cached (`bool`): batches hold cached latents and text contexts instead of pixels and captions.
        vae_frames (`int`): latent frames of a sample (a single-shot sample with caption spans is one shot of them).
        patch (`tuple[int, int, int]`, *optional*): the transformer's patch size; given, timesteps are passed per
            token (`expand_timesteps`, Wan 2.2 TI2V-5B).
    """

    def __init__(
        self,
        accelerator,
        encoder: SampleEncoder,
        config: OptimConfig,
        cached: bool,
        vae_frames: int,
        patch: tuple[int, int, int] | None = None,
    ):
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.accelerator, self.encoder, self.config = accelerator, encoder, config
        self.cached, self.vae_frames, self.patch = cached, vae_frames, patch
        device = accelerator.device
        self.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=config.flow_shift)
        self.timesteps = self.scheduler.timesteps.to(device)
        self.sigmas = self.scheduler.sigmas.to(device)
        # A dropped sample loses all its captions: the empty prompt with stock cross-attention, which is the
        # unconditional input of classifier-free guidance in LongVideoPipeline and WanPipeline.
        self.empty_embeds = encoder.prompts([""])[0] if config.caption_dropout > 0 else None
        self.uncond = CaptionLayout(("",), encoder.max_sequence_length)

    def __call__(
        self, batch: dict[str, Any], transformer: torch.nn.Module, timestep_range: tuple[int, int] | None = None
    ) -> torch.Tensor:
        r"""
        Args:
            batch (`dict`): a collated micro-batch.
            transformer (`torch.nn.Module`): the prepared (possibly DDP-wrapped) transformer to train.
            timestep_range (`tuple[int, int]`, *optional*): the timestep indices it trains on (default: all).
        """
        mean, std, contexts, layouts = self.encoder.batch(batch, self.cached)
        if self.empty_embeds is not None:
            drop = (torch.rand(len(contexts)) < self.config.caption_dropout).tolist()
            contexts = [self.empty_embeds.to(c.dtype) if d else c for d, c in zip(drop, contexts)]
            layouts = [self.uncond if d else lay for d, lay in zip(drop, layouts)]
        lo, hi = timestep_range or (0, len(self.timesteps))
        noisy, timesteps, target, weighting, x0 = self._noisy_inputs(mean, std, lo, hi)
        first = None
        if self.patch is not None and self.config.first_frame_condition > 0:
            # Image-to-video samples (TI2V): the first latent frame stays clean, as a start image conditions it.
            first = torch.rand(len(contexts)) < self.config.first_frame_condition
            noisy[first.to(noisy.device), :, :1] = x0[first.to(noisy.device), :, :1]
        return self._forward_backward(
            transformer, batch["shot_frames"], layouts, contexts, noisy, timesteps, target, weighting, first
        )

    def _noisy_inputs(self, mean: torch.Tensor, std: torch.Tensor, lo: int, hi: int):
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
        return noisy, self.timesteps[indices], noise - x0, weighting, x0

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
        self, transformer, shot_frames, layouts, contexts, noisy, timesteps, target, weighting, first=None
    ) -> torch.Tensor:
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
                accelerator.no_sync(transformer)
                if g < len(groups) - 1 and accelerator.num_processes > 1
                else contextlib.nullcontext()
            )
            with moc_context(shot_frames=shots, **captions), sync:
                pred = transformer(
                    hidden_states=noisy[sel].to(weight_dtype),
                    timestep=self._timestep(timesteps[sel], noisy, None if first is None else first[idx]),
                    encoder_hidden_states=torch.stack([contexts[i] for i in idx]),
                    return_dict=False,
                )[0]
                err = weighting[sel].float() * (pred.float() - target[sel].float()) ** 2
                loss = self._loss(err, None if first is None else first[idx]) / bsz
                accelerator.backward(loss)
            total = total + loss.detach()
        return total
