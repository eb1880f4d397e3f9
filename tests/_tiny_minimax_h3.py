"""A tiny MiniMax-H3 modular pipeline built in-process from config, for the tests: every component the stock
`MiniMaxH3Blocks` declare for its `t2va` workflow, random weights, nothing downloaded.

- text: a Qwen2 byte-level BPE tokenizer trained here on a few words (Qwen's special tokens included), the
  `Qwen3VLProcessor` around it (both from `_tiny_text_encoders`) and a `Qwen3VLForConditionalGeneration` of 51 tiny
  decoder layers;
- video: an `AutoencoderKLMiniMaxH3` with the released temporal geometry (17 frames a chunk, 5 latent frames kept)
  and 16x spatial compression, so that 124 frames are 37 latent frames and a 64x64 canvas is 2x2 patches a frame;
- audio: an `AutoencoderKLMiniMaxH3Audio` hopping 4 samples a latent at 160 Hz, i.e. the released 40 latents a second;
- the two `MiniMaxH3Scheduler`s and a 2-layer `MiniMaxH3Transformer3DModel`.
"""

from __future__ import annotations

import torch
from _tiny_text_encoders import qwen_vision_token_ids, tiny_qwen2_tokenizer, tiny_qwen_vl_processor

#: Hidden size of the tiny Qwen3-VL, which is the transformer's `text_dim`.
TEXT_DIM = 16
#: Channels of the tiny video and audio latents.
VIDEO_LATENT_CHANNELS = 4
AUDIO_LATENT_CHANNELS = 8
#: Samples a tiny audio latent decodes to; at 40 latents a second (the pipeline's constant) that is 160 Hz.
AUDIO_HOP_LENGTH = 4
AUDIO_SAMPLING_RATE = 40 * AUDIO_HOP_LENGTH


def tiny_qwen3_vl(tokenizer, seed: int = 0):
    r"""
    A `Qwen3VLForConditionalGeneration` with tiny text and vision towers. MiniMax-H3 reads the hidden state after
    decoder layer 50 (`MiniMaxH3ModularPipeline.text_encoder_layer`, fixed) and refuses a stack without more layers,
    so the text tower has 51 layers of width `TEXT_DIM`.
    """
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    head_dim = 8
    config = Qwen3VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": TEXT_DIM,
            "intermediate_size": 32,
            "num_hidden_layers": 51,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": head_dim,
            "max_position_embeddings": 512,
            # The interleaved 3D rotary sections cover half a head, as Qwen3-VL's do.
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [2, 1, 1],
                "mrope_interleaved": True,
            },
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_heads": 2,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "out_hidden_size": TEXT_DIM,
            "num_position_embeddings": 16,
            "deepstack_visual_indexes": [0],
        },
        **qwen_vision_token_ids(tokenizer),
    )
    torch.manual_seed(seed)
    return Qwen3VLForConditionalGeneration(config).eval()


def tiny_minimax_h3_vae(seed: int = 1):
    r"""
    `AutoencoderKLMiniMaxH3` with the released chunking (`clip_length` 17, 4x temporal compression, so
    `17 * n + 5` frames are `5 * n + 2` latent frames) and 16x spatial compression, a 1-layer ViT decoder.
    """
    from diffusers import AutoencoderKLMiniMaxH3

    torch.manual_seed(seed)
    return AutoencoderKLMiniMaxH3(
        latent_channels=VIDEO_LATENT_CHANNELS,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        spatial_downsample_factors=(2, 2, 2, 2),
        temporal_downsample_factors=(1, 2, 2, 1),
        norm_num_groups=4,
        decoder_num_layers=1,
        decoder_num_attention_heads=2,
        decoder_attention_head_dim=16,
        decoder_num_register_tokens=1,
        decoder_ffn_mult=1,
        latents_mean=tuple(0.1 * i for i in range(VIDEO_LATENT_CHANNELS)),
        latents_std=(1.0,) * VIDEO_LATENT_CHANNELS,
    ).eval()


def tiny_minimax_h3_audio_vae(seed: int = 2):
    """`AutoencoderKLMiniMaxH3Audio` hopping `AUDIO_HOP_LENGTH` samples a latent at `AUDIO_SAMPLING_RATE`."""
    from diffusers import AutoencoderKLMiniMaxH3Audio

    torch.manual_seed(seed)
    return AutoencoderKLMiniMaxH3Audio(
        encoder_dim=4,
        encoder_rates=(2, 2),
        latent_dim=16,
        latent_channels=AUDIO_LATENT_CHANNELS,
        num_attention_heads=2,
        decoder_dim=8,
        decoder_rates=(2, 2),
        decoder_kernel_sizes=(4, 4),
        resblock_kernel_sizes=(3,),
        resblock_dilation_sizes=((1,),),
        sampling_rate=AUDIO_SAMPLING_RATE,
        latents_mean=[0.0] * AUDIO_LATENT_CHANNELS,
        latents_std=[1.0] * AUDIO_LATENT_CHANNELS,
    ).eval()


def tiny_minimax_h3_transformer(
    seed: int = 3,
    in_channels: int = VIDEO_LATENT_CHANNELS,
    audio_in_channels: int = AUDIO_LATENT_CHANNELS,
    text_dim: int = TEXT_DIM,
):
    """A 2-layer `MiniMaxH3Transformer3DModel`, by default reading the tiny latents and the tiny Qwen3-VL's hidden
    states."""
    from diffusers import MiniMaxH3Transformer3DModel

    torch.manual_seed(seed)
    return MiniMaxH3Transformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        hidden_size=32,
        num_layers=2,
        num_refiner_layers=1,
        ffn_dim=32,
        in_channels=in_channels,
        audio_in_channels=audio_in_channels,
        text_dim=text_dim,
        freq_dim=16,
        time_embed_hidden_dim=32,
        time_embed_dim=32,
        rope_freq_dim=2,
    ).eval()


def tiny_minimax_h3_pipeline():
    r"""
    The stock `MiniMaxH3ModularPipeline` of `MiniMaxH3Blocks` (all three workflows, selected by the call's inputs)
    with the tiny components; `transformer_ref`, which only `ref2va` reads, is left unset. The video scheduler
    shifts by 12 and the audio one by 3, the released values.
    """
    from diffusers import MiniMaxH3Scheduler
    from diffusers.modular_pipelines import MiniMaxH3Blocks
    from transformers import Qwen3VLProcessor

    tokenizer = tiny_qwen2_tokenizer()
    pipe = MiniMaxH3Blocks().init_pipeline()
    pipe.update_components(
        tokenizer=tokenizer,
        # Constructed, not called: a `t2va` request reads only the processor's vision token ids.
        processor=tiny_qwen_vl_processor(Qwen3VLProcessor, tokenizer, patch_size=16),
        text_encoder=tiny_qwen3_vl(tokenizer),
        vae=tiny_minimax_h3_vae(),
        audio_vae=tiny_minimax_h3_audio_vae(),
        scheduler=MiniMaxH3Scheduler(shift=12.0),
        audio_scheduler=MiniMaxH3Scheduler(shift=3.0),
        transformer=tiny_minimax_h3_transformer(),
    )
    return pipe
