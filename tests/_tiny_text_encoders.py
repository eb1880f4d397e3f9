"""Tiny text encoders and their tokenizers, built in-process for the pipeline tests: random weights, nothing
downloaded. The tokenizers are trained here on a few words (`diffusers_moc.tiny._WORDS`, plus any text a pipeline
wraps the prompt in) with the pre-tokenizers, special tokens and post-processing of the released ones:

- Qwen: a byte-level BPE tokenizer, the Qwen-VL processors around it, a Qwen2.5-VL model;
- CLIP: its tokenizer and text model."""

from __future__ import annotations

from collections.abc import Sequence

import torch

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


def tiny_qwen2_5_vl(tokenizer, hidden_size: int = 16, seed: int = 0):
    r"""
    A `Qwen2_5_VLForConditionalGeneration` with a 2-layer text tower of width `hidden_size` (heads of 8 channels,
    their multimodal rotary sections covering half a head, as Qwen2.5-VL's do) and a 1-block vision tower.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden_size,
            "intermediate_size": 2 * hidden_size,
            "num_hidden_layers": 2,
            "num_attention_heads": hidden_size // 8,
            "num_key_value_heads": 1,
            "max_position_embeddings": 512,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
            # Qwen's: the text end opens a sequence, a chat turn's end closes one.
            "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
            "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_heads": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": hidden_size,
            "fullatt_block_indexes": [0],
        },
        **qwen_vision_token_ids(tokenizer),
    )
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_clip_text(hidden_size: int = 8, seed: int = 0):
    r"""
    A `CLIPTokenizer` (CLIP's lower-casing byte-level BPE, `<|startoftext|>` and `<|endoftext|>` around the text,
    padded with `<|endoftext|>`) trained here on `_WORDS`, and a 1-layer `CLIPTextModel` of width `hidden_size`
    over its 77 positions.

    The released CLIP config names an `eos_token_id` of 2, which makes the model pool at the highest id, where
    CLIP's vocabulary puts `<|endoftext|>`; the tokenizer trained here numbers it 1, so the config names that id
    and the model pools at the first `<|endoftext|>` instead, the same position.
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer().train_new_from_iterator([_WORDS], vocab_size=400, show_progress=False)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        projection_dim=hidden_size,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return tokenizer, CLIPTextModel(config).eval()
