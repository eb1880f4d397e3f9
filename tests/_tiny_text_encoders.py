"""Tiny text-encoder components built in-process for the pipeline tests, nothing downloaded: a Qwen tokenizer trained
here on a few words (`diffusers_moc.tiny._WORDS`, plus any text a pipeline wraps the prompt in) with the released
one's pre-tokenizer and special tokens, and the Qwen-VL processors around it."""

from __future__ import annotations

from collections.abc import Sequence

from diffusers_moc.tiny import _WORDS

#: Qwen's own special tokens, which pipelines and Qwen's processors look up by name: the text end, the chat turn
#: delimiters and the vision tokens. They take ids 0-6 of a tokenizer from `tiny_qwen2_tokenizer`.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<|im_start|>",
    "<|im_end|>",
)


def tiny_qwen2_tokenizer(corpus: Sequence[str] = (), vocab_size: int = 400):
    r"""
    A `Qwen2TokenizerFast` (Qwen's byte-level BPE with its pre-tokenizer) whose merges are trained here on `_WORDS`
    and `corpus`. Byte-level, so any text tokenizes; `vocab_size` bounds the merges, hence how finely text outside
    the corpus splits.
    """
    from transformers import Qwen2TokenizerFast

    specials = list(QWEN_SPECIAL_TOKENS)
    base = Qwen2TokenizerFast(vocab={specials[0]: 0}, merges=[], extra_special_tokens=specials[1:])
    return base.train_new_from_iterator([_WORDS, *corpus], vocab_size=vocab_size, show_progress=False)


def tiny_qwen_vl_processor(processor_class: type, tokenizer, patch_size: int):
    r"""
    A Qwen-VL processor of `processor_class` (`Qwen2_5_VLProcessor`, `Qwen3VLProcessor`) over `tokenizer`, its image
    and video processors made from defaults at `patch_size`-pixel patches merged 2x2, two frames a temporal patch.

    Without torchvision (this project does not depend on it) transformers falls back to its PIL image processor.
    Qwen2-VL's video processor, the one Qwen2.5-VL uses, imports torchvision when its module loads, so Qwen3-VL's,
    which does not, serves both at the given geometry: the processors require one, and the pipelines here pass no
    video. The processor's constructor checks it against `transformers.VideoProcessorMixin`, which transformers
    exports only with torchvision installed, so the real class is exposed under that name for the construction alone.
    """
    from unittest import mock

    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    from transformers.video_processing_utils import VideoProcessorMixin

    geometry = {"patch_size": patch_size, "merge_size": 2, "temporal_patch_size": 2}
    with mock.patch.object(transformers, "VideoProcessorMixin", VideoProcessorMixin, create=True):
        return processor_class(
            image_processor=Qwen2VLImageProcessorPil(**geometry),
            tokenizer=tokenizer,
            video_processor=Qwen3VLVideoProcessor(**geometry),
        )


def qwen_vision_token_ids(tokenizer) -> dict[str, int]:
    """The vision token ids a Qwen-VL config names, as `tokenizer` numbers them."""
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    tokens = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    return {name: tokenizer.convert_tokens_to_ids(token) for name, token in zip(names, tokens)}
