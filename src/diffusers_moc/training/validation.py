"""Validation videos during training: generated with the model being trained, written all-or-nothing, logged."""

from __future__ import annotations

import contextlib
import logging
import os

import torch

from ..core.apply import get_moc_config, pipeline_transformers, update_moc_config
from ..core.config import MoCConfig
from ..core.context import moc_context
from ..video_io import write_videos
from .config import ValidationConfig

__all__ = ["render_validation"]

logger = logging.getLogger(__name__)


def render_validation(
    accelerator,
    pipe,
    settings: ValidationConfig,
    moc: MoCConfig,
    max_sequence_length: int,
    out_dir: str,
    step: int,
    trackers: list[str],
) -> list[str]:
    r"""
    Generate one video per validation prompt with `pipe` (every transformer it holds in eval mode, with the target
    MoC settings: no drop-off / drop-in; both experts of Wan 2.2 A14B), write
    them to `out_dir/step-<step>-<i>.mp4` and log them to the trackers. Uses no global RNG (own generators), so
    validation does not change the training run. Main process only; other processes return `[]`.

    Returns:
        `list[str]`: the written videos.
    """
    import numpy as np

    v = settings
    if not accelerator.is_main_process:
        return []
    models = pipeline_transformers(pipe)
    was_training = {name: m.training for name, m in models.items()}
    before = get_moc_config(pipe)
    for m in models.values():
        m.eval()
    update_moc_config(pipe, **moc.to_dict())
    os.makedirs(out_dir, exist_ok=True)
    paths, videos = [], []
    autocast = (
        torch.autocast(accelerator.device.type, dtype=torch.bfloat16)
        if accelerator.mixed_precision == "bf16"
        else contextlib.nullcontext()
    )
    try:
        with torch.no_grad(), autocast, moc_context(shot_frames=v.shot_frames):
            for i, prompt in enumerate(v.prompts):
                generator = torch.Generator(device=accelerator.device).manual_seed(v.seed + i)
                frames = _generate(pipe, prompt, v, generator, max_sequence_length)
                videos.append((np.clip(frames, 0, 1) * 255).round().astype(np.uint8))
                paths.append(os.path.join(out_dir, f"step-{step:06d}-{i}.mp4"))
    finally:
        for name, m in models.items():
            update_moc_config(m, **before[name].to_dict())
            m.train(was_training[name])
    write_videos(list(zip(paths, videos)), fps=v.fps)
    _log(accelerator, trackers, paths, videos, v.prompts, step)
    logger.info("validation videos at step %d: %s", step, paths)
    return paths


def _generate(pipe, prompt: str, v: ValidationConfig, generator, max_sequence_length: int):
    """One validation video (`np` frames). diffusers' HunyuanVideo 1.5 pipeline takes its guidance scale from its
    `guider` and its caption length from `tokenizer_max_length`; both are set for the call and restored."""
    call = dict(
        prompt=prompt,
        height=v.height,
        width=v.width,
        num_frames=v.num_frames,
        num_inference_steps=v.num_inference_steps,
        generator=generator,
        output_type="np",
    )
    if getattr(pipe, "guider", None) is None:
        return pipe(**call, guidance_scale=v.guidance_scale, max_sequence_length=max_sequence_length).frames[0]
    guider, length = pipe.guider, pipe.tokenizer_max_length
    pipe.guider, pipe.tokenizer_max_length = guider.new(guidance_scale=v.guidance_scale), max_sequence_length
    try:
        return pipe(**call).frames[0]
    finally:
        pipe.guider, pipe.tokenizer_max_length = guider, length


def _log(accelerator, trackers: list[str], paths, videos, prompts, step: int) -> None:
    import numpy as np

    for name in trackers:
        tracker = accelerator.get_tracker(name, unwrap=True)
        if name == "tensorboard":
            for i, video in enumerate(videos):
                keep = np.linspace(0, len(video) - 1, num=min(8, len(video))).round().astype(int)
                tracker.add_images(f"validation/{i}", video[keep], step, dataformats="NHWC")
        elif name == "wandb":
            import wandb

            tracker.log(
                {"validation": [wandb.Video(p, caption=pr, format="mp4") for p, pr in zip(paths, prompts)]},
                step=step,
            )
