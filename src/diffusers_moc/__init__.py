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
    "apply_moc": "core.apply",
    "get_moc_config": "core.apply",
    "pipeline_transformers": "core.apply",
    "remove_moc": "core.apply",
    "supported_models": "core.apply",
    "supported_models_table": "models_table",
    "update_moc_config": "core.apply",
    "available_backends": "core.backends",
    "moc_attention": "core.attention",
    "resolve_backend": "core.backends",
    "MoCAttnProcessorBase": "core.attention_processors",
    "MoCCogVideoXAttnProcessor": "core.attention_processors",
    "MoCHunyuanVideo15AttnProcessor": "core.attention_processors",
    "MoCHunyuanVideoAttnProcessor": "core.attention_processors",
    "MoCLTXVideoAttnProcessor": "core.attention_processors",
    "MoCMochiAttnProcessor": "core.attention_processors",
    "MoCWanAttnProcessor": "core.attention_processors",
    "MoCConfig": "core.config",
    "MoCContext": "core.context",
    "InputError": "errors",
    "current_moc_context": "core.context",
    "moc_context": "core.context",
    "ChunkLayout": "core.layout",
    "MoCRouting": "core.routing",
    "chunk_means": "core.routing",
    "route": "core.routing",
    "RoutingMap": "core.recording",
    "moc_routing_map": "core.recording",
    "LongVideoPipeline": "pipelines",
    "HunyuanVideo15LongVideoPipeline": "pipelines",
    "LongVideoPipelineOutput": "pipelines",
    "Shot": "pipelines",
    "Storyboard": "pipelines",
    "StoryboardError": "pipelines",
    "load_storyboard": "pipelines",
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
    from .core.apply import (  # noqa: F401
        apply_moc,
        get_moc_config,
        pipeline_transformers,
        remove_moc,
        supported_models,
        update_moc_config,
    )
    from .core.attention import moc_attention  # noqa: F401
    from .core.backends import available_backends, resolve_backend  # noqa: F401
    from .core.config import MoCConfig  # noqa: F401
    from .core.context import MoCContext, current_moc_context, moc_context  # noqa: F401
    from .core.layout import ChunkLayout  # noqa: F401
    from .core.recording import RoutingMap, moc_routing_map  # noqa: F401
    from .core.routing import MoCRouting, chunk_means, route  # noqa: F401
    from .errors import InputError  # noqa: F401
    from .models_table import supported_models_table  # noqa: F401
