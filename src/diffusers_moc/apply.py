"""`apply_moc` / `remove_moc`: install MoC processors on the self-attention layers of a diffusers transformer."""

from __future__ import annotations

import re
from typing import NamedTuple

import torch

from .attention_processors import (
    MoCAttnProcessorBase,
    MoCCogVideoXAttnProcessor,
    MoCForwardPreHook,
    MoCForwardState,
    MoCHunyuanVideo15AttnProcessor,
    MoCHunyuanVideoAttnProcessor,
    MoCLTXVideoAttnProcessor,
    MoCMochiAttnProcessor,
    MoCWanAttnProcessor,
)
from .config import MoCConfig

__all__ = [
    "apply_moc",
    "remove_moc",
    "get_moc_config",
    "update_moc_config",
    "supported_models",
    "supported_models_table",
    "MOC_PROCESSORS",
]

#: The base of every MoC processor (kept as a tuple for `isinstance` checks written against earlier versions).
MOC_PROCESSORS: tuple[type, ...] = (MoCAttnProcessorBase,)

# Which attention modules of each model get MoC (module names as in `named_modules()`):
# - Wan: `attn1` (self-attention, routed) and `attn2` (cross-attention: stock, or per-shot caption anchors when
#   `moc_context` has caption spans) of each block and VACE block;
# - HunyuanVideo / 1.5: the joint attention of the dual- and single-stream blocks, not the caption refiner;
# - CogVideoX, Mochi: the joint `attn1`;
# - LTX-Video: `attn1` and `attn2`; the processor runs the cross-attention densely (context-parallel safe).
_WAN_TARGETS = r"^(blocks|vace_blocks)\.\d+\.attn[12]$"
_HUNYUAN_TARGETS = r"^(transformer_blocks|single_transformer_blocks)\.\d+\.attn$"
_BLOCK_ATTN1_TARGETS = r"^transformer_blocks\.\d+\.attn1$"
_LTX_TARGETS = r"^transformer_blocks\.\d+\.attn[12]$"


class _Support(NamedTuple):
    processor: type
    targets: str  # regex over `named_modules()` names of the attention modules that get MoC
    pipelines: str
    captions: str  # where the caption tokens are, as seen by MoC
    compile: str  # what torch.compile does with MoC applied (see the README's torch.compile section)


_FULL = "fullgraph, regional, export"
# diffusers 0.42.1 declares no `_repeated_blocks` for these: regional compile is `block.compile()` on each block.
_NO_REPEATED = "fullgraph, export; regional as `block.compile()` per block"
_WAN = dict(
    processor=MoCWanAttnProcessor,
    targets=_WAN_TARGETS,
    captions="cross-attention (dense; per-shot caption spans from `moc_context`)",
    compile=_FULL,
)


def _registry() -> dict[type, _Support]:
    # Imported here so that importing diffusers_moc stays cheap.
    from diffusers import (
        CogVideoXTransformer3DModel,
        HunyuanVideo15Transformer3DModel,
        HunyuanVideoTransformer3DModel,
        LTXVideoTransformer3DModel,
        MochiTransformer3DModel,
        SkyReelsV2Transformer3DModel,
        WanTransformer3DModel,
        WanVACETransformer3DModel,
    )

    return {
        WanTransformer3DModel: _Support(
            pipelines="WanPipeline, WanImageToVideoPipeline, WanVideoToVideoPipeline", **_WAN
        ),
        WanVACETransformer3DModel: _Support(pipelines="WanVACEPipeline", **_WAN),
        SkyReelsV2Transformer3DModel: _Support(
            pipelines="SkyReelsV2Pipeline, SkyReelsV2DiffusionForcingPipeline", **_WAN
        ),
        HunyuanVideoTransformer3DModel: _Support(
            MoCHunyuanVideoAttnProcessor,
            _HUNYUAN_TARGETS,
            "HunyuanVideoPipeline",
            "joint: one caption chunk after the video, mandatory anchor; padded tokens dropped",
            _FULL,
        ),
        HunyuanVideo15Transformer3DModel: _Support(
            MoCHunyuanVideo15AttnProcessor,
            _HUNYUAN_TARGETS,
            "HunyuanVideo15Pipeline, HunyuanVideo15ImageToVideoPipeline",
            "joint: valid condition tokens (image, glyph, caption) as one chunk after the video, mandatory anchor; "
            "padded tokens dropped",
            "regional (diffusers' forward is data-dependent)",
        ),
        CogVideoXTransformer3DModel: _Support(
            MoCCogVideoXAttnProcessor,
            _BLOCK_ATTN1_TARGETS,
            "CogVideoXPipeline, CogVideoXImageToVideoPipeline, CogVideoXVideoToVideoPipeline",
            "joint: one caption chunk before the video, mandatory anchor",
            _NO_REPEATED,
        ),
        LTXVideoTransformer3DModel: _Support(
            MoCLTXVideoAttnProcessor,
            _LTX_TARGETS,
            "LTXPipeline, LTXImageToVideoPipeline, LTXConditionPipeline",
            "cross-attention (dense, not routed)",
            _FULL + " (with `num_frames`, `height`, `width`)",
        ),
        MochiTransformer3DModel: _Support(
            MoCMochiAttnProcessor,
            _BLOCK_ATTN1_TARGETS,
            "MochiPipeline",
            "joint: one caption chunk after the video, mandatory anchor; padded tokens dropped",
            _NO_REPEATED,
        ),
    }


#: MoC processors that do the Ulysses all-to-all themselves (see `diffusers_moc.parallel`).
_CONTEXT_PARALLEL_PROCESSORS = (MoCWanAttnProcessor, MoCLTXVideoAttnProcessor)


def _context_parallel(model_cls: type, support: _Support) -> str:
    if getattr(model_cls, "_cp_plan", None) is None:
        return "no (diffusers has no `_cp_plan` for this model)"
    if not issubclass(support.processor, _CONTEXT_PARALLEL_PROCESSORS):
        return "no"
    return "Ulysses"


def supported_models() -> list[str]:
    """Names of the transformer classes `apply_moc` supports."""
    return [cls.__name__ for cls in _registry()]


def supported_models_table() -> str:
    r"""
    The README's table of supported transformers and features, as markdown (one row per `supported_models()`).

    A test compares it with the table in README.md, so the two cannot drift apart.
    """
    rows = [
        "| Transformer | Pipelines | MoC processor | Caption tokens | torch.compile | Context parallel |",
        "|---|---|---|---|---|---|",
    ]
    for model_cls, sup in _registry().items():
        rows.append(
            f"| `{model_cls.__name__}` | {sup.pipelines} | `{sup.processor.__name__}` | {sup.captions} | {sup.compile} "
            f"| {_context_parallel(model_cls, sup)} |"
        )
    return "\n".join(rows) + "\n"


def _processor_class(transformer: torch.nn.Module) -> tuple[type, str]:
    for model_cls, sup in _registry().items():
        if isinstance(transformer, model_cls):
            return sup.processor, sup.targets
    raise TypeError(
        f"apply_moc does not support {type(transformer).__name__}; supported transformers: "
        f"{', '.join(supported_models())}"
    )


def _target_modules(transformer: torch.nn.Module, pattern: str):
    for name, module in transformer.named_modules():
        if re.match(pattern, name) and hasattr(module, "processor"):
            yield name, module


def _set_processor(module: torch.nn.Module, processor) -> None:
    # `MochiAttention` has a `processor` but no `set_processor`.
    if hasattr(module, "set_processor"):
        module.set_processor(processor)
    else:
        module.processor = processor


def _remove_hooks(transformer: torch.nn.Module) -> None:
    for key, hook in list(transformer._forward_pre_hooks.items()):
        if isinstance(hook, MoCForwardPreHook):
            del transformer._forward_pre_hooks[key]
            transformer._forward_pre_hooks_with_kwargs.pop(key, None)


def apply_moc(transformer: torch.nn.Module, config: MoCConfig | None = None) -> torch.nn.Module:
    r"""
    Replace the self-attention of `transformer` by Mixture-of-Contexts attention, in place.

    Which layers change depends on the model (see [`supported_models_table`]): the video self-attention of
    cross-attention models (Wan, LTX-Video), the joint video-caption attention of joint-attention models
    (HunyuanVideo, CogVideoX, Mochi), where the caption is a mandatory anchor chunk. Caption cross-attention stays
    dense, with the attention backend set by `set_attention_backend`; on Wan it gives each shot's tokens only their
    own caption plus the global one when [`moc_context`] has caption spans (multi-shot videos). A context-parallel
    config set by `enable_parallelism` (before or after this call) is kept.

    A forward pre-hook computes, once per forward, the latent frame grid (from the input shape and the model
    config), the chunk layout, the shots and caption spans of [`moc_context`] and whether drop-off / drop-in run;
    the processors read nothing back from the device, so `torch.compile(transformer, fullgraph=True)`,
    `transformer.compile_repeated_blocks(fullgraph=True)` and `torch.export` work. The model stays picklable. Call
    [`remove_moc`] to go back to the processors that were there before.

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
    proc_cls, pattern = _processor_class(transformer)
    processor = proc_cls(config)
    processor.state = MoCForwardState()
    modules = list(_target_modules(transformer, pattern))
    if not modules:
        raise ValueError(f"found no self-attention layers in {type(transformer).__name__}")
    # Keep the diffusers attention backend and parallel config the model was set to (for the dense parts).
    first = modules[0][1].processor
    processor._attention_backend = getattr(first, "_attention_backend", None)
    processor._parallel_config = getattr(first, "_parallel_config", None)
    for _, module in modules:
        if not isinstance(module.processor, MOC_PROCESSORS):
            module._moc_original_processor = module.processor
        _set_processor(module, processor)
    _remove_hooks(transformer)
    transformer.register_forward_pre_hook(MoCForwardPreHook(processor), with_kwargs=True)
    return transformer


def remove_moc(transformer: torch.nn.Module) -> torch.nn.Module:
    r"""
    Give every attention layer that runs a MoC processor its dense processor back: the one `apply_moc` replaced, or
    (for processors set with `set_attn_processor`) the model's stock processor.
    """
    for module in transformer.modules():
        proc = getattr(module, "processor", None)
        if not isinstance(proc, MOC_PROCESSORS):
            continue
        original = module.__dict__.pop("_moc_original_processor", None)
        if original is None:
            original = proc.stock_processor(module) if hasattr(proc, "stock_processor") else None
        if original is None:
            original = module._default_processor_cls()
        original._attention_backend = proc._attention_backend
        original._parallel_config = proc._parallel_config
        _set_processor(module, original)
    _remove_hooks(transformer)
    return transformer


def get_moc_config(transformer: torch.nn.Module) -> MoCConfig | None:
    """The `MoCConfig` the transformer's MoC processors use, or `None` if MoC is not applied."""
    for module in transformer.modules():
        proc = getattr(module, "processor", None)
        if isinstance(proc, MOC_PROCESSORS):
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
        if isinstance(proc, MOC_PROCESSORS):
            proc.config = config
    return config
