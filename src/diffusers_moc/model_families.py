"""The Wan model families `LongVideoPipeline`, `diffusers-moc train` and the command line know, told apart by config.

A family is what the code must do differently, not a checkpoint: Wan 2.1 text-to-video and image-to-video, Wan 2.2
A14B (two expert transformers switched at `boundary_ratio`), Wan 2.2 TI2V-5B (`expand_timesteps`, a 48-channel VAE
that compresses 16x in space). A family is recognised from a diffusers folder's `model_index.json` and the configs
of its transformer and VAE, so a model is known (and an unsupported one refused) before any weights load.

The defaults of each family are those of its model card and diffusers' pipeline: resolution, frames, frame rate,
steps and guidance.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ALL_FAMILIES",
    "HUNYUAN_VIDEO15_FAMILIES",
    "WanFamily",
    "WAN_FAMILIES",
    "PIPELINE_CLASSES",
    "UnsupportedModelError",
    "family_from_configs",
    "family_of_pipeline",
    "family_of_repo_id",
    "family_of_source",
    "is_hunyuan_video15_source",
]

#: diffusers pipelines whose folders hold a Wan model `LongVideoPipeline` can load.
PIPELINE_CLASSES = ("WanPipeline", "WanImageToVideoPipeline", "LongVideoPipeline")


class UnsupportedModelError(ValueError):
    """A model that is not one of the Wan families (the message says what it is and what is supported)."""


@dataclass(frozen=True)
class WanFamily:
    r"""
    One Wan model family.

    Attributes:
        name (`str`): its id, e.g. `"wan2.2-ti2v-5b"` (also the `--tiny` / `model.tiny_model` name).
        title (`str`): for messages and the README.
        repo_ids (`tuple[str, ...]`): the diffusers checkpoints on the Hub known to be of this family.
        experts (`bool`): two transformers, `transformer` (high noise) and `transformer_2` (low noise), switched at
            `boundary_ratio` with `guidance_scale_2` for the second, as diffusers' `WanPipeline` does.
        image (`str`): `"none"` (text-to-video), `"optional"` (TI2V: with or without a start image) or
            `"required"` (image-to-video).
        image_encoder (`bool`): the image is also encoded by CLIP and attended in cross-attention (Wan 2.1 I2V).
        expand_timesteps (`bool`): per-token timesteps, the start image as a clean first latent frame (TI2V-5B).
        trainable (`bool`): `diffusers-moc train` fine-tunes it (text-to-video training; TI2V-5B included; HunyuanVideo
            1.5 T2V).
        defaults (`dict`): `height`, `width`, `num_frames`, `fps`, `num_inference_steps`, `guidance_scale` (and
            `guidance_scale_2` with experts) of the model card.
        size_multiple (`int`): what heights and widths the released checkpoints take a multiple of: the VAE's
            spatial compression times the 2 x 2 patches (16; 32 for TI2V-5B's 16x VAE), checked before a real model
            loads (the pipeline derives it from the loaded VAE and transformer).
    """

    name: str
    title: str
    repo_ids: tuple[str, ...]
    experts: bool = False
    image: str = "none"
    image_encoder: bool = False
    expand_timesteps: bool = False
    trainable: bool = False
    defaults: dict[str, Any] = field(default_factory=dict)
    size_multiple: int = 16

    @property
    def takes_image(self) -> bool:
        return self.image != "none"


_WAN21 = dict(height=480, width=832, num_frames=81, fps=16, num_inference_steps=50, guidance_scale=5.0)

#: Every family, by name. Defaults: the model cards' examples (Wan 2.2 A14B: 40 steps, guidance 4.0 / 3.0 at 720p;
#: I2V-A14B: 3.5 at 480p; TI2V-5B: 1280x704, 121 frames at 24 fps).
WAN_FAMILIES: dict[str, WanFamily] = {
    f.name: f
    for f in (
        WanFamily(
            "wan2.1-t2v",
            "Wan 2.1 T2V",
            ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "Wan-AI/Wan2.1-T2V-14B-Diffusers"),
            trainable=True,
            defaults=_WAN21,
        ),
        WanFamily(
            "wan2.1-i2v",
            "Wan 2.1 I2V",
            ("Wan-AI/Wan2.1-I2V-14B-480P-Diffusers", "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers"),
            image="required",
            image_encoder=True,
            defaults=_WAN21,
        ),
        WanFamily(
            "wan2.2-t2v-a14b",
            "Wan 2.2 T2V-A14B",
            ("Wan-AI/Wan2.2-T2V-A14B-Diffusers",),
            experts=True,
            trainable=True,
            defaults=dict(
                height=720,
                width=1280,
                num_frames=81,
                fps=16,
                num_inference_steps=40,
                guidance_scale=4.0,
                guidance_scale_2=3.0,
            ),
        ),
        WanFamily(
            "wan2.2-i2v-a14b",
            "Wan 2.2 I2V-A14B",
            ("Wan-AI/Wan2.2-I2V-A14B-Diffusers",),
            experts=True,
            image="required",
            defaults=dict(
                height=480,
                width=832,
                num_frames=81,
                fps=16,
                num_inference_steps=40,
                guidance_scale=3.5,
                guidance_scale_2=3.5,
            ),
        ),
        WanFamily(
            "wan2.2-ti2v-5b",
            "Wan 2.2 TI2V-5B",
            ("Wan-AI/Wan2.2-TI2V-5B-Diffusers",),
            image="optional",
            expand_timesteps=True,
            trainable=True,
            defaults=dict(height=704, width=1280, num_frames=121, fps=24, num_inference_steps=50, guidance_scale=5.0),
            size_multiple=32,
        ),
    )
}

#: HunyuanVideo 1.5 (`HunyuanVideo15LongVideoPipeline`): a joint-attention MMDiT whose captions are text chunks of
#: the stream. Height and width default to diffusers' pipeline's (16:9 at the transformer's `target_size`, or the
#: start image's aspect), guidance to the `guider` component's scale: `None` here, "the loaded model's", and the
#: Qwen caption length to diffusers' 1000 tokens.
_HV15 = dict(
    num_frames=121,
    fps=24,
    num_inference_steps=50,
    height=None,
    width=None,
    guidance_scale=None,
    max_sequence_length=1000,
)
_HV15_VARIANTS = ("Diffusers-480p", "Diffusers-720p", "480p", "720p")
HUNYUAN_VIDEO15_FAMILIES: dict[str, WanFamily] = {
    f.name: f
    for f in (
        WanFamily(
            "hunyuanvideo1.5-t2v",
            "HunyuanVideo 1.5 T2V",
            tuple(f"hunyuanvideo-community/HunyuanVideo-1.5-{v}_t2v" for v in _HV15_VARIANTS),
            trainable=True,
            defaults=_HV15,
        ),
        WanFamily(
            "hunyuanvideo1.5-i2v",
            "HunyuanVideo 1.5 I2V",
            tuple(f"hunyuanvideo-community/HunyuanVideo-1.5-{v}_i2v" for v in _HV15_VARIANTS),
            image="required",
            defaults=_HV15,
        ),
    )
}

_BY_REPO = {repo.lower(): f for f in WAN_FAMILIES.values() for repo in f.repo_ids}
#: Every family the command line and training know: the Wan families and HunyuanVideo 1.5's.
ALL_FAMILIES: dict[str, WanFamily] = {**WAN_FAMILIES, **HUNYUAN_VIDEO15_FAMILIES}
_BY_REPO_ALL = {repo.lower(): f for f in ALL_FAMILIES.values() for repo in f.repo_ids}


def family_of_repo_id(name: str | None) -> WanFamily | None:
    """The family of a known Hub checkpoint id (`WanFamily.repo_ids`, any case, Wan or HunyuanVideo 1.5), without
    any download; else `None`."""
    return _BY_REPO_ALL.get(name.lower()) if isinstance(name, str) else None


def family_from_configs(
    *,
    in_channels: int,
    z_dim: int,
    has_transformer_2: bool = False,
    boundary_ratio: float | None = None,
    expand_timesteps: bool = False,
    image_dim: int | None = None,
    pos_embed_seq_len: int | None = None,
) -> WanFamily:
    r"""
    The family of a Wan pipeline from its config facts: the transformer's `in_channels`, `image_dim` and
    `pos_embed_seq_len`, the VAE's `z_dim`, whether it has a `transformer_2`, and the pipeline's `boundary_ratio` and
    `expand_timesteps`.

    Raises:
        [`UnsupportedModelError`]: for a combination no family has (e.g. a Wan 2.1 FLF2V or VACE checkpoint).
    """
    if expand_timesteps:
        if has_transformer_2 or in_channels != z_dim:
            raise UnsupportedModelError("expand_timesteps with two transformers or image channels is no Wan family")
        return WAN_FAMILIES["wan2.2-ti2v-5b"]
    image_channels = in_channels == 2 * z_dim + 4  # latents + first-frame mask (4) + condition latents
    if not image_channels and in_channels != z_dim:
        raise UnsupportedModelError(
            f"a Wan transformer with {in_channels} input channels and a {z_dim}-channel VAE is no supported family"
        )
    if has_transformer_2:
        if boundary_ratio is None:
            raise UnsupportedModelError("a pipeline with transformer_2 but no boundary_ratio is no Wan 2.2 family")
        return WAN_FAMILIES["wan2.2-i2v-a14b" if image_channels else "wan2.2-t2v-a14b"]
    if image_channels:
        if image_dim is None:
            raise UnsupportedModelError("an image-to-video Wan transformer without image_dim and one expert")
        if pos_embed_seq_len is not None:  # FLF2V embeds a first and a last frame; a long video has no last frame
            raise UnsupportedModelError(
                "a Wan 2.1 first-last-frame (FLF2V) checkpoint is no supported family: LongVideoPipeline starts from "
                "one image; use a Wan 2.1 I2V checkpoint"
            )
        return WAN_FAMILIES["wan2.1-i2v"]
    return WAN_FAMILIES["wan2.1-t2v"]


def family_of_pipeline(pipe) -> WanFamily:
    """The family of a loaded pipeline (its components and config)."""
    transformer = pipe.transformer if getattr(pipe, "transformer", None) is not None else pipe.transformer_2
    config = getattr(pipe, "config", {})
    return family_from_configs(
        in_channels=transformer.config.in_channels,
        z_dim=pipe.vae.config.z_dim,
        has_transformer_2=getattr(pipe, "transformer_2", None) is not None,
        boundary_ratio=config.get("boundary_ratio"),
        expand_timesteps=bool(config.get("expand_timesteps", False)),
        image_dim=transformer.config.get("image_dim"),
        pos_embed_seq_len=transformer.config.get("pos_embed_seq_len"),
    )


def _read_json(source: str, filename: str, local: bool, hub_kwargs: dict) -> dict | None:
    if local:
        path = os.path.join(source, filename)
        if not os.path.isfile(path):
            return None
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError

        try:
            path = hf_hub_download(source, filename, **hub_kwargs)
        except LocalEntryNotFoundError as e:  # not "no such file": the Hub could not be asked
            raise OSError(f"{source}: cannot download {filename}: no connection to the Hub and not in the cache") from e
        except EntryNotFoundError:
            return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def family_of_source(source: str | os.PathLike, **hub_kwargs) -> WanFamily:
    r"""
    The family of a diffusers folder or Hub repo, from its `model_index.json` and the transformer and VAE configs,
    before any weights load. Known Hub checkpoints (`WanFamily.repo_ids`) need no download; other repos download
    those three small files.

    Raises:
        [`UnsupportedModelError`]: not a Wan pipeline of a known family (the message names what it is).
        `OSError`: the files cannot be read (a folder without `model_index.json`, no network for an unknown repo).
    """
    source = os.fspath(source)
    local = os.path.isdir(source)
    if not local and source.lower() in _BY_REPO_ALL:
        return _BY_REPO_ALL[source.lower()]
    index = _read_json(source, "model_index.json", local, hub_kwargs)
    if index is None:
        raise OSError(f"{source} has no model_index.json: not a diffusers pipeline")
    name = index.get("_class_name")

    def present(component: str) -> bool:
        entry = index.get(component)
        return isinstance(entry, list) and len(entry) == 2 and entry[0] is not None

    if name in HUNYUAN_VIDEO15_PIPELINE_CLASSES:
        i2v = name == "HunyuanVideo15ImageToVideoPipeline" or present("image_encoder")
        return HUNYUAN_VIDEO15_FAMILIES["hunyuanvideo1.5-i2v" if i2v else "hunyuanvideo1.5-t2v"]
    if name not in PIPELINE_CLASSES:
        raise UnsupportedModelError(
            f"{source} is a {name} model; LongVideoPipeline runs the Wan families "
            f"{', '.join(f.title for f in WAN_FAMILIES.values())} and "
            f"{', '.join(f.title for f in HUNYUAN_VIDEO15_FAMILIES.values())}"
        )

    first = "transformer" if present("transformer") else "transformer_2"
    transformer = _read_json(source, f"{first}/config.json", local, hub_kwargs)
    vae = _read_json(source, "vae/config.json", local, hub_kwargs)
    if transformer is None or vae is None:
        raise OSError(f"{source} lacks {first}/config.json or vae/config.json")
    return family_from_configs(
        in_channels=transformer.get("in_channels", 16),
        z_dim=vae.get("z_dim", 16),
        has_transformer_2=present("transformer_2"),
        boundary_ratio=index.get("boundary_ratio"),
        expand_timesteps=bool(index.get("expand_timesteps", False)),
        image_dim=transformer.get("image_dim"),
        pos_embed_seq_len=transformer.get("pos_embed_seq_len"),
    )


#: diffusers pipelines whose folders hold a HunyuanVideo 1.5 model `HunyuanVideo15LongVideoPipeline` can load.
HUNYUAN_VIDEO15_PIPELINE_CLASSES = (
    "HunyuanVideo15Pipeline",
    "HunyuanVideo15ImageToVideoPipeline",
    "HunyuanVideo15LongVideoPipeline",
)
_HUNYUAN_VIDEO15_REPOS = {repo.lower() for f in HUNYUAN_VIDEO15_FAMILIES.values() for repo in f.repo_ids}


def is_hunyuan_video15_source(source: str | os.PathLike) -> bool:
    """Whether a local diffusers folder (its `model_index.json`) or a known Hub checkpoint holds a HunyuanVideo 1.5
    pipeline; no download is made (an unknown Hub repo answers `False`)."""
    source = os.fspath(source)
    if not os.path.isdir(source):
        return source.lower() in _HUNYUAN_VIDEO15_REPOS
    index = _read_json(source, "model_index.json", True, {})
    return index is not None and index.get("_class_name") in HUNYUAN_VIDEO15_PIPELINE_CLASSES
