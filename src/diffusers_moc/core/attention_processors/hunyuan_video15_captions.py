"""Per-shot captions in HunyuanVideo 1.5's joint stream: the per-forward facts and the caption refiner run per caption.

With `caption_shots` in the [`moc_context`], each caption segment of the transformer's two text inputs (the Qwen
caption in `encoder_hidden_states`, the ByT5 glyph text in `encoder_hidden_states_2`) becomes a text chunk of its
shot, the image tokens of image-to-video a global chunk. Two things make a shot's caption independent of the others
before the joint blocks:

- the text encoders see one caption at a time (the pipeline encodes each alone);
- diffusers' token refiner (`context_embedder`), which would attend over all caption tokens together and condition on
  their pooled mean, refines each caption span alone: a hook in the refiner's diffusers `HookRegistry` runs the
  refiner's own forward on each span and concatenates (no extra work, no copy of its code).

The joint blocks then see the chunks in MoC's causal order (`diffusers_moc.core.joint_stream`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.hooks import ModelHook

from ..layout import GLOBAL_SHOT
from ..model_hooks import register_hook, remove_hook
from .base import MoCAttnProcessorBase, MoCForwardFacts, MoCHook

__all__ = ["CaptionedFacts", "HunyuanVideo15Hook"]

_REFINER_HOOK = "moc_caption_refiner"


@dataclass(frozen=True)
class CaptionedFacts(MoCForwardFacts):
    r"""
    [`MoCForwardFacts`] of a forward with per-shot captions in the joint stream.

    Attributes:
        text_chunks (`tuple[tuple[int, int], ...]`): `(tokens, shot)` of each condition chunk in the order diffusers
            packs the condition tokens: the image tokens (image-to-video, global), the glyph-text segments, the
            caption segments.
        padding (`int`): the padded condition tokens after them.
        text_kinds (`tuple[str, ...]`): what each of `text_chunks` is: `"image"`, `"glyph text"` or `"caption"`
            (how a routing map labels their rows).
    """

    text_chunks: tuple[tuple[int, int], ...] = ()
    padding: int = 0
    text_kinds: tuple[str, ...] = ()

    def text_labels(self, text_index: tuple[int | None, ...]) -> tuple[str | None, ...]:
        """Per chunk of a joint stream (its `text_index`), the label of each condition chunk: `"caption (shot
        1)"`, `"glyph text (global)"`, `"image (global)"`; `None` for video chunks and the padding."""
        labels = []
        for i in text_index:
            if i is None:
                labels.append(None)
                continue
            shot = self.text_chunks[i][1]
            labels.append(f"{self.text_kinds[i]} ({'global' if shot == GLOBAL_SHOT else f'shot {shot}'})")
        return tuple(labels)


def _check_mask(name: str, mask: torch.Tensor | None, real: int, length: int) -> None:
    """`mask` must mark the first `real` of `length` tokens of every sample as real and the rest as padding."""
    if mask is None:
        if real == length:
            return
        raise ValueError(f"{name} is missing: {length - real} of its {length} tokens are padding")
    if real > mask.shape[-1]:
        raise ValueError(f"caption_tokens counts {real} tokens in {name}, which has {mask.shape[-1]}")
    expected = torch.arange(mask.shape[-1], device=mask.device) < real
    if not torch.equal(mask.bool(), expected.expand_as(mask)):
        raise ValueError(
            f"{name} must mark exactly the first {real} tokens of every sample as real (the caption segments, as "
            "caption_tokens counts them) and the rest as padding"
        )


def _condition_chunks(args: tuple, kwargs: dict, context) -> tuple[tuple[tuple[int, int], ...], int, tuple[str, ...]]:
    """The condition chunks of one forward in diffusers' packing order, the padding after them and what each chunk
    is. Reads the masks and `image_embeds` once (diffusers' own forward reads both too)."""
    get = MoCAttnProcessorBase._call_arg
    if len(context.caption_tokens) != 2:
        raise ValueError(
            "HunyuanVideo 1.5 has two text inputs (encoder_hidden_states: Qwen caption, encoder_hidden_states_2: "
            f"ByT5 glyph text); caption_tokens gives counts for {len(context.caption_tokens)}"
        )
    qwen, byt5 = context.caption_tokens
    text, text_2 = get(args, kwargs, "encoder_hidden_states", 2), get(args, kwargs, "encoder_hidden_states_2", 5)
    image = get(args, kwargs, "image_embeds", 7)
    for name, index, counts, tokens in (("", 3, qwen, text), ("_2", 6, byt5, text_2)):
        mask = get(args, kwargs, f"encoder_attention_mask{name}", index)
        _check_mask(f"encoder_attention_mask{name}", mask, sum(counts), tokens.shape[1])
    chunks, kinds = [], []
    if not bool(torch.all(image == 0)):  # diffusers' test for image-to-video: the image tokens are real
        chunks.append((image.shape[1], GLOBAL_SHOT))
        kinds.append("image")
    # diffusers packs the real tokens as [image, ByT5, Qwen], then the padding.
    for kind, counts in (("glyph text", byt5), ("caption", qwen)):
        segments = [(n, shot) for shot, n in zip(context.caption_shots, counts) if n]
        chunks += segments
        kinds += [kind] * len(segments)
    total = text.shape[1] + text_2.shape[1] + image.shape[1]
    return tuple(chunks), total - sum(n for n, _ in chunks), tuple(kinds)


class _RefinerPerCaption(ModelHook):
    r"""
    The hook of the token refiner (`context_embedder`) that refines each caption span of `encoder_hidden_states`
    alone: its forward runs the refiner's own forward on each span and concatenates. Padding after the spans gets
    zeros (diffusers zeroes padded caption tokens anyway).
    """

    def __init__(self, hook: HunyuanVideo15Hook):
        super().__init__()
        self.hook = hook

    def _spans(self):
        facts = self.hook.facts
        if not isinstance(facts, CaptionedFacts) or not self.hook._in_use():
            return ()
        return facts.context.caption_spans_of(0)

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        forward = self.fn_ref.original_forward
        spans = self._spans()
        if not spans:
            return forward(*args, **kwargs)
        hidden = MoCAttnProcessorBase._call_arg(args, kwargs, "hidden_states", 0)
        timestep = MoCAttnProcessorBase._call_arg(args, kwargs, "timestep", 1)
        mask = MoCAttnProcessorBase._call_arg(args, kwargs, "attention_mask", 2)
        parts = [forward(hidden[:, a:b], timestep, None if mask is None else mask[:, a:b]) for a, b, _ in spans]
        end = spans[-1][1]
        if end < hidden.shape[1]:
            parts.append(parts[0].new_zeros(parts[0].shape[0], hidden.shape[1] - end, parts[0].shape[2]))
        return torch.cat(parts, dim=1)


class HunyuanVideo15Hook(MoCHook):
    r"""
    The [`MoCHook`] of HunyuanVideo 1.5: with `caption_shots` in the [`moc_context`], its facts also hold the
    condition chunks of the forward ([`CaptionedFacts`]), and the token refiner runs once per caption span.
    """

    def __init__(self, processor, label: str | None = None):
        super().__init__(processor, label)
        self.refiner = _RefinerPerCaption(self)

    def attach(self, transformer: torch.nn.Module) -> None:
        super().attach(transformer)
        register_hook(transformer.context_embedder, self.refiner, _REFINER_HOOK)

    def detach(self, transformer: torch.nn.Module) -> None:
        remove_hook(transformer.context_embedder, self.refiner, _REFINER_HOOK)
        super().detach(transformer)

    def compute_facts(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> MoCForwardFacts:
        facts = super().compute_facts(module, args, kwargs)
        if facts.context.caption_shots is None:
            return facts
        chunks, padding, kinds = _condition_chunks(args, kwargs, facts.context)
        return CaptionedFacts(
            facts.grid,
            facts.layout,
            facts.context,
            facts.regularise,
            facts.prefix_tokens,
            text_chunks=chunks,
            padding=padding,
            text_kinds=kinds,
        )
