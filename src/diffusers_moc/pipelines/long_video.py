"""`LongVideoPipeline`: multi-shot long videos on Wan 2.1 and Wan 2.2 models with Mixture of Contexts.

All shots are denoised together as one latent sequence (the shots' latents concatenated in time). MoC self-attention
uses latent frames as chunks and shots as shot ids; cross-attention is shot-aware: each video token attends to its own
shot's caption plus the global caption (per-shot caption anchors). The model family (`diffusers_moc.model_families`)
decides the rest: two experts switched at `boundary_ratio` (Wan 2.2 A14B), per-token timesteps and a 16x VAE (TI2V-5B),
and how a start image conditions the first shot (`pipelines.conditioning`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKLWan, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import PipelineImageInput
from diffusers.loaders import WanLoraLoaderMixin
from diffusers.utils import BaseOutput, logging, replace_example_docstring
from diffusers.utils.torch_utils import get_module_execution_device, randn_tensor
from diffusers.video_processor import VideoProcessor
from transformers import AutoTokenizer, CLIPVisionModel, UMT5EncoderModel

from ..captions import encode_caption
from ..core.apply import apply_moc, get_moc_config, pipeline_transformers, update_moc_config
from ..core.config import MoCConfig
from ..core.context import moc_context
from ..core.parallel import check_ulysses_divisible, sequence_shard
from ..model_families import WanFamily, family_of_pipeline, is_hunyuan_video15_source
from ..shot_plan import ShotPlan, plan_shots
from .conditioning import ImageCondition, prepare_image_condition

if TYPE_CHECKING:  # imported for annotations only: without torchvision, importing it prints a warning
    from transformers import CLIPImageProcessor

__all__ = [
    "LongVideoPipeline",
    "LongVideoPipelineOutput",
    "Shot",
    "check_shot_frames",
    "frames_for_seconds",
    "video_tokens",
]

logger = logging.get_logger(__name__)

OUTPUT_TYPES = ("np", "pt", "pil", "latent")

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from diffusers.utils import export_to_video
        >>> from diffusers_moc import MoCConfig
        >>> from diffusers_moc.pipelines import LongVideoPipeline, Shot

        >>> pipe = LongVideoPipeline.from_pretrained("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", dtype=torch.bfloat16)
        >>> pipe.vae.to(torch.float32)
        >>> pipe.to("cuda")
        >>> out = pipe(
        ...     shots=[
        ...         Shot("a man walks on a beach at sunset, wide shot", seconds=5),
        ...         Shot("close up of the man smiling", seconds=5),
        ...     ],
        ...     global_prompt="cinematic, 35mm film",
        ...     fps=16,
        ...     moc_config=MoCConfig(top_k=5, anchor_own_shot=True, causal=True),
        ...     generator=torch.Generator("cuda").manual_seed(0),
        ... )
        >>> export_to_video(out.frames[0], "long.mp4", fps=16)
        >>> out.shot_starts  # frame index where each shot starts
        [0, 81]
        ```
"""


# ---------------------------------------------------------------------------------------------------- shots


def check_shot_frames(num_frames: int, name: str = "num_frames", temporal_factor: int = 4) -> int:
    r"""
    Check that a shot's pixel frame count can be decoded by the Wan VAE (`temporal_factor * n + 1`).

    Returns:
        `int`: the number of latent frames, `(num_frames - 1) // temporal_factor + 1`.
    """
    if isinstance(num_frames, bool) or not isinstance(num_frames, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {num_frames!r}")
    if num_frames < 1:
        raise ValueError(f"{name} must be at least 1 frame, got {num_frames}")
    if (num_frames - 1) % temporal_factor:
        lower = (num_frames - 1) // temporal_factor * temporal_factor + 1
        raise ValueError(
            f"{name}={num_frames} cannot be decoded by the Wan VAE: pixel frames must be {temporal_factor}n+1 "
            f"(e.g. {lower} or {lower + temporal_factor})"
        )
    return (int(num_frames) - 1) // temporal_factor + 1


def frames_for_seconds(seconds: float, fps: float, temporal_factor: int = 4) -> int:
    r"""
    Pixel frames of a shot of `seconds` at `fps`: the nearest `temporal_factor * n + 1` to `seconds * fps + 1`.

    Wan's 81-frame clips are "5 seconds at 16 fps": `frames_for_seconds(5, 16) == 81`.
    """
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"seconds must be a positive number, got {seconds!r}")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    return temporal_factor * round(seconds * fps / temporal_factor) + 1


@dataclass(frozen=True)
class Shot:
    r"""
    One shot of a long video.

    Args:
        prompt (`str`): the shot's caption (its caption anchor in cross-attention).
        num_frames (`int`, *optional*): pixel frames, `4n + 1` for the Wan VAE (81 = 5 s at 16 fps).
        seconds (`float`, *optional*): length in seconds instead of frames; rounded to the nearest `4n + 1` frames
            at the pipeline's `fps`. Give exactly one of `num_frames` and `seconds`.
    """

    prompt: str
    num_frames: int | None = None
    seconds: float | None = None

    def __post_init__(self):
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError(f"Shot.prompt must be a non-empty string, got {self.prompt!r}")
        if (self.num_frames is None) == (self.seconds is None):
            raise ValueError(
                f"a Shot needs exactly one of num_frames and seconds, got num_frames={self.num_frames!r}, "
                f"seconds={self.seconds!r}"
            )
        if self.num_frames is not None:
            check_shot_frames(self.num_frames, "Shot.num_frames")
        else:
            frames_for_seconds(self.seconds, 1.0)  # validates seconds

    def frames(self, fps: float, temporal_factor: int = 4) -> int:
        """Pixel frames of this shot at `fps`."""
        if self.num_frames is not None:
            return int(self.num_frames)
        return frames_for_seconds(self.seconds, fps, temporal_factor)


def _as_shot(i: int, shot: Shot | dict | str, default_frames: int) -> Shot:
    if isinstance(shot, Shot):
        return shot
    if isinstance(shot, str):
        return Shot(shot, num_frames=default_frames)
    if isinstance(shot, dict):
        unknown = sorted(set(shot) - {"prompt", "num_frames", "seconds"})
        if unknown:
            raise ValueError(f"shots[{i}] has unknown keys {unknown}; known keys are prompt, num_frames, seconds")
        if "prompt" not in shot:
            raise ValueError(f"shots[{i}] has no prompt")
        if shot.get("num_frames") is None and shot.get("seconds") is None:
            shot = {**shot, "num_frames": default_frames}
        try:
            return Shot(**shot)
        except ValueError as e:
            raise ValueError(f"shots[{i}]: {e}") from None
    raise TypeError(f"shots[{i}] must be a Shot, a dict or a prompt string, got {type(shot).__name__}")


def video_tokens(latent_frames: int, height: int, width: int, spatial: int, patch: Sequence[int]) -> int:
    r"""
    Tokens of `latent_frames` latent frames of `height` x `width` pixels in the transformer's sequence: the VAE
    compresses `spatial`x in space, the transformer cuts `patch = (t, h, w)` patches.
    """
    return (latent_frames // patch[0]) * (height // spatial // patch[1]) * (width // spatial // patch[2])


# ---------------------------------------------------------------------------------------------------- output


@dataclass
class LongVideoPipelineOutput(BaseOutput):
    r"""
    Output of [`LongVideoPipeline`].

    Args:
        frames (`np.ndarray`, `torch.Tensor`, `list[list[PIL.Image.Image]]` or `None`):
            All shots one after the other: `(batch, frames, height, width, 3)` for `"np"`, `(batch, frames, 3,
            height, width)` for `"pt"`, a list of frame lists for `"pil"`, and the latents `(batch, channels,
            latent_frames, height, width)` for `"latent"`. `None` on the processes of a context-parallel group
            other than its first, which alone decodes.
        shot_starts (`list[int]`): index along the frame axis of `frames` where each shot starts (latent frames for
            `"latent"`).
    """

    frames: np.ndarray | torch.Tensor | list[list[PIL.Image.Image]] | None
    shot_starts: list[int]


def _use_moc(transformer: torch.nn.Module, moc_config: MoCConfig | None) -> MoCConfig:
    """Apply MoC when the transformer has none; set `moc_config` when given and different. Returns the config."""
    if moc_config is not None and not isinstance(moc_config, MoCConfig):
        raise TypeError(f"moc_config must be a MoCConfig, got {type(moc_config).__name__}")
    current = get_moc_config(transformer)
    if current is None:
        apply_moc(transformer, moc_config)
    elif moc_config is not None and moc_config != current:
        update_moc_config(transformer, **moc_config.to_dict())
    return get_moc_config(transformer)


def _use_moc_on_all(pipe, moc_config: MoCConfig | None) -> dict[str, MoCConfig]:
    """`_use_moc` on every transformer of the pipeline; without `moc_config`, one that has no MoC yet gets the config
    another one already runs (all shots must reach every expert). Returns the configs by component."""
    if moc_config is None:
        running = list(get_moc_config(pipe).values())
        moc_config = running[0] if running else None
    return {name: _use_moc(t, moc_config) for name, t in pipeline_transformers(pipe).items()}


# ---------------------------------------------------------------------------------------------------- pipeline


@dataclass(frozen=True)
class _Conditioning:
    r"""
    What every denoising step conditions on.

    Attributes:
        plan ([`ShotPlan`]): the shots and their captions (what MoC is told).
        prompt_embeds (`torch.Tensor`): the conditional text context, in the plan's caption layout.
        negative_prompt_embeds (`torch.Tensor`, *optional*): the negative prompt's (with guidance).
        image ([`ImageCondition`]): the image conditioning of the first shot.
        image_embeds (`torch.Tensor`, *optional*): `image.image_embeds` in the transformer's dtype (Wan 2.1 I2V).
    """

    plan: ShotPlan
    prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None
    image: ImageCondition
    image_embeds: torch.Tensor | None


class LongVideoPipeline(DiffusionPipeline, WanLoraLoaderMixin):
    r"""
    Multi-shot long-video generation with Wan 2.1 or Wan 2.2 and Mixture-of-Contexts attention.

    The components are those of diffusers' `WanPipeline` and `WanImageToVideoPipeline`, so `from_pretrained` loads
    every Wan family's diffusers folder: Wan 2.1 T2V and I2V, Wan 2.2 T2V-A14B and I2V-A14B (two experts,
    `transformer` for high noise and `transformer_2` for low noise, switched at `boundary_ratio`, with
    `guidance_scale_2`), Wan 2.2 TI2V-5B (`expand_timesteps`, a 48-channel VAE that compresses 16x in space).

    All shots are denoised together as one latent sequence. Self-attention is MoC routing with latent frames as chunks
    and shots as shot ids; cross-attention gives each video token its own shot's caption plus the global caption
    (per-shot caption anchors). With `MoCConfig(causal=True)` the routing is a DAG in shot order, so a shot never
    depends on later shots. An `image` starts the first shot, conditioned as the family's diffusers pipeline
    conditions its image (`pipelines.conditioning`).

    Memory: attention memory is linear in the sequence length (MoC backends), each distinct caption is encoded once,
    and the VAE decodes shot by shot.

    Several GPUs: after `enable_parallelism(config=ContextParallelConfig(ulysses_degree=N))` on every transformer
    (both experts on Wan 2.2 A14B; [`~diffusers_moc.distributed.enable_context_parallel`] does it), every process
    denoises the same latents as one process would, given the same seed. Only the first process of the group decodes
    them: it returns the frames, the others return `frames=None` (with `output_type="latent"` every process returns
    the latents).

    Args:
        tokenizer ([`T5Tokenizer`]): tokenizer of the text encoder.
        text_encoder ([`UMT5EncoderModel`]): the text encoder (umt5-xxl for Wan).
        vae ([`AutoencoderKLWan`]): the Wan video VAE.
        scheduler ([`FlowMatchEulerDiscreteScheduler`] or [`UniPCMultistepScheduler`]): the denoising scheduler.
        transformer ([`WanTransformer3DModel`]): the denoiser (Wan 2.2 A14B: the high-noise expert); MoC is applied
            to it on the first call.
        transformer_2 ([`WanTransformer3DModel`], *optional*): Wan 2.2 A14B's low-noise expert.
        image_encoder ([`CLIPVisionModel`], *optional*), image_processor ([`CLIPImageProcessor`], *optional*): Wan 2.1
            I2V's image encoder.
        boundary_ratio (`float`, *optional*): with `transformer_2`, timesteps below `boundary_ratio *
            num_train_timesteps` run `transformer_2`.
        expand_timesteps (`bool`, defaults to `False`): per-token timesteps (Wan 2.2 TI2V-5B).
    """

    model_cpu_offload_seq = "text_encoder->image_encoder->transformer->transformer_2->vae"
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]
    _optional_components = ["transformer", "transformer_2", "image_encoder", "image_processor"]

    def __init__(
        self,
        tokenizer: AutoTokenizer,
        text_encoder: UMT5EncoderModel,
        vae: AutoencoderKLWan,
        scheduler: FlowMatchEulerDiscreteScheduler,
        transformer: WanTransformer3DModel | None = None,
        transformer_2: WanTransformer3DModel | None = None,
        image_encoder: CLIPVisionModel | None = None,
        image_processor: CLIPImageProcessor | None = None,
        boundary_ratio: float | None = None,
        expand_timesteps: bool = False,
    ):
        super().__init__()
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            transformer=transformer,
            scheduler=scheduler,
            transformer_2=transformer_2,
            image_encoder=image_encoder,
            image_processor=image_processor,
        )
        self.register_to_config(boundary_ratio=boundary_ratio, expand_timesteps=expand_timesteps)
        self.vae_scale_factor_temporal = self.vae.config.scale_factor_temporal if getattr(self, "vae", None) else 4
        self.vae_scale_factor_spatial = self.vae.config.scale_factor_spatial if getattr(self, "vae", None) else 8
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor_spatial)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        r"""
        diffusers' `from_pretrained`; a HunyuanVideo 1.5 folder (of `HunyuanVideo15Pipeline` or
        `HunyuanVideo15ImageToVideoPipeline`, or a known Hub checkpoint of them) loads as
        [`HunyuanVideo15LongVideoPipeline`], which is called the same way.
        """
        if cls is LongVideoPipeline and is_hunyuan_video15_source(pretrained_model_name_or_path):
            from .hunyuan_video15 import HunyuanVideo15LongVideoPipeline  # noqa: PLC0415  (it imports this module)

            return HunyuanVideo15LongVideoPipeline.from_pretrained(pretrained_model_name_or_path, **kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    # ------------------------------------------------------------------------------------------------ properties
    @property
    def family(self) -> WanFamily:
        """The Wan model family of the components (see `diffusers_moc.model_families`)."""
        return family_of_pipeline(self)

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def guidance_scale_2(self) -> float | None:
        return self._guidance_scale_2

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1.0

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def current_timestep(self):
        return self._current_timestep

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    @property
    def attention_kwargs(self) -> dict[str, Any] | None:
        return self._attention_kwargs

    def _denoiser(self) -> torch.nn.Module:
        """A transformer of the pipeline (for config and dtype): `transformer`, or `transformer_2` alone."""
        return self.transformer if self.transformer is not None else self.transformer_2

    # ------------------------------------------------------------------------------------------------ text, image
    def _encode_caption(
        self, caption: str, max_sequence_length: int, device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        """T5 embeddings `(1, max_sequence_length, dim)` of one caption, zero-padded past its length as Wan does."""
        return encode_caption(self.tokenizer, self.text_encoder, caption, max_sequence_length, device, dtype)

    def encode_captions(
        self,
        captions: Sequence[str],
        max_sequence_length: int = 512,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> dict[str, torch.Tensor]:
        r"""
        Encode each distinct caption once (one text-encoder call per caption, so a caption's embedding never depends
        on the other captions).

        Returns:
            `dict[str, torch.Tensor]`: caption -> embeddings `(1, max_sequence_length, dim)`.
        """
        device = device or self._execution_device
        dtype = dtype or self.text_encoder.dtype
        cache: dict[str, torch.Tensor] = {}
        for caption in captions:
            if caption not in cache:
                cache[caption] = self._encode_caption(caption, max_sequence_length, device, dtype)
        return cache

    def encode_image(self, image: PipelineImageInput, device: torch.device | None = None) -> torch.Tensor:
        """CLIP image tokens `(1, n, dim)` of `image`, as `WanImageToVideoPipeline.encode_image` computes them."""
        device = device or self._execution_device
        inputs = self.image_processor(images=image, return_tensors="pt").to(
            get_module_execution_device(self.image_encoder)
        )
        return self.image_encoder(**inputs, output_hidden_states=True).hidden_states[-2].to(device)

    # ------------------------------------------------------------------------------------------------ MoC
    def _prepare_moc(self, moc_config: MoCConfig | None) -> dict[str, MoCConfig]:
        return _use_moc_on_all(self, moc_config)

    # ------------------------------------------------------------------------------------------------ checks
    def default_settings(self) -> dict[str, Any]:
        r"""
        The family's defaults for `height`, `width`, `num_frames`, `fps`, `num_inference_steps`, `guidance_scale`
        (and `guidance_scale_2` with two experts): those of its model card (e.g. 24 fps on Wan 2.2 TI2V-5B).
        """
        return dict(self.family.defaults)

    def check_inputs(
        self,
        shots: Sequence[Shot | dict | str],
        global_prompt: str | None,
        negative_prompt: str | None,
        height: int,
        width: int,
        num_frames: int,
        fps: float,
        num_inference_steps: int,
        num_videos_per_prompt: int,
        output_type: str,
        max_sequence_length: int,
        callback_on_step_end_tensor_inputs: list[str] | None,
        image: PipelineImageInput | None = None,
        guidance_scale_2: float | None = None,
    ) -> list[Shot]:
        r"""Validate the call's arguments; returns the shots as [`Shot`]s."""
        if isinstance(shots, (str, Shot, dict)) or not isinstance(shots, Sequence):
            raise TypeError(f"shots must be a list of Shot, dict or prompt strings, got {type(shots).__name__}")
        if len(shots) == 0:
            raise ValueError("shots is empty; give at least one shot")
        check_shot_frames(num_frames, "num_frames", self.vae_scale_factor_temporal)
        shots = [_as_shot(i, s, num_frames) for i, s in enumerate(shots)]
        for i, shot in enumerate(shots):
            check_shot_frames(shot.frames(fps, self.vae_scale_factor_temporal), f"shots[{i}].num_frames")
        for name, value in (("global_prompt", global_prompt), ("negative_prompt", negative_prompt)):
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{name} must be a string or None, got {type(value).__name__}")
        if global_prompt is not None and not global_prompt.strip():
            raise ValueError("global_prompt is empty; pass None for no global caption")
        self._check_image(image, guidance_scale_2)
        self._check_size(shots, height, width, fps)
        for name, value in (
            ("num_inference_steps", num_inference_steps),
            ("num_videos_per_prompt", num_videos_per_prompt),
            ("max_sequence_length", max_sequence_length),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {list(OUTPUT_TYPES)}, got {output_type!r}")
        if callback_on_step_end_tensor_inputs is not None:
            bad = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
            if bad:
                raise ValueError(
                    f"callback_on_step_end_tensor_inputs has to be in {self._callback_tensor_inputs}, but found {bad}"
                )
        return shots

    def _check_image(self, image, guidance_scale_2) -> None:
        family = self.family
        if image is not None and not isinstance(image, (PIL.Image.Image, np.ndarray, torch.Tensor)):
            raise TypeError(f"image must be a PIL image, a numpy array or a tensor, got {type(image).__name__}")
        if image is not None and not family.takes_image:
            raise ValueError(
                f"image: this is a {family.title} model (text to video); an image start needs an image-to-video "
                "model (Wan 2.1 I2V, Wan 2.2 I2V-A14B or TI2V-5B)"
            )
        if image is None and family.image == "required":
            raise ValueError(f"image is required: {family.title} is an image-to-video model; pass the first frame")
        if family.image_encoder and (self.image_encoder is None or self.image_processor is None):
            raise ValueError(f"{family.title} needs its image_encoder and image_processor components")
        if guidance_scale_2 is not None and not family.experts:
            raise ValueError(f"guidance_scale_2 is for two-expert models (Wan 2.2 A14B), not {family.title}")

    def _check_size(self, shots: list[Shot], height: int, width: int, fps: float) -> None:
        patch = self._denoiser().config.patch_size
        multiple = self.vae_scale_factor_spatial * patch[1]
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % multiple:
                raise ValueError(f"{name} must be a positive multiple of {multiple}, got {value!r}")
        # Wan's RoPE tables have rope_max_seq_len positions per axis; past that the model cannot place a token.
        rope_len = self._denoiser().config.rope_max_seq_len
        total = sum(
            (s.frames(fps, self.vae_scale_factor_temporal) - 1) // self.vae_scale_factor_temporal + 1 for s in shots
        )
        if total // patch[0] > rope_len:
            raise ValueError(
                f"the shots have {total} latent frames in total but the transformer's rotary embeddings cover "
                f"{rope_len} (rope_max_seq_len); use fewer or shorter shots"
            )
        for name, value in (("height", height), ("width", width)):
            if value // multiple > rope_len:
                raise ValueError(
                    f"{name}={value} is {value // multiple} patches, more than rope_max_seq_len={rope_len}"
                )
        _, degree = self._context_parallel()
        if degree > 1:
            tokens = video_tokens(total, height, width, self.vae_scale_factor_spatial, patch)
            check_ulysses_divisible(degree, self._denoiser().config.num_attention_heads, tokens)

    def _context_parallel(self) -> tuple[int, int]:
        """`(rank, degree)` of this process in the transformers' Ulysses group; `(0, 1)` without one."""
        for transformer in pipeline_transformers(self).values():
            rank, degree = sequence_shard(getattr(transformer, "_parallel_config", None))
            if degree > 1:
                return rank, degree
        return 0, 1

    # ------------------------------------------------------------------------------------------------ latents
    def prepare_latents(
        self,
        shot_latent_frames: Sequence[int],
        batch_size: int,
        num_channels_latents: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        r"""
        Initial noise, drawn shot by shot and concatenated in time.

        Drawing per shot keeps a shot's noise independent of the other shots' lengths: shot 1 gets exactly the noise
        `WanPipeline` would draw for it alone with the same generator.
        """
        h, w = height // self.vae_scale_factor_spatial, width // self.vae_scale_factor_spatial
        shape = (batch_size, num_channels_latents, sum(shot_latent_frames), h, w)
        if latents is not None:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents must have shape {shape} for these shots, got {tuple(latents.shape)}")
            return latents.to(device=device, dtype=dtype)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"got {len(generator)} generators for a batch of {batch_size} videos")
        parts = [
            randn_tensor((batch_size, num_channels_latents, f, h, w), generator=generator, device=device, dtype=dtype)
            for f in shot_latent_frames
        ]
        return torch.cat(parts, dim=2)

    def _decode(self, latents: torch.Tensor, output_type: str):
        vae_device = get_module_execution_device(self.vae)
        latents = latents.to(vae_device, dtype=self.vae.dtype)
        mean = torch.tensor(self.vae.config.latents_mean).view(1, self.vae.config.z_dim, 1, 1, 1)
        std = 1.0 / torch.tensor(self.vae.config.latents_std).view(1, self.vae.config.z_dim, 1, 1, 1)
        latents = latents / std.to(latents.device, latents.dtype) + mean.to(latents.device, latents.dtype)
        video = self.vae.decode(latents, return_dict=False)[0]
        return self.video_processor.postprocess_video(video, output_type=output_type)

    def _decode_shots(self, latents: torch.Tensor, plan: ShotPlan, output_type: str, batch_size: int):
        """Decode shot by shot: VAE memory is that of one shot, and each shot is a clip the VAE was trained on."""
        if output_type == "latent":
            return latents
        bounds = [*plan.latent_starts, sum(plan.latent_frames)]
        parts = [self._decode(latents[:, :, a:b], output_type) for a, b in zip(bounds[:-1], bounds[1:])]
        if output_type == "np":
            return np.concatenate(parts, axis=1)
        if output_type == "pt":
            return torch.cat(parts, dim=1)
        return [[frame for part in parts for frame in part[b]] for b in range(batch_size)]

    # ------------------------------------------------------------------------------------------------ call
    def _encode_prompts(
        self, plan: ShotPlan, negative_prompt: str | None, batch_size: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        r"""
        The conditional text context of `plan` (each distinct caption once, in the plan's caption layout: the context
        `diffusers-moc train` conditions on) and, with guidance, the negative prompt's. Each caption is encoded once.

        Returns:
            `(prompt_embeds, negative_prompt_embeds)`, as `WanPipeline.encode_prompt`; the second is `None` without
            guidance.
        """
        captions = list(plan.captions.segments)
        if self.do_classifier_free_guidance:
            captions.append(negative_prompt or "")
        embeds = self.encode_captions(captions, plan.captions.max_sequence_length, device)
        prompt_embeds = torch.cat([embeds[c] for c in plan.captions.segments], dim=1).to(dtype).repeat(batch_size, 1, 1)
        negative_prompt_embeds = None
        if self.do_classifier_free_guidance:
            negative_prompt_embeds = embeds[negative_prompt or ""].to(dtype).repeat(batch_size, 1, 1)
        return prompt_embeds, negative_prompt_embeds

    def _expert(self, t: torch.Tensor, step: int) -> tuple[torch.nn.Module, float]:
        """The transformer and guidance scale of timestep `t`, as `WanPipeline` switches Wan 2.2's experts."""
        boundary = self.config.boundary_ratio
        if boundary is None or t >= boundary * self.scheduler.config.num_train_timesteps:
            name, model, scale = "transformer", self.transformer, self._guidance_scale
        else:
            name, model, scale = "transformer_2", self.transformer_2, self._guidance_scale_2
        if model is None:
            raise ValueError(f"denoising step {step} (timestep {float(t):g}) runs {name}, which this pipeline lacks")
        return model, scale

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        shots: Sequence[Shot | dict | str],
        global_prompt: str | None = None,
        negative_prompt: str | None = None,
        image: PipelineImageInput | None = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        fps: float | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        guidance_scale_2: float | None = None,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        moc_config: MoCConfig | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[[int, int], None] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006  (diffusers' signature)
        max_sequence_length: int = 512,
    ) -> LongVideoPipelineOutput | tuple:
        r"""
        Generate one video made of several shots.

        Settings left at `None` take the model family's defaults ([`~LongVideoPipeline.default_settings`]): Wan 2.1
        480x832, 81 frames at 16 fps, 50 steps, guidance 5.0; Wan 2.2 T2V-A14B 720x1280, 81 frames at 16 fps, 40
        steps, guidance 4.0 and 3.0; TI2V-5B 704x1280, 121 frames at 24 fps, 50 steps, guidance 5.0.

        Args:
            shots (`list[Shot | dict | str]`):
                The shots in order: [`Shot`]s, dicts with `prompt` and `num_frames` or `seconds`, or plain prompts
                (which get `num_frames` frames). Each shot's pixel frames must be `4n + 1`.
            global_prompt (`str`, *optional*):
                Caption attended by every shot (style, characters, setting), next to the shot's own caption.
            negative_prompt (`str`, *optional*):
                Negative prompt for classifier-free guidance (used for every shot); `""` when not given.
            image (`PIL.Image.Image`, `np.ndarray` or `torch.Tensor`, *optional*):
                The first frame of the first shot, for image-to-video models: required by Wan 2.1 I2V and Wan 2.2
                I2V-A14B, optional for TI2V-5B, refused by text-to-video models. Resized to `height` x `width`.
            height (`int`, *optional*) / width (`int`, *optional*):
                Size in pixels, multiples of the VAE's spatial factor times the patch size (16; 32 for TI2V-5B).
            num_frames (`int`, *optional*): frames of shots given as plain prompts.
            fps (`float`, *optional*): frame rate used to turn `seconds` into frames.
            num_inference_steps (`int`, *optional*): denoising steps.
            guidance_scale (`float`, *optional*): classifier-free guidance scale (of the high-noise expert on Wan 2.2
                A14B); off at `<= 1`.
            guidance_scale_2 (`float`, *optional*): guidance scale of the low-noise expert (`transformer_2`); Wan
                2.2 A14B only. `None`: `guidance_scale` when that is given (as `WanPipeline`), else the default.
            num_videos_per_prompt (`int`, defaults to 1): videos generated (the batch size).
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): for deterministic noise.
            latents (`torch.Tensor`, *optional*): initial noise `(batch, channels, latent_frames, h, w)` of all
                shots concatenated in time.
            moc_config (`MoCConfig`, *optional*):
                MoC settings. Applied with `apply_moc` to every transformer without MoC yet (`MoCConfig()` when
                `None`), or set on the applied processors when different.
            output_type (`str`, defaults to `"np"`): `"np"`, `"pt"`, `"pil"` or `"latent"`.
            return_dict (`bool`, defaults to `True`): return a [`LongVideoPipelineOutput`] instead of a tuple.
            attention_kwargs (`dict`, *optional*): passed to the transformer (e.g. LoRA `scale`).
            callback_on_step_end (`Callable`, `PipelineCallback` or `MultiPipelineCallbacks`, *optional*):
                Called at the end of each step as `callback_on_step_end(self, step, timestep, callback_kwargs)`;
                may return replacements for the tensors in `callback_kwargs`.
            callback_on_step_end_tensor_inputs (`list[str]`, defaults to `["latents"]`):
                Tensors passed in `callback_kwargs`; any of `latents`, `prompt_embeds`, `negative_prompt_embeds`.
            max_sequence_length (`int`, defaults to 512): text tokens per caption (Wan uses 512).

        Examples:

        Returns:
            [`LongVideoPipelineOutput`] or `tuple`: `(frames, shot_starts)` when `return_dict` is `False`.
        """
        # 1. Check inputs; settings left at None take the model family's defaults. Plan the shots.
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        defaults = self.default_settings()
        if guidance_scale_2 is None and self.family.experts:  # as WanPipeline: guidance_scale alone sets both
            guidance_scale_2 = defaults["guidance_scale_2"] if guidance_scale is None else guidance_scale
        height = defaults["height"] if height is None else height
        width = defaults["width"] if width is None else width
        num_frames = defaults["num_frames"] if num_frames is None else num_frames
        fps = defaults["fps"] if fps is None else fps
        num_inference_steps = defaults["num_inference_steps"] if num_inference_steps is None else num_inference_steps
        guidance_scale = defaults["guidance_scale"] if guidance_scale is None else guidance_scale
        shots = self.check_inputs(
            shots,
            global_prompt,
            negative_prompt,
            height,
            width,
            num_frames,
            fps,
            num_inference_steps,
            num_videos_per_prompt,
            output_type,
            max_sequence_length,
            callback_on_step_end_tensor_inputs,
            image=image,
            guidance_scale_2=guidance_scale_2,
        )
        temporal = self.vae_scale_factor_temporal
        pixel_frames = [s.frames(fps, temporal) for s in shots]
        # The same plan `diffusers-moc train` builds for a sample (see `diffusers_moc.shot_plan`).
        plan = plan_shots(pixel_frames, global_prompt, [s.prompt for s in shots], max_sequence_length, temporal)
        self._prepare_moc(moc_config)
        self._guidance_scale, self._guidance_scale_2 = guidance_scale, guidance_scale_2
        self._attention_kwargs = attention_kwargs
        self._current_timestep = None
        self._interrupt = False
        device = self._execution_device
        transformer_dtype = self._denoiser().dtype
        batch_size = num_videos_per_prompt

        # 2. Encode the captions: each distinct caption once, in the plan's caption layout.
        prompt_embeds, negative_prompt_embeds = self._encode_prompts(
            plan, negative_prompt, batch_size, device, transformer_dtype
        )

        # 3. Prepare timesteps, the noise (shot by shot) and the image conditioning of the first shot.
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        z_dim = self.vae.config.z_dim
        latents = self.prepare_latents(
            plan.latent_frames, batch_size, z_dim, height, width, torch.float32, device, generator, latents
        )
        condition = prepare_image_condition(
            self, image, plan.pixel_frames, plan.latent_frames, batch_size, height, width, device
        )
        image_embeds = None if condition.image_embeds is None else condition.image_embeds.to(transformer_dtype)

        # 4. Denoise all shots at once.
        conditioning = _Conditioning(plan, prompt_embeds, negative_prompt_embeds, condition, image_embeds)
        latents = self._denoise(
            latents,
            timesteps,
            num_inference_steps,
            conditioning,
            callback_on_step_end,
            callback_on_step_end_tensor_inputs,
        )
        latents = condition.replace_first_frame(latents)

        # 5. Decode shot by shot. Under context parallelism every process holds the same latents: the first decodes.
        if output_type != "latent" and self._context_parallel()[0] != 0:
            video = None
        else:
            video = self._decode_shots(latents, plan, output_type, batch_size)
        shot_starts = plan.latent_starts if output_type == "latent" else plan.shot_starts
        self.maybe_free_model_hooks()
        if not return_dict:
            return video, shot_starts
        return LongVideoPipelineOutput(frames=video, shot_starts=shot_starts)

    def _denoise(
        self,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        num_inference_steps: int,
        conditioning: _Conditioning,
        callback_on_step_end: Callable | None,
        callback_on_step_end_tensor_inputs: list[str],
    ) -> torch.Tensor:
        """The denoising loop, as `WanPipeline`'s (progress bar, interrupt, step-end callbacks)."""
        num_warmup_steps = len(timesteps) - num_inference_steps * self.scheduler.order
        self._num_timesteps = len(timesteps)
        self.scheduler.set_begin_index(0)
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                self._current_timestep = t
                noise_pred = self._predict_noise(latents, t, i, conditioning)
                latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]

                if callback_on_step_end is not None:
                    tensors = {
                        "latents": latents,
                        "prompt_embeds": conditioning.prompt_embeds,
                        "negative_prompt_embeds": conditioning.negative_prompt_embeds,
                    }
                    callback_kwargs = {k: tensors[k] for k in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                    conditioning = replace(
                        conditioning,
                        prompt_embeds=callback_outputs.pop("prompt_embeds", conditioning.prompt_embeds),
                        negative_prompt_embeds=callback_outputs.pop(
                            "negative_prompt_embeds", conditioning.negative_prompt_embeds
                        ),
                    )

                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()
        self._current_timestep = None
        return latents

    def _predict_noise(self, latents: torch.Tensor, t: torch.Tensor, step: int, conditioning: _Conditioning):
        r"""
        The guided noise prediction of denoising step `step`, MoC told where the shots are: the conditional pass with
        each shot's caption spans, the unconditional pass on the negative prompt (one caption for every shot: stock
        cross-attention, shot-aware MoC self-attention).
        """
        model, scale = self._expert(t, step)
        plan, image_embeds = conditioning.plan, conditioning.image_embeds
        # Image tokens lead the cross-attention context of Wan 2.1 I2V; MoC's processor splits them off.
        image_tokens = None if image_embeds is None else image_embeds.shape[1]
        cache_kwargs = {
            "step_index": step,
            "sigma": float(self.scheduler.sigmas[step]),
            "num_inference_steps": self._num_timesteps,
        }
        call = dict(
            hidden_states=conditioning.image.model_input(latents).to(self._denoiser().dtype),
            timestep=conditioning.image.timestep(t, latents.shape[0], self._denoiser().config.patch_size),
            encoder_hidden_states_image=image_embeds,
            attention_kwargs=self._attention_kwargs,
            return_dict=False,
        )
        with (
            model.cache_context("cond", **cache_kwargs),
            moc_context(**plan.caption_context, image_tokens=image_tokens),
        ):
            noise_pred = model(encoder_hidden_states=conditioning.prompt_embeds, **call)[0]
        if not self.do_classifier_free_guidance:
            return noise_pred
        with (
            model.cache_context("uncond", **cache_kwargs),
            moc_context(**plan.shot_context, image_tokens=image_tokens),
        ):
            noise_uncond = model(encoder_hidden_states=conditioning.negative_prompt_embeds, **call)[0]
        return noise_uncond + scale * (noise_pred - noise_uncond)
