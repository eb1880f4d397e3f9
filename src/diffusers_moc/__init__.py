"""diffusers-moc: Mixture of Contexts sparse attention routing for Hugging Face diffusers video transformers."""

from .apply import (
    MOC_PROCESSORS,
    apply_moc,
    get_moc_config,
    remove_moc,
    supported_models,
    supported_models_table,
    update_moc_config,
)
from .attention import available_backends, moc_attention, resolve_backend
from .attention_processors import (
    MoCAttnProcessorBase,
    MoCCogVideoXAttnProcessor,
    MoCHunyuanVideo15AttnProcessor,
    MoCHunyuanVideoAttnProcessor,
    MoCLTXVideoAttnProcessor,
    MoCMochiAttnProcessor,
    MoCWanAttnProcessor,
)
from .config import MoCConfig
from .context import MoCContext, current_moc_context, moc_context
from .layout import ChunkLayout
from .routing import MoCRouting, chunk_means, dense_mask, route

__version__ = "0.1.0"

# The pipeline and Hub helpers pull in transformers and huggingface_hub: imported on first use, as diffusers does.
_LAZY = {
    "LongVideoPipeline": "pipelines",
    "LongVideoPipelineOutput": "pipelines",
    "Shot": "pipelines",
    "Storyboard": "pipelines",
    "StoryboardError": "pipelines",
    "load_storyboard": "pipelines",
    "prepare_moc_transformer": "pipelines",
    "load_moc_lora": "hub",
    "moc_model_card": "hub",
    "push_to_hub": "hub",
    "save_moc_lora": "hub",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    *_LAZY,
    "ChunkLayout",
    "MoCConfig",
    "MoCContext",
    "MoCRouting",
    "MOC_PROCESSORS",
    "MoCAttnProcessorBase",
    "MoCCogVideoXAttnProcessor",
    "MoCHunyuanVideo15AttnProcessor",
    "MoCHunyuanVideoAttnProcessor",
    "MoCLTXVideoAttnProcessor",
    "MoCMochiAttnProcessor",
    "MoCWanAttnProcessor",
    "apply_moc",
    "available_backends",
    "chunk_means",
    "current_moc_context",
    "dense_mask",
    "get_moc_config",
    "moc_attention",
    "moc_context",
    "remove_moc",
    "resolve_backend",
    "route",
    "supported_models",
    "supported_models_table",
    "update_moc_config",
]
