"""`apply_moc` / `remove_moc`: install MoC processors on the self-attention layers of a diffusers transformer."""

from __future__ import annotations

import re
from typing import NamedTuple

import torch

from .attention_processors import (
    MoCAttnProcessorBase,
    MoCCogVideoXAttnProcessor,
    MoCCosmos3AttnProcessor,
    MoCDispatchAttnProcessor,
    MoCHook,
    MoCHunyuanVideo15AttnProcessor,
    MoCHunyuanVideoAttnProcessor,
    MoCLTXVideoAttnProcessor,
    MoCMochiAttnProcessor,
    MoCWanAnimate2AttnProcessor,
    MoCWanAttnProcessor,
    VideoStream,
)
from .config import MoCConfig
from .streams import HELIOS, KANDINSKY5, LTX2, MINIMAX_H3, MOTIF_VIDEO, WAN_ANIMATE

__all__ = [
    "apply_moc",
    "remove_moc",
    "get_moc_config",
    "update_moc_config",
    "pipeline_transformers",
    "supported_models",
    "registered_models",
    "context_parallel_support",
    "ModelSupport",
    "TRANSFORMER_COMPONENTS",
]

#: The pipeline components that hold a denoising transformer (Wan 2.2 A14B: `transformer` for high noise,
#: `transformer_2` for low noise; MiniMax-H3: `transformer_ref`, the checkpoint its reference-to-video workflow runs).
TRANSFORMER_COMPONENTS = ("transformer", "transformer_2", "transformer_ref")

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


class ModelSupport(NamedTuple):
    processor: type
    targets: str  # regex over `named_modules()` names of the attention modules that get MoC
    captions: str  # where the caption tokens are, as seen by MoC
    compile: str  # what torch.compile does with MoC applied (see docs/models.md, torch.compile)
    # For `MoCDispatchAttnProcessor`: the model's stream (frame grid, text and context placement).
    stream: VideoStream | None = None

    def processor_for(self, config: MoCConfig):
        """A new processor of this entry with `config`."""
        return self.processor(config) if self.stream is None else self.processor(config, stream=self.stream)


_FULL = "fullgraph, regional, export"
# diffusers 0.42.1 declares no `_repeated_blocks` for these: regional compile is `block.compile()` on each block.
_NO_REPEATED = "fullgraph, export; regional as `block.compile()` per block"
_WAN = dict(
    processor=MoCWanAttnProcessor,
    targets=_WAN_TARGETS,
    captions="cross-attention (dense; per-shot caption spans from `moc_context`)",
    compile=_FULL,
)


def _registry() -> dict[type, ModelSupport]:
    # Imported here so that importing diffusers_moc stays cheap.
    from diffusers import (
        CogVideoXTransformer3DModel,
        Cosmos3OmniTransformer,
        HeliosTransformer3DModel,
        HunyuanVideo15Transformer3DModel,
        HunyuanVideoTransformer3DModel,
        Kandinsky5Transformer3DModel,
        LTX2VideoTransformer3DModel,
        LTXVideoTransformer3DModel,
        MiniMaxH3Transformer3DModel,
        MochiTransformer3DModel,
        MotifVideoTransformer3DModel,
        SkyReelsV2Transformer3DModel,
        WanAnimate2Transformer3DModel,
        WanAnimateTransformer3DModel,
        WanTransformer3DModel,
        WanVACETransformer3DModel,
    )

    return {
        WanTransformer3DModel: ModelSupport(**_WAN),
        WanVACETransformer3DModel: ModelSupport(**_WAN),
        SkyReelsV2Transformer3DModel: ModelSupport(**_WAN),
        HunyuanVideoTransformer3DModel: ModelSupport(
            MoCHunyuanVideoAttnProcessor,
            _HUNYUAN_TARGETS,
            "joint: one caption chunk after the video, mandatory anchor; padded tokens dropped",
            _FULL,
        ),
        HunyuanVideo15Transformer3DModel: ModelSupport(
            MoCHunyuanVideo15AttnProcessor,
            _HUNYUAN_TARGETS,
            "joint: valid condition tokens (image, glyph, caption) as one chunk after the video, mandatory anchor; "
            "with per-shot captions (`caption_shots`) each caption its own chunk of its shot, before its frames; "
            "padded tokens dropped",
            "regional (diffusers' forward is data-dependent)",
        ),
        CogVideoXTransformer3DModel: ModelSupport(
            MoCCogVideoXAttnProcessor,
            _BLOCK_ATTN1_TARGETS,
            "joint: one caption chunk before the video, mandatory anchor",
            _NO_REPEATED,
        ),
        LTXVideoTransformer3DModel: ModelSupport(
            MoCLTXVideoAttnProcessor,
            _LTX_TARGETS,
            "cross-attention (dense, not routed)",
            _FULL + " (with `num_frames`, `height`, `width`)",
        ),
        MochiTransformer3DModel: ModelSupport(
            MoCMochiAttnProcessor,
            _BLOCK_ATTN1_TARGETS,
            "joint: one caption chunk after the video, mandatory anchor; padded tokens dropped",
            _NO_REPEATED,
        ),
        HeliosTransformer3DModel: ModelSupport(
            MoCDispatchAttnProcessor,
            r"^blocks\.\d+\.attn1$",
            "cross-attention (dense, not routed); history frames before the video: routed chunks of the first shot",
            "regional",
            HELIOS,
        ),
        WanAnimateTransformer3DModel: ModelSupport(
            MoCDispatchAttnProcessor,
            r"^blocks\.\d+\.attn1$",
            "cross-attention (dense, not routed); the reference frame is latent frame 0; face adapter stock",
            "regional",
            WAN_ANIMATE,
        ),
        WanAnimate2Transformer3DModel: ModelSupport(
            MoCWanAnimate2AttnProcessor,
            r"^blocks\.\d+\.self_attn$",
            "cross-attention (dense, not routed); generation pass routed, each frame's aligned reference frame a "
            "mandatory anchor; reference pass dense",
            "regional",
        ),
        MiniMaxH3Transformer3DModel: ModelSupport(
            MoCDispatchAttnProcessor,
            r"^transformer_blocks\.\d+\.attn$",
            "joint: text, keyframe/reference conditions and audio before the video as one chunk, mandatory anchor; "
            "token refiner stock",
            "regional (the video grid is read off `position_ids` once per forward)",
            MINIMAX_H3,
        ),
        MotifVideoTransformer3DModel: ModelSupport(
            MoCDispatchAttnProcessor,
            r"^(transformer_blocks|single_transformer_blocks)\.\d+\.attn$",
            "joint: caption (and image embeddings) as one chunk after the video, mandatory anchor; padded tokens "
            "dropped; text cross-attention dense",
            "regional",
            MOTIF_VIDEO,
        ),
        Cosmos3OmniTransformer: ModelSupport(
            MoCCosmos3AttnProcessor,
            r"^layers\.\d+\.self_attn$",
            "joint: the causal text prefix as one chunk before the video (its own pathway stock), sound and action "
            "tokens as one chunk after it, mandatory anchors",
            "regional",
        ),
        LTX2VideoTransformer3DModel: ModelSupport(
            MoCDispatchAttnProcessor,
            r"^transformer_blocks\.\d+\.attn1$",
            "cross-attention (dense, not routed); audio self-attention and audio-video cross-attention dense (stock)",
            "regional (with `num_frames`, `height`, `width`)",
            LTX2,
        ),
        Kandinsky5Transformer3DModel: ModelSupport(
            MoCDispatchAttnProcessor,
            r"^visual_transformer_blocks\.\d+\.self_attention$",
            "cross-attention (dense, not routed); text encoder blocks stock; NABLA mode refused",
            "regional",
            KANDINSKY5,
        ),
    }


#: MoC processors that do the Ulysses all-to-all themselves (see `diffusers_moc.parallel`).
_CONTEXT_PARALLEL_PROCESSORS = (MoCWanAttnProcessor, MoCLTXVideoAttnProcessor)
#: Models whose `MoCDispatchAttnProcessor` runs under diffusers' `_cp_plan` (the stream's facts computed from the
#: unsharded input, `moc_attend` doing the exchange), tested with two processes.
_CONTEXT_PARALLEL_MODELS = ("HeliosTransformer3DModel", "MiniMaxH3Transformer3DModel", "LTX2VideoTransformer3DModel")


def context_parallel_support(model_cls: type) -> str:
    """How MoC runs under diffusers' context parallelism on `model_cls`: `\"Ulysses\"`, or `\"no\"` and why."""
    support = _registry()[model_cls]
    if getattr(model_cls, "_cp_plan", None) is None:
        return "no (diffusers has no `_cp_plan` for this model)"
    if issubclass(support.processor, _CONTEXT_PARALLEL_PROCESSORS) or model_cls.__name__ in _CONTEXT_PARALLEL_MODELS:
        return "Ulysses"
    return "no"


def registered_models() -> dict[type, ModelSupport]:
    """The transformer classes `apply_moc` supports, each with what MoC does on it (in the models table's order)."""
    return dict(_registry())


def supported_models() -> list[str]:
    """Names of the transformer classes `apply_moc` supports."""
    return [cls.__name__ for cls in _registry()]


def _support(transformer: torch.nn.Module) -> ModelSupport:
    # The most derived registered class wins (a registered subclass of a registered model).
    for model_cls, sup in _registry().items():
        if type(transformer) is model_cls:
            return sup
    for model_cls, sup in _registry().items():
        if isinstance(transformer, model_cls):
            return sup
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


def _is_pipeline(obj) -> bool:
    return not isinstance(obj, torch.nn.Module) and hasattr(obj, "components")


def pipeline_transformers(pipe) -> dict[str, torch.nn.Module]:
    r"""
    The transformers a pipeline holds, by component name: `transformer`, and `transformer_2` on Wan 2.2 A14B or
    `transformer_ref` on MiniMax-H3 (components set to `None` are left out).
    """
    return {name: getattr(pipe, name) for name in TRANSFORMER_COMPONENTS if getattr(pipe, name, None) is not None}


def _targets(obj, what: str) -> dict[str, torch.nn.Module]:
    """`{component name: transformer}` of a pipeline, or `{"transformer": obj}` for a transformer."""
    if not _is_pipeline(obj):
        return {"transformer": obj}
    found = pipeline_transformers(obj)
    if not found:
        raise TypeError(
            f"{what}: {type(obj).__name__} holds no transformer (looked for components {list(TRANSFORMER_COMPONENTS)})"
        )
    return found


def apply_moc(pipe_or_transformer, config: MoCConfig | None = None):
    r"""
    Replace the self-attention of a transformer, or of every transformer of a pipeline, by Mixture-of-Contexts
    attention, in place.

    Given a diffusers pipeline, MoC goes on each transformer it holds: `transformer` and, on Wan 2.2 A14B,
    `transformer_2` (the low-noise expert), and on MiniMax-H3 `transformer_ref` (its reference-to-video checkpoint),
    skipping components set to `None`. Each gets its own processor with the same `config`.

    Which layers change depends on the model (see [`supported_models_table`]): the video self-attention of
    cross-attention models (Wan, LTX-Video), the joint video-caption attention of joint-attention models
    (HunyuanVideo, CogVideoX, Mochi), where the caption is a mandatory anchor chunk. Caption cross-attention stays
    dense, with the attention backend set by `set_attention_backend`; on Wan it gives each shot's tokens only their
    own caption plus the global one when [`moc_context`] has caption spans (multi-shot videos). A context-parallel
    config set by `enable_parallelism` (before or after this call) is kept.

    One [`MoCHook`] per transformer (a diffusers `ModelHook`, registered as `"moc"` in the transformer's
    `HookRegistry`) holds the processors it replaced and computes, once per forward, the latent frame grid (from
    the input shape and the model config), the chunk layout, the shots and caption spans of [`moc_context`] and
    whether drop-off / drop-in run; the processors read nothing back from the device, so
    `torch.compile(transformer, fullgraph=True)`, `transformer.compile_repeated_blocks(fullgraph=True)` and
    `torch.export` work. The model stays picklable and `copy.deepcopy` gives a copy with its own hook (unless
    another diffusers hook sits on the transformer: diffusers' own hook forwards neither pickle nor copy). Call
    [`remove_moc`] to go back to the processors that were there before.

    Args:
        pipe_or_transformer (`DiffusionPipeline` or `torch.nn.Module`): a pipeline holding supported transformers,
            or a supported diffusers transformer (see [`supported_models`]).
        config (`MoCConfig`, *optional*): routing settings (defaults to `MoCConfig()`).

    Returns:
        The same pipeline or transformer.

    Example:

    ```py
    >>> from diffusers import WanPipeline
    >>> from diffusers_moc import MoCConfig, apply_moc, get_moc_config

    >>> pipe = WanPipeline.from_pretrained("Wan-AI/Wan2.2-T2V-A14B-Diffusers")
    >>> apply_moc(pipe, MoCConfig(top_k=3))  # both experts
    >>> sorted(get_moc_config(pipe))
    ['transformer', 'transformer_2']
    ```
    """
    config = MoCConfig() if config is None else config
    if not isinstance(config, MoCConfig):
        raise TypeError(f"config must be a MoCConfig, got {type(config).__name__}")
    targets = _targets(pipe_or_transformer, "apply_moc")
    for transformer in targets.values():  # every transformer checked before any is changed
        _support(transformer)
    for label, transformer in targets.items():
        _apply_one(transformer, config, label if _is_pipeline(pipe_or_transformer) else None)
    return pipe_or_transformer


def _apply_one(transformer: torch.nn.Module, config: MoCConfig, label: str | None) -> None:
    support = _support(transformer)
    modules = list(_target_modules(transformer, support.targets))
    if not modules:
        raise ValueError(f"found no self-attention layers in {type(transformer).__name__}")
    processor = support.processor_for(config)
    hook = processor.hook = getattr(support.processor, "hook_class", MoCHook)(processor, label)
    # Keep the diffusers attention backend and parallel config the model was set to (for the dense parts).
    first = modules[0][1].processor
    processor._attention_backend = getattr(first, "_attention_backend", None)
    processor._parallel_config = getattr(first, "_parallel_config", None)
    previous = MoCHook.attached_to(transformer)
    for name, module in modules:
        original = module.processor
        if isinstance(original, MoCAttnProcessorBase):  # applied again: keep what the first apply_moc replaced
            original = None if original.hook is None else original.hook.originals.get(module)
        if original is not None:
            hook.originals[module] = original
        hook.layers[module] = name
    if isinstance(processor, MoCDispatchAttnProcessor):
        processor.use_stock(_one_stock(hook.originals, modules))
    for _, module in modules:
        _set_processor(module, processor)
    # Applied again: registered anew, last among the transformer's hooks (which also mends a chain whose forward
    # another library put back to the one from before MoC's).
    if previous is not None:
        previous.detach(transformer)
    hook.attach(transformer)


def _one_stock(originals: dict, modules: list):
    """The stock processor a generic MoC processor runs for all its layers: the one they had (one class for all, or
    `TypeError`), else the attention module's default."""
    replaced = [originals[module] for _, module in modules if module in originals]
    classes = {type(processor) for processor in replaced}
    if len(classes) > 1:
        names = ", ".join(sorted(cls.__name__ for cls in classes))
        raise TypeError(f"apply_moc runs one stock processor for all layers, but these layers have several: {names}")
    return replaced[0] if replaced else type(modules[0][1])._default_processor_cls()


def remove_moc(pipe_or_transformer):
    r"""
    Give every attention layer that runs a MoC processor its dense processor back: the one `apply_moc` replaced, or
    (for processors set with `set_attn_processor`) the model's stock processor. Given a pipeline, this is done for
    each of its transformers.

    Returns:
        The same pipeline or transformer.
    """
    for transformer in _targets(pipe_or_transformer, "remove_moc").values():
        _remove_one(transformer)
    return pipe_or_transformer


def _remove_one(transformer: torch.nn.Module) -> None:
    hook = MoCHook.attached_to(transformer)
    for module in transformer.modules():
        proc = getattr(module, "processor", None)
        if not isinstance(proc, MoCAttnProcessorBase):
            continue
        original = None if proc.hook is None else proc.hook.originals.get(module)
        if original is None:
            original = proc.stock_processor(module) if hasattr(proc, "stock_processor") else None
        if original is None:
            original = module._default_processor_cls()
        original._attention_backend = proc._attention_backend
        original._parallel_config = proc._parallel_config
        _set_processor(module, original)
    if hook is not None:
        hook.detach(transformer)


def _config_of(transformer: torch.nn.Module) -> MoCConfig | None:
    for module in transformer.modules():
        proc = getattr(module, "processor", None)
        if isinstance(proc, MoCAttnProcessorBase):
            return proc.config
    return None


def get_moc_config(pipe_or_transformer):
    r"""
    The MoC settings in use.

    Returns:
        For a transformer: the `MoCConfig` its MoC processors use, or `None` if MoC is not applied. For a pipeline:
        `dict[str, MoCConfig]`, the transformers that run MoC by component name (e.g.
        `{"transformer": ..., "transformer_2": ...}` on Wan 2.2 A14B), empty when none does.
    """
    if not _is_pipeline(pipe_or_transformer):
        return _config_of(pipe_or_transformer)
    found = {name: _config_of(t) for name, t in _targets(pipe_or_transformer, "get_moc_config").items()}
    return {name: config for name, config in found.items() if config is not None}


def update_moc_config(pipe_or_transformer, **changes):
    r"""
    Change MoC settings of an applied transformer, or of every transformer of a pipeline that runs MoC, in place
    (e.g. `top_k` from a sparsity schedule).

    Returns:
        The new `MoCConfig` (validated); for a pipeline `dict[str, MoCConfig]` by component name.
    """
    if _is_pipeline(pipe_or_transformer):
        running = get_moc_config(pipe_or_transformer)
        if not running:
            raise ValueError("MoC is not applied to any transformer of this pipeline; call apply_moc first")
        pipe = pipe_or_transformer
        return {name: update_moc_config(getattr(pipe, name), **changes) for name in running}
    transformer = pipe_or_transformer
    config = _config_of(transformer)
    if config is None:
        raise ValueError("MoC is not applied to this transformer; call apply_moc first")
    config = config.replace(**changes)
    for module in transformer.modules():
        proc = getattr(module, "processor", None)
        if isinstance(proc, MoCAttnProcessorBase):
            proc.config = config
    return config
