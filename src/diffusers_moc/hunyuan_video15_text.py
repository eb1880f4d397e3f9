"""The text and transformer inputs of HunyuanVideo 1.5 shots, shared by `HunyuanVideo15LongVideoPipeline` and
`diffusers-moc train` (below both, which import nothing from each other).

HunyuanVideo 1.5 is an MMDiT: captions are tokens of the joint self-attention stream. Each caption (its Qwen caption
and its ByT5 glyph text) is encoded alone as diffusers' `HunyuanVideo15Pipeline.encode_prompt` encodes it, trimmed to
its real tokens and placed one after the other; [`moc_context`]'s `caption_shots` / `caption_tokens` make each one a
text chunk of its shot (the global caption a chunk of no shot). A single caption for every shot takes diffusers' own
padded text path. Training and inference build these inputs with the same code here, so a LoRA is trained on the
inputs it is used with.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .shot_plan import ShotPlan

__all__ = [
    "HunyuanVideo15CaptionEncoder",
    "HunyuanVideo15Text",
    "BYT5_TOKENS",
    "VISION_TOKENS",
    "caption_context",
    "caption_segments",
    "cat_texts",
    "t2v_condition",
    "text_defaults",
    "transformer_inputs",
]

#: Image tokens of HunyuanVideo 1.5's SigLIP encoder (zeros for text-to-video, as diffusers' pipeline passes them).
VISION_TOKENS = 729
#: ByT5 glyph-text tokens of diffusers' pipelines.
BYT5_TOKENS = 256


@dataclass(frozen=True)
class HunyuanVideo15Text:
    r"""
    The four text inputs of the transformer, and the [`moc_context`] arguments that describe them.

    Attributes:
        embeds, mask (`torch.Tensor`): Qwen caption embeddings `(B, T, D)` and their mask `(B, T)`.
        embeds_2, mask_2 (`torch.Tensor`): ByT5 glyph-text embeddings `(B, T2, D2)` and their mask `(B, T2)`.
        context (`dict`): the [`moc_context`] arguments (`shot_frames`, and with per-shot captions `caption_shots` /
            `caption_tokens`).
    """

    embeds: torch.Tensor
    mask: torch.Tensor
    embeds_2: torch.Tensor
    mask_2: torch.Tensor
    context: dict[str, Any]

    def kwargs(self) -> dict[str, torch.Tensor]:
        """The transformer's keyword arguments of these inputs."""
        return dict(
            encoder_hidden_states=self.embeds,
            encoder_attention_mask=self.mask,
            encoder_hidden_states_2=self.embeds_2,
            encoder_attention_mask_2=self.mask_2,
        )

    @property
    def key(self) -> tuple:
        """What samples batched into one transformer call must share: the MoC context and the token counts."""
        return tuple(self.context.items()), self.embeds.shape[1], self.embeds_2.shape[1]


def cat_texts(texts: Sequence[HunyuanVideo15Text]) -> HunyuanVideo15Text:
    """Several samples' text inputs as one batch; they must share [`HunyuanVideo15Text.key`]."""
    if len({t.key for t in texts}) != 1:
        raise ValueError("text inputs batched together must share their MoC context and token counts")
    tensors = [torch.cat([getattr(t, name) for t in texts]) for name in ("embeds", "mask", "embeds_2", "mask_2")]
    return HunyuanVideo15Text(*tensors, context=texts[0].context)


def caption_segments(global_caption: str | None, shot_captions: Sequence[str | None]) -> list[tuple[int, str]]:
    """The captions of a video in stream order, each with its shot (`-1`: the global caption, of no shot). A shot
    without a caption (`None`) has no segment: it attends the global caption only."""
    segments = [(-1, global_caption)] if global_caption is not None else []
    return segments + [(i, c) for i, c in enumerate(shot_captions) if c is not None]


def caption_context(plan: ShotPlan, shots: Sequence[int], tokens: Sequence[Sequence[int]]) -> dict[str, Any]:
    """The [`moc_context`] arguments of per-shot captions: the shots, each segment's shot (`caption_shots`) and its
    Qwen and ByT5 token counts (`caption_tokens`)."""
    counts = tuple(tuple(int(n) for n in row) for row in tokens)
    return {**plan.shot_context, "caption_shots": tuple(shots), "caption_tokens": counts}


@functools.cache
def text_defaults() -> dict[str, Any]:
    """diffusers' Qwen text settings (`system_message`, `crop_start`, `tokenizer_max_length`), read off its encoder's
    signature so they follow diffusers."""
    from diffusers import HunyuanVideo15Pipeline

    params = inspect.signature(HunyuanVideo15Pipeline._get_mllm_prompt_embeds).parameters
    return {k: params[k].default for k in ("system_message", "crop_start", "tokenizer_max_length")}


@dataclass
class HunyuanVideo15CaptionEncoder:
    r"""
    Encodes captions for HunyuanVideo 1.5 as diffusers' pipelines do, one caption at a time.

    Args:
        text_encoder (`Qwen2_5_VLTextModel`), tokenizer (`Qwen2Tokenizer`): the caption encoder.
        text_encoder_2 (`T5EncoderModel`), tokenizer_2 (`ByT5Tokenizer`): the glyph-text encoder.
        max_sequence_length (`int`): Qwen caption tokens (diffusers' 1000 by default).
        system_message (`str`, *optional*), crop_start (`int`, *optional*): the Qwen prompt template and the
            template tokens dropped (diffusers' when `None`).
        max_sequence_length_2 (`int`, defaults to 256): ByT5 tokens.
    """

    text_encoder: Any
    tokenizer: Any
    text_encoder_2: Any
    tokenizer_2: Any
    max_sequence_length: int | None = None
    system_message: str | None = None
    crop_start: int | None = None
    max_sequence_length_2: int = BYT5_TOKENS

    def __post_init__(self):
        defaults = text_defaults()
        if self.max_sequence_length is None:
            self.max_sequence_length = defaults["tokenizer_max_length"]
        if self.system_message is None:
            self.system_message = defaults["system_message"]
        if self.crop_start is None:
            self.crop_start = defaults["crop_start"]

    @classmethod
    def from_pipeline(cls, pipe, max_sequence_length: int | None = None) -> HunyuanVideo15CaptionEncoder:
        """The encoder of a HunyuanVideo 1.5 pipeline (its components and text settings)."""
        return cls(
            pipe.text_encoder,
            pipe.tokenizer,
            pipe.text_encoder_2,
            pipe.tokenizer_2,
            max_sequence_length=max_sequence_length or pipe.tokenizer_max_length,
            system_message=pipe.system_message,
            crop_start=pipe.prompt_template_encode_start_idx,
            max_sequence_length_2=pipe.tokenizer_2_max_length,
        )

    def encode(self, caption: str | None, device, dtype, copies: int = 1) -> HunyuanVideo15Text:
        r"""
        One caption as diffusers' `encode_prompt` encodes it: padded Qwen and ByT5 embeddings and their masks, all in
        `dtype`, repeated `copies` times; the context is empty (the caller sets the shots).
        """
        from diffusers import HunyuanVideo15Pipeline

        caption = caption or ""
        embeds, mask = HunyuanVideo15Pipeline._get_mllm_prompt_embeds(
            self.text_encoder,
            self.tokenizer,
            caption,
            device,
            tokenizer_max_length=self.max_sequence_length,
            system_message=self.system_message,
            crop_start=self.crop_start,
        )
        embeds_2, mask_2 = HunyuanVideo15Pipeline._get_byt5_prompt_embeds(
            self.tokenizer_2, self.text_encoder_2, caption, device, tokenizer_max_length=self.max_sequence_length_2
        )
        out = (
            embeds.repeat(copies, 1, 1),
            mask.repeat(copies, 1),
            embeds_2.repeat(copies, 1, 1),
            mask_2.repeat(copies, 1),
        )
        return HunyuanVideo15Text(*(x.to(dtype=dtype, device=device) for x in out), context={})

    def shot_text(
        self,
        plan: ShotPlan,
        global_caption: str | None,
        shot_captions: Sequence[str | None],
        device,
        dtype,
        copies: int = 1,
    ) -> HunyuanVideo15Text:
        r"""
        The conditional text of a video's shots: diffusers' for a single caption; else the global caption and each
        shot's ([`caption_segments`]), each encoded alone (each distinct caption once) and trimmed to its real tokens,
        in that order, with the [`caption_context`] that makes each one a text chunk of its shot.
        """
        if plan.captions.caption_spans is None:  # one caption for every shot: diffusers' text path
            text = self.encode(plan.captions.segments[0], device, dtype, copies)
            return HunyuanVideo15Text(text.embeds, text.mask, text.embeds_2, text.mask_2, context=plan.shot_context)
        segments = caption_segments(global_caption, shot_captions)
        encoded = {c: self.encode(c, device, dtype) for c in dict.fromkeys(c for _, c in segments)}
        parts, counts = ([], []), ([], [])
        for _, caption in segments:
            text = encoded[caption]
            for i, (embeds, mask) in enumerate(((text.embeds, text.mask), (text.embeds_2, text.mask_2))):
                real = mask[0].bool()
                parts[i].append(embeds[:, real])
                counts[i].append(int(real.sum()))
        tensors = []
        for i in range(2):
            embeds = torch.cat(parts[i], dim=1)
            if embeds.shape[1] == 0:  # no glyph text in any caption: one padded token
                embeds = embeds.new_zeros(1, 1, embeds.shape[-1])
            mask = (torch.arange(embeds.shape[1], device=device) < sum(counts[i])).to(dtype)[None]
            tensors += [embeds.repeat(copies, 1, 1), mask.repeat(copies, 1)]
        context = caption_context(plan, [shot for shot, _ in segments], counts)
        return HunyuanVideo15Text(*tensors, context=context)


def t2v_condition(
    latents: torch.Tensor, image_embed_dim: int, dtype: torch.dtype, device
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""
    The condition latents and mask concatenated to the latents, and the image tokens, of text-to-video, as
    diffusers' `HunyuanVideo15Pipeline` passes them: zeros.

    Args:
        latents (`torch.Tensor`): `(B, C, F, H, W)` latents.
        image_embed_dim (`int`): the transformer's `image_embed_dim`.

    Returns:
        `(concat, image_embeds)`: `(B, C + 1, F, H, W)` and `(B, 729, image_embed_dim)` zeros.
    """
    batch, channels, frames, h, w = latents.shape
    concat = torch.zeros(batch, channels + 1, frames, h, w, dtype=dtype, device=device)
    embeds = torch.zeros(batch, VISION_TOKENS, image_embed_dim, dtype=dtype, device=device)
    return concat, embeds


def transformer_inputs(
    latents: torch.Tensor,
    concat: torch.Tensor,
    image_embeds: torch.Tensor,
    timestep: torch.Tensor,
    text: HunyuanVideo15Text,
) -> dict[str, torch.Tensor]:
    r"""
    The transformer's keyword arguments of one denoising call, as diffusers' pipelines build them: the latents
    with the condition concatenated, the image tokens, the timestep per sample (in the input's dtype) and the text.

    Args:
        latents (`torch.Tensor`): `(B, C, F, H, W)` noisy latents.
        concat (`torch.Tensor`), image_embeds (`torch.Tensor`): from [`t2v_condition`] (or the image-to-video
            condition).
        timestep (`torch.Tensor`): a scalar or `(B,)` timesteps.
        text ([`HunyuanVideo15Text`]): the text inputs (its `context` goes to [`moc_context`], not here).
    """
    model_input = torch.cat([latents, concat], dim=1)
    timestep = timestep.expand(model_input.shape[0]).to(model_input.dtype)
    return dict(hidden_states=model_input, image_embeds=image_embeds, timestep=timestep, **text.kwargs())
