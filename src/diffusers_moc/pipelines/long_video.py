"""`LongVideoPipeline`: multi-shot long videos on a Wan text-to-video model with Mixture of Contexts.

All shots are denoised together as one latent sequence (the shots' latents concatenated in time). MoC self-attention
uses latent frames as chunks and shots as shot ids; cross-attention is shot-aware: each video token attends to its own
shot's caption plus the global caption (per-shot caption anchors).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKLWan, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.loaders import WanLoraLoaderMixin
from diffusers.utils import BaseOutput, logging, replace_example_docstring
from diffusers.utils.torch_utils import get_module_execution_device, randn_tensor
from diffusers.video_processor import VideoProcessor
from transformers import AutoTokenizer, UMT5EncoderModel

from ..apply import apply_moc, get_moc_config, update_moc_config
from ..captions import caption_layout, encode_caption
from ..config import MoCConfig
from ..context import moc_context

__all__ = [
    "LongVideoPipeline",
    "LongVideoPipelineOutput",
    "Shot",
    "check_shot_frames",
    "frames_for_seconds",
    "prepare_moc_transformer",
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


# ---------------------------------------------------------------------------------------------------- output


@dataclass
class LongVideoPipelineOutput(BaseOutput):
    r"""
    Output of [`LongVideoPipeline`].

    Args:
        frames (`np.ndarray`, `torch.Tensor` or `list[list[PIL.Image.Image]]`):
            All shots one after the other: `(batch, frames, height, width, 3)` for `"np"`, `(batch, frames, 3,
            height, width)` for `"pt"`, a list of frame lists for `"pil"`, and the latents `(batch, channels,
            latent_frames, height, width)` for `"latent"`.
        shot_starts (`list[int]`): index along the frame axis of `frames` where each shot starts (latent frames for
            `"latent"`).
    """

    frames: np.ndarray | torch.Tensor | list[list[PIL.Image.Image]]
    shot_starts: list[int]


def prepare_moc_transformer(transformer: torch.nn.Module, moc_config: MoCConfig | None = None) -> MoCConfig:
    r"""
    Deprecated: [`apply_moc`] now installs everything a Wan transformer needs for [`LongVideoPipeline`], the per-shot
    caption cross-attention included. Applies MoC (or sets `moc_config` on the applied processors when it differs).

    Returns:
        `MoCConfig`: the config in use.
    """
    warnings.warn(
        "prepare_moc_transformer is deprecated and will be removed: call apply_moc(transformer, config), which "
        "installs the per-shot caption cross-attention too",
        FutureWarning,
        stacklevel=2,
    )
    return _use_moc(transformer, moc_config)


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


# ---------------------------------------------------------------------------------------------------- pipeline


class LongVideoPipeline(DiffusionPipeline, WanLoraLoaderMixin):
    r"""
    Multi-shot long-video generation with a Wan text-to-video model and Mixture-of-Contexts attention.

    The components are those of diffusers' `WanPipeline` (Wan 2.1 T2V), so
    `LongVideoPipeline.from_pretrained("Wan-AI/Wan2.1-T2V-1.3B-Diffusers")` works.

    All shots are denoised together as one latent sequence. Self-attention is MoC routing with latent frames as chunks
    and shots as shot ids; cross-attention gives each video token its own shot's caption plus the global caption
    (per-shot caption anchors). With `MoCConfig(causal=True)` the routing is a DAG in shot order, so a shot never
    depends on later shots.

    Memory: attention memory is linear in the sequence length (MoC backends), each distinct caption is encoded once,
    and the VAE decodes shot by shot.

    Args:
        tokenizer ([`T5Tokenizer`]): tokenizer of the text encoder.
        text_encoder ([`UMT5EncoderModel`]): the text encoder (umt5-xxl for Wan).
        vae ([`AutoencoderKLWan`]): the Wan video VAE.
        scheduler ([`FlowMatchEulerDiscreteScheduler`] or [`UniPCMultistepScheduler`]): the denoising scheduler.
        transformer ([`WanTransformer3DModel`]): the denoiser; MoC is applied to it on the first call.
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        tokenizer: AutoTokenizer,
        text_encoder: UMT5EncoderModel,
        vae: AutoencoderKLWan,
        scheduler: FlowMatchEulerDiscreteScheduler,
        transformer: WanTransformer3DModel,
    ):
        super().__init__()
        self.register_modules(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, scheduler=scheduler
        )
        self.vae_scale_factor_temporal = self.vae.config.scale_factor_temporal if getattr(self, "vae", None) else 4
        self.vae_scale_factor_spatial = self.vae.config.scale_factor_spatial if getattr(self, "vae", None) else 8
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae_scale_factor_spatial)

    # ------------------------------------------------------------------------------------------------ properties
    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

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

    # ------------------------------------------------------------------------------------------------ text
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

    # ------------------------------------------------------------------------------------------------ MoC
    def _prepare_moc(self, moc_config: MoCConfig | None) -> MoCConfig:
        return _use_moc(self.transformer, moc_config)

    # ------------------------------------------------------------------------------------------------ checks
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
        patch = self.transformer.config.patch_size
        multiple = self.vae_scale_factor_spatial * patch[1]
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % multiple:
                raise ValueError(f"{name} must be a positive multiple of {multiple}, got {value!r}")
        # Wan's RoPE tables have rope_max_seq_len positions per axis; past that the model cannot place a token.
        rope_len = self.transformer.config.rope_max_seq_len
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

    # ------------------------------------------------------------------------------------------------ call
    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        shots: Sequence[Shot | dict | str],
        global_prompt: str | None = None,
        negative_prompt: str | None = None,
        height: int = 480,
        width: int = 832,
        num_frames: int = 81,
        fps: float = 16,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
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

        Args:
            shots (`list[Shot | dict | str]`):
                The shots in order: [`Shot`]s, dicts with `prompt` and `num_frames` or `seconds`, or plain prompts
                (which get `num_frames` frames). Each shot's pixel frames must be `4n + 1`.
            global_prompt (`str`, *optional*):
                Caption attended by every shot (style, characters, setting), next to the shot's own caption.
            negative_prompt (`str`, *optional*):
                Negative prompt for classifier-free guidance (used for every shot); `""` when not given.
            height (`int`, defaults to 480) / width (`int`, defaults to 832):
                Size in pixels, multiples of 16.
            num_frames (`int`, defaults to 81): frames of shots given as plain prompts.
            fps (`float`, defaults to 16): frame rate used to turn `seconds` into frames.
            num_inference_steps (`int`, defaults to 50): denoising steps.
            guidance_scale (`float`, defaults to 5.0): classifier-free guidance scale; off at `<= 1`.
            num_videos_per_prompt (`int`, defaults to 1): videos generated (the batch size).
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*): for deterministic noise.
            latents (`torch.Tensor`, *optional*): initial noise `(batch, channels, latent_frames, h, w)` of all
                shots concatenated in time.
            moc_config (`MoCConfig`, *optional*):
                MoC settings. Applied with `apply_moc` if the transformer has no MoC yet (`MoCConfig()` when `None`),
                or set on the applied processors when different.
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
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
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
        )
        self._prepare_moc(moc_config)

        self._guidance_scale = guidance_scale
        self._attention_kwargs = attention_kwargs
        self._current_timestep = None
        self._interrupt = False
        device = self._execution_device
        transformer_dtype = self.transformer.dtype
        batch_size = num_videos_per_prompt

        pixel_frames = [s.frames(fps, self.vae_scale_factor_temporal) for s in shots]
        latent_frames = [(f - 1) // self.vae_scale_factor_temporal + 1 for f in pixel_frames]

        # 1. Text: each distinct caption once; the conditional context holds each distinct caption once too.
        captions = ([global_prompt] if global_prompt is not None else []) + [s.prompt for s in shots]
        if self.do_classifier_free_guidance:
            captions.append(negative_prompt or "")
        embeds = self.encode_captions(captions, max_sequence_length, device)
        # The same context layout `diffusers-moc train` conditions on (see `pipelines.captions`).
        text = caption_layout(global_prompt, [s.prompt for s in shots], max_sequence_length)
        prompt_embeds = torch.cat([embeds[c] for c in text.segments], dim=1).to(transformer_dtype)
        prompt_embeds = prompt_embeds.repeat(batch_size, 1, 1)
        negative_prompt_embeds = None
        if self.do_classifier_free_guidance:
            negative_prompt_embeds = embeds[negative_prompt or ""].to(transformer_dtype).repeat(batch_size, 1, 1)

        # One text segment: every token attends to all of it, which is stock cross-attention (no spans needed).
        cond_context: dict[str, Any] = {"shot_frames": latent_frames, **text.context_kwargs()}

        # 2. Timesteps and noise.
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        latents = self.prepare_latents(
            latent_frames,
            batch_size,
            self.transformer.config.in_channels,
            height,
            width,
            torch.float32,
            device,
            generator,
            latents,
        )

        # 3. Denoising: all shots at once, MoC told where the shots are.
        num_warmup_steps = len(timesteps) - num_inference_steps * self.scheduler.order
        self._num_timesteps = len(timesteps)
        self.scheduler.set_begin_index(0)
        with self.progress_bar(total=num_inference_steps) as progress_bar, moc_context(shot_frames=latent_frames):
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                self._current_timestep = t
                latent_model_input = latents.to(transformer_dtype)
                timestep = t.expand(latents.shape[0])
                cache_kwargs = {
                    "step_index": i,
                    "sigma": float(self.scheduler.sigmas[i]),
                    "num_inference_steps": self._num_timesteps,
                }
                with self.transformer.cache_context("cond", **cache_kwargs), moc_context(**cond_context):
                    noise_pred = self.transformer(
                        hidden_states=latent_model_input,
                        timestep=timestep,
                        encoder_hidden_states=prompt_embeds,
                        attention_kwargs=attention_kwargs,
                        return_dict=False,
                    )[0]
                if self.do_classifier_free_guidance:
                    # The negative prompt is one caption for all shots: stock cross-attention, shot-aware MoC.
                    with self.transformer.cache_context("uncond", **cache_kwargs):
                        noise_uncond = self.transformer(
                            hidden_states=latent_model_input,
                            timestep=timestep,
                            encoder_hidden_states=negative_prompt_embeds,
                            attention_kwargs=attention_kwargs,
                            return_dict=False,
                        )[0]
                    noise_pred = noise_uncond + guidance_scale * (noise_pred - noise_uncond)

                latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]

                if callback_on_step_end is not None:
                    local = {
                        "latents": latents,
                        "prompt_embeds": prompt_embeds,
                        "negative_prompt_embeds": negative_prompt_embeds,
                    }
                    callback_kwargs = {k: local[k] for k in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                    prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = callback_outputs.pop("negative_prompt_embeds", negative_prompt_embeds)

                if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % self.scheduler.order == 0):
                    progress_bar.update()
        self._current_timestep = None

        # 4. Decode shot by shot: VAE memory is that of one shot, and each shot is a clip the VAE was trained on.
        bounds = np.cumsum([0, *latent_frames]).tolist()
        if output_type == "latent":
            video, shot_starts = latents, bounds[:-1]
        else:
            parts = [self._decode(latents[:, :, a:b], output_type) for a, b in zip(bounds[:-1], bounds[1:])]
            shot_starts = np.cumsum([0, *pixel_frames[:-1]]).tolist()
            if output_type == "np":
                video = np.concatenate(parts, axis=1)
            elif output_type == "pt":
                video = torch.cat(parts, dim=1)
            else:
                video = [[frame for part in parts for frame in part[b]] for b in range(batch_size)]

        self.maybe_free_model_hooks()
        if not return_dict:
            return video, shot_starts
        return LongVideoPipelineOutput(frames=video, shot_starts=shot_starts)
