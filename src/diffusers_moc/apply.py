"""`apply_moc` / `remove_moc`: install MoC processors on the self-attention layers of a diffusers transformer."""

from __future__ import annotations

import torch

from .attention_processors import MoCWanAttnProcessor
from .config import MoCConfig

__all__ = ["apply_moc", "remove_moc", "get_moc_config", "update_moc_config", "supported_models"]


def _registry() -> dict[type, type]:
    # Imported here so that importing diffusers_moc stays cheap; all share WanAttention-style self-attention.
    from diffusers import SkyReelsV2Transformer3DModel, WanTransformer3DModel, WanVACETransformer3DModel

    return {
        WanTransformer3DModel: MoCWanAttnProcessor,
        WanVACETransformer3DModel: MoCWanAttnProcessor,
        SkyReelsV2Transformer3DModel: MoCWanAttnProcessor,
    }


def supported_models() -> list[str]:
    """Names of the transformer classes `apply_moc` supports."""
    return [cls.__name__ for cls in _registry()]


def _processor_class(transformer: torch.nn.Module) -> type:
    for model_cls, proc_cls in _registry().items():
        if isinstance(transformer, model_cls):
            return proc_cls
    raise TypeError(
        f"apply_moc does not support {type(transformer).__name__}; supported transformers: "
        f"{', '.join(supported_models())}"
    )


def _self_attention_modules(transformer: torch.nn.Module):
    for name, module in transformer.named_modules():
        if hasattr(module, "set_processor") and not getattr(module, "is_cross_attention", True):
            yield name, module


def apply_moc(transformer: torch.nn.Module, config: MoCConfig | None = None) -> torch.nn.Module:
    r"""
    Replace the self-attention of `transformer` by Mixture-of-Contexts attention, in place.

    Cross-attention layers keep their processors. The attention backend set with `set_attention_backend` is kept for
    them. Call [`remove_moc`] to go back to dense attention.

    Args:
        transformer (`torch.nn.Module`): a supported diffusers transformer (see [`supported_models`]).
        config (`MoCConfig`, *optional*): routing settings (defaults to `MoCConfig()`).

    Returns:
        The same transformer.

    Example:

    ```py
    >>> from diffusers import WanPipeline
    >>> from diffusers_moc import MoCConfig, apply_moc

    >>> pipe = WanPipeline.from_pretrained("Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
    >>> apply_moc(pipe.transformer, MoCConfig(top_k=3))
    ```
    """
    config = MoCConfig() if config is None else config
    if not isinstance(config, MoCConfig):
        raise TypeError(f"config must be a MoCConfig, got {type(config).__name__}")
    proc_cls = _processor_class(transformer)
    processor = proc_cls(config)
    modules = list(_self_attention_modules(transformer))
    if not modules:
        raise ValueError(f"found no self-attention layers in {type(transformer).__name__}")
    # Keep the diffusers attention backend the model was set to (used for the dense cross-attention).
    processor._attention_backend = getattr(modules[0][1].processor, "_attention_backend", None)
    for _, module in modules:
        module.set_processor(processor)
    return transformer


def remove_moc(transformer: torch.nn.Module) -> torch.nn.Module:
    r"""Give every attention layer that runs a MoC processor its model's default (dense) processor back."""
    for module in transformer.modules():
        if isinstance(getattr(module, "processor", None), MoCWanAttnProcessor):
            backend = module.processor._attention_backend
            module.set_processor(module._default_processor_cls())
            module.processor._attention_backend = backend
    return transformer


def get_moc_config(transformer: torch.nn.Module) -> MoCConfig | None:
    """The `MoCConfig` the transformer's MoC processors use, or `None` if MoC is not applied."""
    for module in transformer.modules():
        proc = getattr(module, "processor", None)
        if isinstance(proc, MoCWanAttnProcessor):
            return proc.config
    return None


def update_moc_config(transformer: torch.nn.Module, **changes) -> MoCConfig:
    r"""
    Change MoC settings of an applied transformer in place (e.g. `top_k` from a sparsity schedule).

    Returns:
        The new `MoCConfig` (validated).
    """
    config = get_moc_config(transformer)
    if config is None:
        raise ValueError("MoC is not applied to this transformer; call apply_moc first")
    config = config.replace(**changes)
    for module in transformer.modules():
        proc = getattr(module, "processor", None)
        if isinstance(proc, MoCWanAttnProcessor):
            proc.config = config
    return config
