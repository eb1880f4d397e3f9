"""The stock diffusers pipelines of the models on the generic processor, with `apply_moc(pipe)`, on tiny components
built here from config (offline)."""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    HeliosPipeline,
    HeliosPyramidPipeline,
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


def _tiny_helios_transformer() -> HeliosTransformer3DModel:
    torch.manual_seed(0)
    return HeliosTransformer3DModel(
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


def _helios():
    pipe = HeliosPipeline(
        transformer=_tiny_helios_transformer(),
        scheduler=HeliosScheduler(stage_range=[0, 1], stages=1, use_dynamic_shifting=True),
        **_text_and_vae(),
    )
    # 33 frames: the pipeline makes it in chunks, each later one with the earlier ones as history.
    call = {"prompt": "a cat", "num_inference_steps": 2, "height": 16, "width": 16, "num_frames": 33}
    return pipe, {**call, "guidance_scale": 1.0, "max_sequence_length": 8}


def _helios_pyramid():
    # Three stages, each at twice the previous one's height and width: 64 pixels end at 4x4 tokens. gamma 1/4, not
    # the default 1/3, whose 2x2 block-noise covariance is singular: stock diffusers fails its Cholesky on the CPU.
    scheduler = HeliosScheduler(stages=3, stage_range=[0, 1 / 3, 2 / 3, 1], use_dynamic_shifting=True, gamma=0.25)
    pipe = HeliosPyramidPipeline(transformer=_tiny_helios_transformer(), scheduler=scheduler, **_text_and_vae())
    call = {
        "prompt": "a cat",
        "height": 64,
        "width": 64,
        "num_frames": 33,
        "pyramid_num_inference_steps_list": [1, 1, 1],
    }
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


PIPELINES = {"helios": _helios, "helios_pyramid": _helios_pyramid, "wan_animate": _wan_animate}


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
    if name.startswith("helios"):  # later chunks of the video run with the earlier ones as routed history chunks
        assert pipe.transformer.blocks[0].attn1.processor.hook.last_facts.prefix_tokens > 0
