"""Shared by the training tests: tiny clips, a tiny training config, accelerate's state reset."""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from diffusers_moc.training import MoCLoRATrainer, TrainConfig

NUM_FRAMES = 17  # 5 latent frames of 2x2 patch tokens at 32x32


def _reset_accelerate():
    # accelerate keeps process-wide singletons; every training run in this file starts from a clean state.
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _write_clip(path: str, seed: int, frames: int = NUM_FRAMES, size: int = 32) -> None:
    # Smooth moving colour blobs: easy to learn, and survive H.264 compression.
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    colour = rng.uniform(0.2, 1.0, size=3)
    video = []
    for f in range(frames):
        cx, cy = 0.3 + 0.4 * f / frames, 0.5 + 0.2 * np.sin(f / 3 + seed)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.05)
        video.append(np.stack([blob * c for c in colour], -1))
    import imageio.v3 as iio

    iio.imwrite(path, (np.stack(video) * 255).astype(np.uint8), plugin="pyav", fps=8, codec="libx264")


def _make_dataset(root, n: int = 2, corrupt: bool = False) -> str:
    root = str(root)
    os.makedirs(os.path.join(root, "clips"), exist_ok=True)
    lines = []
    for i in range(n):
        _write_clip(os.path.join(root, "clips", f"{i}.mp4"), seed=i)
        if i % 2 == 0:
            lines.append({"file": f"clips/{i}.mp4", "caption": "a red car drives in the city"})
        else:
            lines.append(
                {
                    "file": f"clips/{i}.mp4",
                    "caption": "a dog",
                    "shots": [
                        {"caption": "runs on the beach", "frames": [0, 9]},
                        {"caption": "sits", "frames": [9, 17]},
                    ],
                }
            )
    if corrupt:
        with open(os.path.join(root, "clips", "broken.mp4"), "wb") as f:
            f.write(b"\x00not a video" * 50)
        lines.append({"file": "clips/broken.mp4", "caption": "a cat"})
    with open(os.path.join(root, "metadata.jsonl"), "w") as f:
        f.write("\n".join(json.dumps(x) for x in lines) + "\n")
    return root


def _config(data_root, out, **sections) -> TrainConfig:
    base = {
        "output_dir": str(out),
        "seed": 0,
        "model": {"pretrained": "tiny"},
        "lora": {"rank": 4, "alpha": 8, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]},
        "moc": {"top_k": 1, "local_window": 0, "causal": True, "drop_off": 0.5, "drop_in": 0.5, "backend": "torch"},
        "sparsity": {"start_top_k": "dense", "warmup_steps": 1, "anneal_steps": 2},
        "data": {
            "root": str(data_root),
            "num_frames": NUM_FRAMES,
            "height": 32,
            "width": 32,
            "max_sequence_length": 16,
        },
        "training": {
            "max_steps": 6,
            "learning_rate": 1e-3,
            "mixed_precision": "no",
            "gradient_checkpointing": True,
            "lr_scheduler": "constant",
        },
        "checkpointing": {"every": 0},
        "logging": {"report_to": []},
    }
    for name, values in sections.items():
        if isinstance(values, dict):
            base.setdefault(name, {}).update(values)
        else:
            base[name] = values
    return TrainConfig.from_dict(base)


def _lora_state(trainer: MoCLoRATrainer, component: str = "transformer") -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    model = getattr(trainer.pipeline, component)
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
