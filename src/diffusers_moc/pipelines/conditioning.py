"""Image start of a long video: the first shot conditioned on an image as diffusers' Wan pipelines condition theirs.

- Wan 2.1 I2V and Wan 2.2 I2V-A14B (`WanImageToVideoPipeline` without `expand_timesteps`): the transformer input is
  the noise concatenated with a 4-channel first-frame mask and the VAE latents of `[image, 0, 0, ...]`; Wan 2.1 also
  attends the image's CLIP embedding in cross-attention. Later shots get what the same models get for frames without
  a given image: a zero mask and the latents of a blank (zero) clip of their own length. Every shot attends the CLIP
  tokens (the I2V model always has them; they stand for the video's look, as the global caption does).
- Wan 2.2 TI2V-5B (`expand_timesteps=True`): the image's latent replaces the first latent frame, whose tokens get
  timestep 0 (clean); without an image every token gets the step's timestep, as `WanPipeline` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers.utils.torch_utils import get_module_execution_device

__all__ = ["ImageCondition", "prepare_image_condition"]


@dataclass
class ImageCondition:
    r"""
    What a denoising step adds to the latents.

    Attributes:
        concat (`torch.Tensor`, *optional*): `(B, 4 + z_dim, F, h, w)` mask and condition latents concatenated to the
            latents in channels (I2V families).
        image_embeds (`torch.Tensor`, *optional*): `(B, n, dim)` CLIP image tokens (Wan 2.1 I2V).
        first_frame_mask (`torch.Tensor`, *optional*): `(1, 1, F, h, w)`, 0 where the image latent replaces the
            latents (TI2V); also scales the per-token timesteps.
        first_frame (`torch.Tensor`, *optional*): `(B, z_dim, 1, h, w)` image latent (TI2V with an image).
    """

    concat: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    first_frame_mask: torch.Tensor | None = None
    first_frame: torch.Tensor | None = None

    def model_input(self, latents: torch.Tensor) -> torch.Tensor:
        """The transformer's `hidden_states` for `latents` (float32)."""
        if self.concat is not None:
            return torch.cat([latents, self.concat], dim=1)
        return self.replace_first_frame(latents)

    def replace_first_frame(self, latents: torch.Tensor) -> torch.Tensor:
        if self.first_frame is None:
            return latents
        mask = self.first_frame_mask
        return (1 - mask) * self.first_frame + mask * latents

    def timestep(self, t: torch.Tensor, batch: int, patch: Sequence[int]) -> torch.Tensor:
        """`(B,)`, or `(B, tokens)` per-token timesteps when the model expands them (TI2V)."""
        if self.first_frame_mask is None:
            return t.expand(batch)
        p_t, p_h, p_w = patch
        per_token = (self.first_frame_mask[0][0][::p_t, ::p_h, ::p_w] * t).flatten()
        return per_token.unsqueeze(0).expand(batch, -1)


def _normalised_latents(vae, pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """VAE latents (the posterior mode) of `(B, 3, F, H, W)` pixels in [-1, 1], normalised as Wan's pipelines do."""
    pixels = pixels.to(device=get_module_execution_device(vae), dtype=vae.dtype)
    # The posterior's mode, as diffusers' `retrieve_latents(..., sample_mode="argmax")` takes it.
    latents = vae.encode(pixels).latent_dist.mode().to(device=device, dtype=torch.float32)
    mean = torch.tensor(vae.config.latents_mean).view(1, vae.config.z_dim, 1, 1, 1).to(latents)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, vae.config.z_dim, 1, 1, 1).to(latents)
    return (latents - mean) * inv_std


def _shot_concat(vae, image: torch.Tensor | None, frames: int, height: int, width: int, temporal: int, device):
    """`(1, 4 + z_dim, latent frames, h, w)` of one shot: `WanImageToVideoPipeline.prepare_latents`' condition for a
    shot starting at `image` (`(1, 3, H, W)`), or for a shot without an image (zero mask, a blank clip)."""
    pixels = torch.zeros(1, 3, frames, height, width, device=device, dtype=torch.float32)
    if image is not None:
        pixels = torch.cat([image.unsqueeze(2), pixels[:, :, 1:]], dim=2)
    latents = _normalised_latents(vae, pixels, device)
    h, w = latents.shape[-2:]
    mask = torch.zeros(1, 1, frames, h, w)
    if image is not None:
        mask[:, :, 0] = 1
    # The first pixel frame stands for a whole latent frame: repeated `temporal` times, then grouped in fours.
    mask = torch.cat([torch.repeat_interleave(mask[:, :, :1], temporal, dim=2), mask[:, :, 1:]], dim=2)
    mask = mask.view(1, -1, temporal, h, w).transpose(1, 2).to(latents.device)
    return torch.cat([mask, latents], dim=1)


def prepare_image_condition(
    pipe,
    image,
    pixel_frames: Sequence[int],
    latent_frames: Sequence[int],
    batch_size: int,
    height: int,
    width: int,
    device: torch.device,
) -> ImageCondition:
    r"""
    The image conditioning of a long video for `pipe`'s model family; `image` (PIL image, array or tensor, or
    `None`) starts the first shot.

    Args:
        pixel_frames, latent_frames (`Sequence[int]`): per shot.
    """
    family = pipe.family
    if not family.takes_image:
        return ImageCondition()
    pixels = None
    if image is not None:
        pixels = pipe.video_processor.preprocess(image, height=height, width=width).to(device, dtype=torch.float32)
    if family.expand_timesteps:
        latent_h, latent_w = height // pipe.vae_scale_factor_spatial, width // pipe.vae_scale_factor_spatial
        mask = torch.ones(1, 1, sum(latent_frames), latent_h, latent_w, dtype=torch.float32, device=device)
        if pixels is None:
            return ImageCondition(first_frame_mask=mask)
        mask[:, :, 0] = 0
        first = _normalised_latents(pipe.vae, pixels.unsqueeze(2), device).repeat(batch_size, 1, 1, 1, 1)
        return ImageCondition(first_frame_mask=mask, first_frame=first)
    temporal = pipe.vae_scale_factor_temporal
    blanks: dict[int, torch.Tensor] = {}  # shots without an image share the condition of a blank clip per length
    parts = []
    for i, frames in enumerate(pixel_frames):
        if i == 0:
            parts.append(_shot_concat(pipe.vae, pixels, frames, height, width, temporal, device))
        else:
            if frames not in blanks:
                blanks[frames] = _shot_concat(pipe.vae, None, frames, height, width, temporal, device)
            parts.append(blanks[frames])
    concat = torch.cat(parts, dim=2).repeat(batch_size, 1, 1, 1, 1)
    embeds = None
    if family.image_encoder:
        embeds = pipe.encode_image(image, device).repeat(batch_size, 1, 1)
    return ImageCondition(concat=concat, image_embeds=embeds)
