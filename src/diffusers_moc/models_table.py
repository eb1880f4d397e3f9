"""The README's table of supported transformers: what the core does on each model, and which of the application's
pipelines and commands run it."""

from __future__ import annotations

from .core.apply import context_parallel_support, registered_models
from .model_families import HUNYUAN_VIDEO15_FAMILIES, WAN_FAMILIES

__all__ = ["TABLE_COLUMNS", "supported_models_table"]

#: The columns of [`supported_models_table`].
TABLE_COLUMNS = (
    "Transformer",
    "Pipelines",
    "MoC processor",
    "Caption tokens",
    "torch.compile",
    "Multi-shot (`LongVideoPipeline`)",
    "Image start",
    "LoRA training (`diffusers-moc train`)",
    "Context parallel",
)

# The diffusers pipelines that hold each transformer.
_PIPELINES = {
    "WanTransformer3DModel": "WanPipeline, WanImageToVideoPipeline, WanVideoToVideoPipeline",
    "WanVACETransformer3DModel": "WanVACEPipeline",
    "SkyReelsV2Transformer3DModel": "SkyReelsV2Pipeline, SkyReelsV2DiffusionForcingPipeline",
    "HunyuanVideoTransformer3DModel": "HunyuanVideoPipeline",
    "HunyuanVideo15Transformer3DModel": "HunyuanVideo15Pipeline, HunyuanVideo15ImageToVideoPipeline",
    "CogVideoXTransformer3DModel": "CogVideoXPipeline, CogVideoXImageToVideoPipeline, CogVideoXVideoToVideoPipeline",
    "LTXVideoTransformer3DModel": "LTXPipeline, LTXImageToVideoPipeline, LTXConditionPipeline",
    "MochiTransformer3DModel": "MochiPipeline",
    "HeliosTransformer3DModel": "HeliosPipeline, HeliosPyramidPipeline",
    "WanAnimateTransformer3DModel": "WanAnimatePipeline",
    "WanAnimate2Transformer3DModel": "WanAnimate2ModularPipeline",
    "MiniMaxH3Transformer3DModel": "MiniMaxH3ModularPipeline",
    "MotifVideoTransformer3DModel": "MotifVideoPipeline, MotifVideoImage2VideoPipeline",
    "Cosmos3OmniTransformer": "Cosmos3OmniPipeline",
    "LTX2VideoTransformer3DModel": "LTX2Pipeline, LTX2ImageToVideoPipeline",
    "Kandinsky5Transformer3DModel": "Kandinsky5T2VPipeline, Kandinsky5I2VPipeline",
}


#: The families of the application's pipelines and training, by the transformer they share.
_FAMILIES = {
    "WanTransformer3DModel": WAN_FAMILIES,
    "HunyuanVideo15Transformer3DModel": HUNYUAN_VIDEO15_FAMILIES,
}


def _features(model_name: str) -> tuple[str, str, str]:
    """Multi-shot, image start, LoRA training: the families of `model_name` that have each."""
    families = _FAMILIES.get(model_name, {}).values()

    def titles(keep) -> str:
        return ", ".join(f.title for f in families if keep(f)) or "no"

    return titles(lambda f: True), titles(lambda f: f.takes_image), titles(lambda f: f.trainable)


def supported_models_table() -> str:
    r"""
    The README's table of supported transformers and features, as markdown (one row per `supported_models()`).

    A test compares it with the table in README.md, so the two cannot drift apart.
    """
    rows = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for model_cls, sup in registered_models().items():
        name = model_cls.__name__
        cells = [f"`{name}`", _PIPELINES.get(name, "-"), f"`{sup.processor.__name__}`", sup.captions, sup.compile,
                 *_features(name), context_parallel_support(model_cls)]  # fmt: skip
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"
