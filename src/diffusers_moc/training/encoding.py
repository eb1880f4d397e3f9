"""The frozen encoders of training: clips to normalised VAE latent distributions, captions to text contexts.

A multi-shot sample's text context is built as `LongVideoPipeline` builds it (`diffusers_moc.captions`): the global
caption and each distinct shot caption encoded separately and concatenated; a single-caption sample is one prompt
encoded as `WanPipeline.encode_prompt` encodes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..captions import CaptionLayout, caption_layout, encode_caption
from ..shot_plan import ShotPlan, plan_shots

__all__ = ["EncodedBatch", "SampleEncoder"]


@dataclass(frozen=True)
class EncodedBatch:
    r"""
    A collated batch, encoded.

    Attributes:
        latent_mean, latent_std (`torch.Tensor`): `(B, C, F, h, w)` normalised VAE posterior of each sample.
        contexts (`list`): the text context of each sample: `(tokens, dim)` on Wan, a `HunyuanVideo15Text` (batch
            of one) on HunyuanVideo 1.5.
        plans (`list[ShotPlan]`): the shot plan of each sample (its shots and caption spans).
    """

    latent_mean: torch.Tensor
    latent_std: torch.Tensor
    contexts: list[torch.Tensor]
    plans: list[ShotPlan]


class SampleEncoder:
    r"""
    Encodes training samples with the pipeline's frozen VAE and text encoder (no gradients).

    Args:
        pipe (`WanPipeline`): the pipeline holding the VAE, tokenizer and text encoder.
        device (`torch.device`): where encoding runs.
        weight_dtype (`torch.dtype`): dtype of the text contexts.
        max_sequence_length (`int`): text tokens per caption.
    """

    #: What a latent cache file holds (`CachedLatentDataset`).
    cache_keys = frozenset({"latent_mean", "latent_std", "prompt_embeds"})

    def __init__(self, pipe, device: torch.device, weight_dtype: torch.dtype, max_sequence_length: int):
        self.pipe, self.device, self.weight_dtype = pipe, device, weight_dtype
        self.max_sequence_length = max_sequence_length
        self.uncond = CaptionLayout(("",), max_sequence_length)
        vae = pipe.vae
        self.latents_mean = torch.tensor(vae.config.latents_mean, device=device).view(1, -1, 1, 1, 1)
        self.latents_std = torch.tensor(vae.config.latents_std, device=device).view(1, -1, 1, 1, 1)

    @torch.no_grad()
    def videos(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(B, 3, F, H, W)` pixels in [-1, 1] -> posterior `(mean, std)`, normalised as WanPipeline un-normalises."""
        dist = self.pipe.vae.encode(video.to(self.device, torch.float32)).latent_dist
        return (dist.mean - self.latents_mean) / self.latents_std, dist.std / self.latents_std

    @torch.no_grad()
    def prompts(self, prompts: list[str]) -> torch.Tensor:
        """Single prompts, batched, as `WanPipeline.encode_prompt` encodes them."""
        embeds, _ = self.pipe.encode_prompt(
            prompts,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
            device=self.device,
            dtype=self.weight_dtype,
        )
        return embeds

    def layout(self, global_caption: str | None, shot_captions) -> CaptionLayout:
        """The caption layout of a sample (which captions, and which shot attends which span)."""
        return caption_layout(global_caption, shot_captions, self.max_sequence_length)

    def plan(self, shot_pixel_frames, global_caption: str | None, shot_captions) -> ShotPlan:
        """The shot plan of a sample: its shots cut from one clip, planned as `LongVideoPipeline` plans its shots."""
        return plan_shots(shot_pixel_frames, global_caption, shot_captions, self.max_sequence_length, one_clip=True)

    @torch.no_grad()
    def contexts(self, layouts: list[CaptionLayout]) -> list[torch.Tensor]:
        """The text context `(tokens, dim)` of each sample, each distinct caption of the batch encoded once."""
        single = [i for i, lay in enumerate(layouts) if lay.caption_spans is None]
        out: list[torch.Tensor | None] = [None] * len(layouts)
        if single:  # one caption: WanPipeline's batched prompt encoding, as for any single-prompt sample
            for i, embeds in zip(single, self.prompts([layouts[i].segments[0] for i in single])):
                out[i] = embeds
        captions: dict[str, torch.Tensor] = {}
        for i, lay in enumerate(layouts):
            if out[i] is not None:
                continue
            for text in lay.segments:
                if text not in captions:
                    embeds = encode_caption(
                        self.pipe.tokenizer, self.pipe.text_encoder, text, self.max_sequence_length, self.device
                    )
                    captions[text] = embeds[0].to(self.weight_dtype)
            out[i] = torch.cat([captions[text] for text in lay.segments])
        return out

    def encode_one(self, video: torch.Tensor, record) -> dict[str, torch.Tensor]:
        """One clip for the latent cache (`CachedLatentDataset`): unbatched latent distribution and text context."""
        mean, std = self.videos(video[None])
        (context,) = self.contexts([self.layout(record.global_caption, record.shot_captions)])
        return {"latent_mean": mean[0], "latent_std": std[0], "prompt_embeds": context}

    def batch(self, batch: dict[str, Any], cached: bool) -> EncodedBatch:
        """The latent distributions, text contexts and shot plans of a collated batch."""
        plans = [
            self.plan(p, g, s)
            for p, g, s in zip(batch["shot_pixel_frames"], batch["global_caption"], batch["shot_captions"])
        ]
        if cached:
            mean = batch["latent_mean"].to(self.device)
            std = batch["latent_std"].to(self.device)
            contexts = [e.to(self.device, self.weight_dtype) for e in batch["prompt_embeds"]]
        else:
            mean, std = self.videos(batch["video"])
            contexts = self.contexts([p.captions for p in plans])
        return EncodedBatch(mean, std, contexts, plans)

    # What `FlowMatchingStep` asks of the model's inputs.
    def empty_condition(self) -> torch.Tensor:
        """The text context of a dropped caption: the empty prompt."""
        return self.prompts([""])[0]

    def drop(self, plan: ShotPlan, context: torch.Tensor, empty: torch.Tensor) -> tuple[ShotPlan, torch.Tensor]:
        """A sample whose captions are dropped: the empty prompt with stock cross-attention, the shots kept for MoC
        (the unconditional input of classifier-free guidance in `LongVideoPipeline` and `WanPipeline`)."""
        return plan.with_captions(self.uncond), empty.to(context.dtype)

    def group_key(self, plan: ShotPlan, context: torch.Tensor) -> tuple:
        """Samples of one transformer call share this: the MoC context and the text length."""
        return tuple(plan.caption_context.items()), context.shape[0]

    def model_inputs(
        self, noisy: torch.Tensor, timestep: torch.Tensor, plans: list[ShotPlan], contexts: list[torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The transformer's inputs of one group of samples, and its [`moc_context`] arguments."""
        inputs = dict(
            hidden_states=noisy.to(self.weight_dtype), timestep=timestep, encoder_hidden_states=torch.stack(contexts)
        )
        return inputs, plans[0].caption_context
