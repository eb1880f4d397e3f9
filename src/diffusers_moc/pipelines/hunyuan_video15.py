"""`HunyuanVideo15LongVideoPipeline`: multi-shot long videos on HunyuanVideo 1.5 (text- and image-to-video) with MoC.

Used as [`LongVideoPipeline`] is on Wan (shots, a global prompt, a start image, callbacks, shot-by-shot decoding), on
the components of diffusers' `HunyuanVideo15Pipeline` / `HunyuanVideo15ImageToVideoPipeline`. HunyuanVideo 1.5 is
an MMDiT: captions are tokens of the joint self-attention stream, not of a cross-attention. Each caption (its Qwen
caption and its ByT5 glyph text) is encoded alone, trimmed to its real tokens and placed in the transformer's text
inputs one after the other; [`moc_context`]'s `caption_shots` / `caption_tokens` make each one a text chunk of its
shot (the global caption a chunk of no shot), refined alone by the token refiner. The text and transformer inputs are
built by `diffusers_moc.hunyuan_video15_text`, which `diffusers-moc train` uses too. With
`MoCConfig(text_anchors="shot", causal=True)` a shot anchors its own caption plus the global one and never depends on
a later shot.

A single caption (one shot, no global prompt) takes diffusers' own text path, so one shot equals diffusers' pipeline
with `apply_moc`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import (
    AutoencoderKLHunyuanVideo15,
    ClassifierFreeGuidance,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideo15ImageToVideoPipeline,
    HunyuanVideo15Transformer3DModel,
)
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.hunyuan_video1_5.image_processor import HunyuanVideo15ImageProcessor
from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import retrieve_timesteps
from transformers import ByT5Tokenizer, Qwen2_5_VLTextModel, Qwen2Tokenizer, T5EncoderModel

from ..core.context import moc_context
from ..hunyuan_video15_text import (
    BYT5_TOKENS,
    VISION_TOKENS,
    HunyuanVideo15CaptionEncoder,
    HunyuanVideo15Text,
    t2v_condition,
    text_defaults,
    transformer_inputs,
)
from ..model_families import HUNYUAN_VIDEO15_FAMILIES, WanFamily
from ..shot_plan import ShotPlan, plan_shots
from .long_video import LongVideoPipeline, LongVideoPipelineOutput, Shot

__all__ = ["HunyuanVideo15LongVideoPipeline"]


@dataclass(frozen=True)
class _Conditioning:
    r"""
    What every denoising step conditions on (see `LongVideoPipeline`'s): the text of the conditional and (with
    guidance) unconditional passes, `prompt_embeds` / `negative_prompt_embeds` (what callbacks may replace), the
    condition latents and mask concatenated to the latents, the image tokens and the guider.
    """

    plan: ShotPlan
    text: HunyuanVideo15Text
    negative: HunyuanVideo15Text | None
    concat: torch.Tensor
    image_embeds: torch.Tensor
    guider: ClassifierFreeGuidance
    prompt_embeds: torch.Tensor | None = None
    negative_prompt_embeds: torch.Tensor | None = None


class HunyuanVideo15LongVideoPipeline(LongVideoPipeline):
    r"""
    Multi-shot long-video generation with HunyuanVideo 1.5 (text-to-video, or image-to-video with `image_encoder`
    and `feature_extractor`) and Mixture-of-Contexts attention; the components are those of diffusers'
    `HunyuanVideo15Pipeline` (and `HunyuanVideo15ImageToVideoPipeline`), so `from_pretrained` loads their folders.

    All shots are denoised together as one latent sequence; each shot's caption is a text chunk of the joint stream
    (see the module docstring). The VAE decodes shot by shot.

    Args:
        text_encoder ([`Qwen2_5_VLTextModel`]), tokenizer ([`Qwen2Tokenizer`]): the caption encoder.
        transformer ([`HunyuanVideo15Transformer3DModel`]): the denoiser; MoC is applied on the first call.
        vae ([`AutoencoderKLHunyuanVideo15`]), scheduler ([`FlowMatchEulerDiscreteScheduler`]).
        text_encoder_2 ([`T5EncoderModel`]), tokenizer_2 ([`ByT5Tokenizer`]): the glyph-text encoder (quoted text).
        guider ([`ClassifierFreeGuidance`]): classifier-free guidance (its scale is the default `guidance_scale`).
        image_encoder ([`SiglipVisionModel`], *optional*), feature_extractor ([`SiglipImageProcessor`], *optional*):
            the image-to-video model's image encoder.
    """

    model_cpu_offload_seq = "image_encoder->text_encoder->text_encoder_2->transformer->vae"
    _optional_components = ["image_encoder", "feature_extractor"]

    def __init__(
        self,
        text_encoder: Qwen2_5_VLTextModel,
        tokenizer: Qwen2Tokenizer,
        transformer: HunyuanVideo15Transformer3DModel,
        vae: AutoencoderKLHunyuanVideo15,
        scheduler: FlowMatchEulerDiscreteScheduler,
        text_encoder_2: T5EncoderModel,
        tokenizer_2: ByT5Tokenizer,
        guider: ClassifierFreeGuidance,
        image_encoder=None,
        feature_extractor=None,
    ):
        DiffusionPipeline.__init__(self)
        self.register_modules(
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            transformer=transformer,
            vae=vae,
            scheduler=scheduler,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            guider=guider,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
        )
        self.vae_scale_factor_temporal = self.vae.temporal_compression_ratio if getattr(self, "vae", None) else 4
        self.vae_scale_factor_spatial = self.vae.spatial_compression_ratio if getattr(self, "vae", None) else 16
        self.video_processor = HunyuanVideo15ImageProcessor(
            vae_scale_factor=self.vae_scale_factor_spatial, do_resize=False, do_convert_rgb=True
        )
        # diffusers' pipelines' text settings (their `encode_prompt` reads them from the pipeline).
        defaults = text_defaults()
        self.system_message = defaults["system_message"]
        self.prompt_template_encode_start_idx = defaults["crop_start"]
        self.tokenizer_max_length = defaults["tokenizer_max_length"]
        self.tokenizer_2_max_length = BYT5_TOKENS
        self.vision_num_semantic_tokens = VISION_TOKENS
        self.default_aspect_ratio = (16, 9)  # (width: height)

    # ------------------------------------------------------------------------------------------------ family, checks
    @property
    def family(self) -> WanFamily:
        """`hunyuanvideo1.5-i2v` with an image encoder, else `hunyuanvideo1.5-t2v`."""
        i2v = getattr(self, "image_encoder", None) is not None
        return HUNYUAN_VIDEO15_FAMILIES["hunyuanvideo1.5-i2v" if i2v else "hunyuanvideo1.5-t2v"]

    def _denoiser(self) -> torch.nn.Module:
        return self.transformer

    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name: str | None = None, **kwargs):
        r"""
        Load a LoRA into the transformer: diffusers has no HunyuanVideo 1.5 LoRA loader (the inherited Wan one does
        not fit), so the transformer's own `load_lora_adapter` reads the file's `transformer.` keys and its metadata.
        Arguments are those of `load_lora_adapter`; `load_into_transformer_2=True` is refused (one transformer).
        """
        if kwargs.pop("load_into_transformer_2", False):
            raise ValueError("load_into_transformer_2 is for Wan 2.2 A14B's second expert; HunyuanVideo 1.5 has one")
        self.transformer.load_lora_adapter(
            pretrained_model_name_or_path_or_dict, prefix="transformer", adapter_name=adapter_name, **kwargs
        )

    def default_settings(self, image: PIL.Image.Image | None = None) -> dict[str, Any]:
        r"""`num_frames` (121), `fps` (24), `num_inference_steps` (50), the guider's `guidance_scale`, the Qwen
        caption length (1000) and `height` / `width` as diffusers' pipelines pick them: 16:9 at the transformer's
        `target_size`, or with a start `image` the image's aspect."""
        width, height = self.default_aspect_ratio
        if image is not None:
            width, height = image.size
        height, width = self.video_processor.calculate_default_height_width(
            height, width, self.transformer.config.target_size
        )
        chosen = dict(height=height, width=width, guidance_scale=self.guider.guidance_scale)
        return {**self.family.defaults, **chosen, "max_sequence_length": self.tokenizer_max_length}

    def _check_image(self, image, guidance_scale_2) -> None:
        family = self.family
        if guidance_scale_2 is not None:
            raise ValueError(f"guidance_scale_2 is for two-expert models (Wan 2.2 A14B), not {family.title}")
        if image is not None and not family.takes_image:
            raise ValueError(
                f"image: this is a {family.title} model (text to video); an image start needs an image-to-video "
                "model (HunyuanVideo 1.5 I2V)"
            )
        if image is None and family.image == "required":
            raise ValueError(f"image is required: {family.title} is an image-to-video model; pass the first frame")
        if image is not None and not isinstance(image, PIL.Image.Image):
            raise TypeError(f"image must be a PIL image on {family.title}, got {type(image).__name__}")
        if family.takes_image and getattr(self, "feature_extractor", None) is None:
            raise ValueError(f"{family.title} needs its image_encoder and feature_extractor components")

    def _check_size(self, shots: list[Shot], height: int, width: int, fps: float) -> None:
        multiple = self.vae_scale_factor_spatial * self.transformer.config.patch_size
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % multiple:
                raise ValueError(f"{name} must be a positive multiple of {multiple}, got {value!r}")

    # ------------------------------------------------------------------------------------------------ text
    def _captions(self) -> HunyuanVideo15CaptionEncoder:
        """The caption encoder of this call (its `max_sequence_length` Qwen tokens)."""
        return HunyuanVideo15CaptionEncoder.from_pipeline(self, self._text_tokens)

    # ------------------------------------------------------------------------------------------------ image
    def _image_condition(
        self, image, latents: torch.Tensor, height: int, width: int, device, dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""
        The condition latents and mask concatenated to the latents, and the image tokens, as diffusers' pipelines
        make them: zeros for text-to-video; for image-to-video the image's latent as the first latent frame (of the
        first shot; later shots start from nothing, as the model's frames after the first do) and its SigLIP
        tokens, a global chunk every shot attends.
        """
        batch, _, frames, h, w = latents.shape
        if image is None:
            return t2v_condition(latents, self.transformer.config.image_embed_dim, dtype, device)
        stock = HunyuanVideo15ImageToVideoPipeline
        embeds = stock._get_image_embeds(self.image_encoder, self.feature_extractor, image, device)
        embeds = embeds.repeat(batch, 1, 1).to(device=device, dtype=dtype)
        first = stock._get_image_latents(self.vae, self.video_processor, image, height, width, device)
        condition = first.repeat(batch, 1, frames, 1, 1)
        condition[:, :, 1:] = 0
        mask = torch.zeros(batch, 1, frames, h, w, dtype=dtype, device=device)
        mask[:, :, 0] = 1.0
        return torch.cat([condition.to(device=device, dtype=dtype), mask], dim=1), embeds

    def _size(self, image, height: int | None, width: int | None):
        """Height, width and the resized start image: the image's aspect at `target_size` when not given, as
        `HunyuanVideo15ImageToVideoPipeline` picks them."""
        defaults = self.default_settings(image if height is None and width is None else None)
        height = defaults["height"] if height is None else height
        width = defaults["width"] if width is None else width
        if image is not None:
            image = self.video_processor.resize(image, height=height, width=width, resize_mode="crop")
        return image, height, width

    # ------------------------------------------------------------------------------------------------ denoise, decode
    def _guider(self, guidance_scale: float | None) -> ClassifierFreeGuidance:
        if guidance_scale is None or guidance_scale == self.guider.guidance_scale:
            return self.guider
        return self.guider.new(guidance_scale=guidance_scale)

    def _predict_noise(self, latents: torch.Tensor, t: torch.Tensor, step: int, conditioning: _Conditioning):
        """The guided prediction of step `step`, as diffusers' pipeline runs its guider: the conditional pass with
        per-shot caption chunks, the unconditional pass (while the guider guides) on the negative prompt."""
        guider = conditioning.guider
        guider.set_state(step=step, num_inference_steps=self._num_timesteps, timestep=t)
        call = dict(attention_kwargs=self._attention_kwargs, return_dict=False)
        if self.transformer.config.use_meanflow:  # step-distilled checkpoints: the next timestep too
            timesteps = self.scheduler.timesteps
            nxt = timesteps[step + 1] if step + 1 < len(timesteps) else torch.tensor([0.0], device=t.device)
            call["timestep_r"] = nxt.expand(latents.shape[0]).to(latents.dtype)
        passes = [("pred_cond", conditioning.text, conditioning.prompt_embeds)]
        if guider.num_conditions > 1:
            passes.append(("pred_uncond", conditioning.negative, conditioning.negative_prompt_embeds))
        preds = []
        for name, text, embeds in passes:
            inputs = transformer_inputs(latents, conditioning.concat, conditioning.image_embeds, t, text)
            if embeds is not None:  # what a callback may have replaced
                inputs["encoder_hidden_states"] = embeds
            with self.transformer.cache_context(name), moc_context(**text.context):
                preds.append(self.transformer(**inputs, **call)[0])
        return guider.forward(*preds).pred

    def _decode(self, latents: torch.Tensor, output_type: str):
        latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
        video = self.vae.decode(latents, return_dict=False)[0]
        return self.video_processor.postprocess_video(video, output_type=output_type)

    # ------------------------------------------------------------------------------------------------ call
    @torch.no_grad()
    def __call__(
        self,
        shots: Sequence[Shot | dict | str],
        global_prompt: str | None = None,
        negative_prompt: str | None = None,
        image: PIL.Image.Image | None = None,
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
        moc_config=None,
        output_type: str = "np",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006  (diffusers' signature)
        max_sequence_length: int | None = None,
    ) -> LongVideoPipelineOutput | tuple:
        r"""
        Generate one video made of several shots; the arguments are [`LongVideoPipeline`]'s.

        Settings left at `None` take the family's defaults ([`~HunyuanVideo15LongVideoPipeline.default_settings`]):
        121 frames at 24 fps, 50 steps, the guider's scale, 16:9 at the transformer's `target_size` (with an `image`,
        the image's aspect, as diffusers' image-to-video pipeline). `image` (a PIL image, required by the
        image-to-video model) is resized and cropped to `height` x `width` and starts the first shot.
        `max_sequence_length` is the Qwen caption length (diffusers' 1000 when `None`); each shot's caption is
        trimmed to its real tokens. `guidance_scale_2` is refused (one expert).

        Returns:
            [`LongVideoPipelineOutput`] or `tuple`: `(frames, shot_starts)` when `return_dict` is `False`.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        defaults = self.default_settings()
        num_frames = defaults["num_frames"] if num_frames is None else num_frames
        fps = defaults["fps"] if fps is None else fps
        steps = defaults["num_inference_steps"] if num_inference_steps is None else num_inference_steps
        max_sequence_length = self.tokenizer_max_length if max_sequence_length is None else max_sequence_length
        self._check_image(image, guidance_scale_2)
        image, height, width = self._size(image, height, width)
        shots = self.check_inputs(
            shots, global_prompt, negative_prompt, height, width, num_frames, fps, steps, num_videos_per_prompt,
            output_type, max_sequence_length, callback_on_step_end_tensor_inputs, image=image,
        )  # fmt: skip
        temporal, prompts = self.vae_scale_factor_temporal, [s.prompt for s in shots]
        plan = plan_shots([s.frames(fps, temporal) for s in shots], global_prompt, prompts, 1, temporal)
        self._prepare_moc(moc_config)
        guider = self._guider(guidance_scale)
        self._guidance_scale, self._guidance_scale_2 = guider.guidance_scale, None
        self._attention_kwargs, self._current_timestep, self._interrupt = attention_kwargs, None, False
        self._text_tokens = max_sequence_length
        device, dtype, batch = self._execution_device, self.transformer.dtype, num_videos_per_prompt

        captions = self._captions()
        text = captions.shot_text(plan, global_prompt, prompts, device, dtype, batch)
        negative = None
        if guider._enabled and guider.num_conditions > 1:  # as diffusers' pipeline decides it
            negative = replace(captions.encode(negative_prompt, device, dtype, batch), context=plan.shot_context)
        sigmas = np.linspace(1.0, 0.0, steps + 1)[:-1]
        timesteps, steps = retrieve_timesteps(self.scheduler, steps, device, sigmas=sigmas)
        channels = self.vae.config.latent_channels
        latents = self.prepare_latents(
            plan.latent_frames, batch, channels, height, width, dtype, device, generator, latents
        )
        concat, image_embeds = self._image_condition(image, latents, height, width, device, dtype)
        negative_embeds = None if negative is None else negative.embeds
        conditioning = _Conditioning(plan, text, negative, concat, image_embeds, guider, text.embeds, negative_embeds)
        latents = self._denoise(
            latents, timesteps, steps, conditioning, callback_on_step_end, callback_on_step_end_tensor_inputs
        )
        video = self._decode_shots(latents, plan, output_type, batch)
        shot_starts = plan.latent_starts if output_type == "latent" else plan.shot_starts
        self.maybe_free_model_hooks()
        if not return_dict:
            return video, shot_starts
        return LongVideoPipelineOutput(frames=video, shot_starts=shot_starts)
