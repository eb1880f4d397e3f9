"""LoRA fine-tuning of video transformers through Mixture-of-Contexts attention (`diffusers-moc train`)."""

from .config import ConfigError, TrainConfig, load_train_config
from .data import StepBatchSampler, VideoClipDataset, latent_shot_frames
from .schedule import SparsitySchedule, routed_density
from .trainer import MoCLoRATrainer, TrainResult, train

__all__ = [
    "ConfigError",
    "MoCLoRATrainer",
    "SparsitySchedule",
    "StepBatchSampler",
    "TrainConfig",
    "TrainResult",
    "VideoClipDataset",
    "latent_shot_frames",
    "load_train_config",
    "routed_density",
    "train",
]
