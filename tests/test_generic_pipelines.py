"""The stock diffusers pipelines of the models on the generic processor, with `apply_moc(pipe)`, on tiny components
built here from config (offline)."""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    HeliosPipeline,
    HeliosScheduler,
    HeliosTransformer3DModel,
    WanAnimatePipeline,
    WanAnimateTransformer3DModel,
)
from PIL import Image

from diffusers_moc import MoCConfig, apply_moc
from diffusers_moc.tiny import TINY_TEXT_DIM, tiny_wan_components

DENSE = MoCConfig(top_k=1000, causal=False)
SPARSE = MoCConfig(top_k=1, local_window=0, backend="torch")


def _text_and_vae() -> dict:
    wan = tiny_wan_components()
    return {name: wan[name] for name in ("tokenizer", "text_encoder", "vae")}


def _helios():
    torch.manual_seed(0)
    transformer = HeliosTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=TINY_TEXT_DIM,
        freq_dim=32,
        ffn_dim=32,
        num_layers=2,
        rope_dim=(4, 4, 4),
    ).eval()
    pipe = HeliosPipeline(
        transformer=transformer,
        scheduler=HeliosScheduler(stage_range=[0, 1], stages=1, use_dynamic_shifting=True),
        **_text_and_vae(),
    )
    # 33 frames: the pipeline makes it in chunks, each later one with the earlier ones as history.
    call = {"prompt": "a cat", "num_inference_steps": 2, "height": 16, "width": 16, "num_frames": 33}
    return pipe, {**call, "guidance_scale": 1.0, "max_sequence_length": 8}


def _wan_animate():
    torch.manual_seed(0)
    transformer = WanAnimateTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=36,
        latent_channels=16,
        out_channels=16,
        text_dim=TINY_TEXT_DIM,
        freq_dim=32,
        ffn_dim=32,
        num_layers=2,
        image_dim=8,
        rope_max_seq_len=32,
        motion_encoder_channel_sizes={"4": 16, "8": 16, "16": 16},
        motion_encoder_size=16,
        motion_style_dim=8,
        motion_dim=4,
        motion_encoder_dim=16,
        face_encoder_hidden_dim=16,
        face_encoder_num_heads=2,
        inject_face_latents_blocks=2,
    ).eval()
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=8,
            projection_dim=8,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=4,
            intermediate_size=16,
            patch_size=1,
        )
    ).eval()
    pipe = WanAnimatePipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        image_encoder=image_encoder,
        image_processor=CLIPImageProcessor(crop_size=4, size=4),
        **_text_and_vae(),
    )
    frames = [Image.new("RGB", (16, 16), (40 * i % 255, 90, 160)) for i in range(9)]
    call = {
        "image": Image.new("RGB", (16, 16), (200, 30, 60)),
        "pose_video": frames,
        "face_video": frames,
        "prompt": "a dancer",
        "height": 16,
        "width": 16,
        "segment_frame_length": 9,
        "num_inference_steps": 2,
        "mode": "animate",
        "guidance_scale": 1.0,
        "max_sequence_length": 8,
    }
    return pipe, call


PIPELINES = {"helios": _helios, "wan_animate": _wan_animate}


def _frames(pipe, call) -> torch.Tensor:
    out = pipe(**call, generator=torch.Generator().manual_seed(0), output_type="latent")
    return out.frames


@pytest.mark.parametrize("name", list(PIPELINES))
def test_stock_pipeline_runs_with_moc(name):
    pipe, call = PIPELINES[name]()
    pipe.set_progress_bar_config(disable=True)
    stock = _frames(pipe, call)
    apply_moc(pipe, DENSE)
    assert torch.equal(_frames(pipe, call), stock)
    apply_moc(pipe, SPARSE)
    sparse = _frames(pipe, call)
    assert sparse.shape == stock.shape and torch.isfinite(sparse).all()
    assert not torch.allclose(sparse, stock, atol=1e-4)
    if name == "helios":  # later chunks of the video run with the earlier ones as routed history chunks
        assert pipe.transformer.blocks[0].attn1.processor.hook.facts.prefix_tokens > 0
