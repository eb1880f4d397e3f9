"""diffusers-moc: Mixture of Contexts sparse attention routing for Hugging Face diffusers video transformers.

Every public name is imported on first use (PEP 562), as diffusers does: `import diffusers_moc` and the
`diffusers-moc --help` command line stay fast because torch and diffusers load only when something needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Public name -> submodule that defines it.
_LAZY = {
    "MOC_PROCESSORS": "apply",
    "apply_moc": "apply",
    "get_moc_config": "apply",
    "pipeline_transformers": "apply",
    "remove_moc": "apply",
    "supported_models": "apply",
    "supported_models_table": "apply",
    "update_moc_config": "apply",
    "available_backends": "attention",
    "moc_attention": "attention",
    "resolve_backend": "attention",
    "MoCAttnProcessorBase": "attention_processors",
    "MoCCogVideoXAttnProcessor": "attention_processors",
    "MoCHunyuanVideo15AttnProcessor": "attention_processors",
    "MoCHunyuanVideoAttnProcessor": "attention_processors",
    "MoCLTXVideoAttnProcessor": "attention_processors",
    "MoCMochiAttnProcessor": "attention_processors",
    "MoCWanAttnProcessor": "attention_processors",
    "MoCConfig": "config",
    "MoCContext": "context",
    "InputError": "errors",
    "current_moc_context": "context",
    "moc_context": "context",
    "ChunkLayout": "layout",
    "MoCRouting": "routing",
    "chunk_means": "routing",
    "dense_mask": "routing",
    "route": "routing",
    "RoutingMap": "recording",
    "moc_routing_map": "recording",
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

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # later lookups skip this hook
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:  # static type checkers and IDEs see the real names
    from .apply import (  # noqa: F401
        MOC_PROCESSORS,
        apply_moc,
        get_moc_config,
        pipeline_transformers,
        remove_moc,
        supported_models,
        supported_models_table,
        update_moc_config,
    )
    from .attention import available_backends, moc_attention, resolve_backend  # noqa: F401
    from .config import MoCConfig  # noqa: F401
    from .context import MoCContext, current_moc_context, moc_context  # noqa: F401
    from .errors import InputError  # noqa: F401
    from .layout import ChunkLayout  # noqa: F401
    from .recording import RoutingMap, moc_routing_map  # noqa: F401
    from .routing import MoCRouting, chunk_means, dense_mask, route  # noqa: F401
