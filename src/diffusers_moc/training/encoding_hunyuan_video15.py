"""The frozen encoders of HunyuanVideo 1.5 training, and the transformer inputs of a training step.

A sample is conditioned exactly as `HunyuanVideo15LongVideoPipeline` conditions the same shots
(`diffusers_moc.hunyuan_video15_text`, which both use): each caption's Qwen and ByT5 encodings alone, the caption
chunks in [`moc_context`] (`caption_shots` / `caption_tokens`), and the text-to-video condition latents, mask and
image tokens (zeros) of diffusers' `HunyuanVideo15Pipeline`. A dropped caption is the empty prompt, diffusers' padded
text with the shots only (the pipeline's unconditional pass).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from ..hunyuan_video15_text import (
    HunyuanVideo15CaptionEncoder,
    HunyuanVideo15Text,
    caption_context,
    caption_segments,
    cat_texts,
    t2v_condition,
    transformer_inputs,
)
from ..shot_plan import ShotPlan
from .encoding import EncodedBatch, SampleEncoder

__all__ = ["HunyuanVideo15SampleEncoder"]

_TEXT_KEYS = ("prompt_embeds", "prompt_embeds_mask", "prompt_embeds_2", "prompt_embeds_mask_2")


class HunyuanVideo15SampleEncoder(SampleEncoder):
    r"""
    Encodes training samples with a HunyuanVideo 1.5 pipeline's frozen VAE and text encoders (no gradients).

    Args:
        pipe (`HunyuanVideo15Pipeline`): the pipeline holding the VAE, the text encoders and the transformer.
        device (`torch.device`): where encoding runs.
        weight_dtype (`torch.dtype`): dtype of the text inputs.
        max_sequence_length (`int`): Qwen caption tokens per caption.
    """

    #: A cache file holds the latents, the four text inputs and each caption segment's token counts.
    cache_keys = frozenset({"latent_mean", "latent_std", "caption_tokens", *_TEXT_KEYS})

    def __init__(self, pipe, device: torch.device, weight_dtype: torch.dtype, max_sequence_length: int):
        self.pipe, self.device, self.weight_dtype = pipe, device, weight_dtype
        self.max_sequence_length = max_sequence_length
        self.captions = HunyuanVideo15CaptionEncoder.from_pipeline(pipe, max_sequence_length)
        # diffusers' HunyuanVideo 1.5 pipelines scale latents by the VAE's `scaling_factor` (no mean / std).
        self.scaling_factor = pipe.vae.config.scaling_factor

    @torch.no_grad()
    def videos(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(B, 3, F, H, W)` pixels in [-1, 1] -> posterior `(mean, std)`, scaled as the pipelines un-scale them."""
        # One clip per call: the VAE's causal attention mask does not broadcast over a batch (diffusers 0.42).
        dists = [self.pipe.vae.encode(v[None].to(self.device, torch.float32)).latent_dist for v in video]
        mean = torch.cat([d.mean for d in dists]) * self.scaling_factor
        return mean, torch.cat([d.std for d in dists]) * self.scaling_factor

    @torch.no_grad()
    def text(self, plan: ShotPlan, global_caption: str | None, shot_captions) -> HunyuanVideo15Text:
        """A sample's text inputs, as the pipeline builds them for the same shots (batch of one)."""
        return self.captions.shot_text(plan, global_caption, shot_captions, self.device, self.weight_dtype)

    def encode_one(self, video: torch.Tensor, record) -> dict[str, torch.Tensor]:
        """One clip for the latent cache: unbatched latent distribution, text inputs and caption token counts."""
        mean, std = self.videos(video[None])
        plan = self.plan(record.shot_pixel_frames, record.global_caption, record.shot_captions)
        text = self.text(plan, record.global_caption, record.shot_captions)
        tokens = text.context.get("caption_tokens") or ((int(text.mask.sum()),), (int(text.mask_2.sum()),))
        tensors = dict(zip(_TEXT_KEYS, (text.embeds[0], text.mask[0], text.embeds_2[0], text.mask_2[0])))
        return {"latent_mean": mean[0], "latent_std": std[0], "caption_tokens": torch.tensor(tokens), **tensors}

    def _cached_text(self, batch: dict[str, Any], i: int, plan: ShotPlan) -> HunyuanVideo15Text:
        tensors = [batch[k][i][None].to(self.device, self.weight_dtype) for k in _TEXT_KEYS]
        if plan.captions.caption_spans is None:  # diffusers' text path: the shots only
            return HunyuanVideo15Text(*tensors, context=plan.shot_context)
        segments = caption_segments(batch["global_caption"][i], batch["shot_captions"][i])
        context = caption_context(plan, [shot for shot, _ in segments], batch["caption_tokens"][i])
        return HunyuanVideo15Text(*tensors, context=context)

    def batch(self, batch: dict[str, Any], cached: bool) -> EncodedBatch:
        """The latent distributions, text inputs ([`HunyuanVideo15Text`], one per sample) and shot plans."""
        captions = list(zip(batch["global_caption"], batch["shot_captions"]))
        plans = [self.plan(p, g, s) for p, (g, s) in zip(batch["shot_pixel_frames"], captions)]
        if cached:
            mean = batch["latent_mean"].to(self.device)
            std = batch["latent_std"].to(self.device)
            texts = [self._cached_text(batch, i, plan) for i, plan in enumerate(plans)]
        else:
            mean, std = self.videos(batch["video"])
            texts = [self.text(plan, g, s) for plan, (g, s) in zip(plans, captions)]
        return EncodedBatch(mean, std, texts, plans)

    # What `FlowMatchingStep` asks of the model's inputs.
    @torch.no_grad()
    def empty_condition(self) -> HunyuanVideo15Text:
        """The text inputs of a dropped caption: the empty prompt, as the pipeline's unconditional pass encodes it."""
        return self.captions.encode("", self.device, self.weight_dtype)

    def drop(self, plan: ShotPlan, text: HunyuanVideo15Text, empty: HunyuanVideo15Text):
        """A sample whose captions are dropped: the empty prompt for every shot (the shots kept for MoC)."""
        return plan, replace(empty, context=plan.shot_context)

    def group_key(self, plan: ShotPlan, text: HunyuanVideo15Text) -> tuple:
        return text.key

    def model_inputs(
        self, noisy: torch.Tensor, timestep: torch.Tensor, plans: list[ShotPlan], texts: list[HunyuanVideo15Text]
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The inputs `HunyuanVideo15Pipeline` gives the transformer for text-to-video, and the MoC context."""
        latents = noisy.to(self.weight_dtype)
        image_dim = self.pipe.transformer.config.image_embed_dim
        concat, image_embeds = t2v_condition(latents, image_dim, self.weight_dtype, latents.device)
        text = cat_texts(texts)
        return transformer_inputs(latents, concat, image_embeds, timestep, text), dict(text.context)
