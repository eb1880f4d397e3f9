"""Worker of `test_context_parallel.py`: one rank of a 2-process gloo run of tiny transformers with MoC."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def tiny_wan():
    """A tiny Wan transformer (as in `diffusers_moc.tiny`, built alone) and inputs: 4 latent frames of 2x2 patches."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=32,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    ).eval()  # no dropout, no MoC drop-off/drop-in: deterministic, gradients still flow
    g = torch.Generator().manual_seed(1)
    inputs = {
        # 16 tokens, split 8 + 8 over two ranks.
        "hidden_states": torch.randn(1, 4, 4, 4, 4, generator=g),
        "encoder_hidden_states": torch.randn(1, 6, 16, generator=g),
        "timestep": torch.tensor([500]),
    }
    return model, inputs, "blocks.0.attn1.to_q.weight"


def tiny_ltx():
    """A tiny LTX-Video transformer and inputs: 4 latent frames of 2x2 tokens, a 6-token caption (2 padded)."""
    from diffusers import LTXVideoTransformer3DModel

    torch.manual_seed(0)
    model = LTXVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=16,
        num_layers=1,
        caption_channels=16,
    ).eval()
    g = torch.Generator().manual_seed(1)
    inputs = {
        "hidden_states": torch.randn(1, 16, 4, generator=g),
        "encoder_hidden_states": torch.randn(1, 6, 16, generator=g),
        "timestep": torch.tensor([500]),
        "encoder_attention_mask": None,
        "num_frames": 4,
        "height": 2,
        "width": 2,
        "rope_interpolation_scale": (8 / 25, 32, 32),
    }
    return model, inputs, "transformer_blocks.0.attn1.to_q.weight"


def tiny_helios():
    """A tiny Helios transformer and inputs: 3 latent frames of 4x4 patches after 2 frames of short history."""
    from diffusers import HeliosTransformer3DModel

    torch.manual_seed(0)
    model = HeliosTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=16,
        ffn_dim=32,
        # diffusers' `_cp_plan` for Helios names the gathers of 40 blocks, as the released model has.
        num_layers=40,
        rope_dim=(4, 4, 4),
    ).eval()
    g = torch.Generator().manual_seed(1)
    inputs = {
        # 32 history + 48 video tokens, split 40 + 40 over two ranks (the split cuts the second video frame).
        "hidden_states": torch.randn(1, 4, 3, 8, 8, generator=g),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 5, 16, generator=g),
        "indices_hidden_states": torch.tensor([[2, 3, 4]]),
        "indices_latents_history_short": torch.tensor([[0, 1]]),
        "latents_history_short": torch.randn(1, 4, 2, 8, 8, generator=g),
    }
    return model, inputs, "blocks.0.attn1.to_q.weight"


def tiny_minimax_h3(anchors: tuple[str, ...] = ("first",), audio_latents: int = 3):
    r"""
    A tiny MiniMax-H3 transformer and inputs packed as its pipeline packs them, `[text | keyframes | audio | video]`:
    6 text rows, one 4x4 keyframe per anchor, `audio_latents` x 2 audio rows, 3 generated frames of 4x4 (76 rows).
    """
    from _tiny_minimax_h3 import tiny_minimax_h3_transformer
    from diffusers.modular_pipelines.minimax_h3.before_denoise import MiniMaxH3PrepareLayoutStep

    model = tiny_minimax_h3_transformer(seed=0, in_channels=4, audio_in_channels=4, text_dim=16)
    positions, tags, video, audio, text, _, _ = MiniMaxH3PrepareLayoutStep.build_packed_sequence(
        torch.ones(6), 3, 8, 8, audio_latents, (1, 2, 2), 2, 2, 0, anchors
    )
    g = torch.Generator().manual_seed(1)
    inputs = {
        "hidden_states": torch.randn(1, video.numel(), 16, generator=g),
        "audio_hidden_states": torch.randn(1, audio.numel(), 4, generator=g),
        "encoder_hidden_states": torch.randn(1, text.numel(), 16, generator=g),
        "timestep": torch.tensor([0.4, 0.9]),
        # Keyframe rows at their own noise level, as the pipeline plans them.
        "timestep_indices": (torch.arange(positions.shape[0]) < 6 + 16 * len(anchors)).long(),
        "token_tags": tags,
        "position_ids": positions.float(),
        "video_indices": video,
        "audio_indices": audio,
        "text_indices": text,
    }
    return model, inputs, "transformer_blocks.0.attn.to_q.weight"


def tiny_ltx2():
    """A tiny LTX-2 transformer and inputs: 4 latent frames of 2x2 tokens (patchified), a 6-token caption, 5 audio
    latent frames (diffusers' plan splits the video and caption, not the audio)."""
    from diffusers import LTX2VideoTransformer3DModel

    torch.manual_seed(0)
    model = LTX2VideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=16,
        audio_in_channels=4,
        audio_out_channels=4,
        audio_num_attention_heads=2,
        audio_attention_head_dim=4,
        audio_cross_attention_dim=8,
        num_layers=1,
        caption_channels=16,
        rope_double_precision=False,
        rope_type="interleaved",  # diffusers' plan splits 3-dim RoPE tables, which the "split" type's are not
    ).eval()
    g = torch.Generator().manual_seed(1)
    inputs = {
        "hidden_states": torch.randn(1, 16, 4, generator=g),
        "audio_hidden_states": torch.randn(1, 5, 4, generator=g),
        "encoder_hidden_states": torch.randn(1, 6, 16, generator=g),
        "audio_encoder_hidden_states": torch.randn(1, 6, 16, generator=g),
        "timestep": torch.tensor([500.0]),
        # In diffusers 0.42.1 LTX-2's stock processors fail under Ulysses with a caption mask (its heads are not
        # split) and in the audio-video cross-attention (its RoPE tables are not split): the plan's part that works.
        # The plan names the mask, so it must be given.
        "encoder_attention_mask": None,
        "isolate_modalities": True,
        "num_frames": 4,
        "height": 2,
        "width": 2,
        "audio_num_frames": 5,
    }
    # Forward only: diffusers 0.42.1's Ulysses backward fails in the stock caption cross-attention (caption and video
    # shards of different lengths), with or without MoC.
    return model, inputs, None


#: Transformer class name -> builder; the models whose MoC context parallelism is tested.
MODELS = {
    "WanTransformer3DModel": tiny_wan,
    "LTXVideoTransformer3DModel": tiny_ltx,
    "HeliosTransformer3DModel": tiny_helios,
    "MiniMaxH3Transformer3DModel": tiny_minimax_h3,
    "LTX2VideoTransformer3DModel": tiny_ltx2,
}
#: Models whose context parallelism is tested forward only: under diffusers 0.42.1's own Helios plan even the stock
#: model's parameter gradients differ from one process (its block-level splits and gathers), so MoC's cannot be
#: compared; its outputs are.
FORWARD_ONLY = {"HeliosTransformer3DModel"}
#: MoC at full density equals the stock model (tested in test_video_transformers.py).
FULL_DENSITY = {"top_k": 1000, "causal": False, "backend": "torch"}
#: The dense control run under CP: diffusers' stock processors, except for LTX-Video, whose stock cross-attention
#: fails under Ulysses with a caption mask in diffusers 0.42.1 (see MoCLTXVideoAttnProcessor): MoC at full density.
DENSE_UNDER_CP = {
    "WanTransformer3DModel": None,
    "LTXVideoTransformer3DModel": FULL_DENSITY,
    "HeliosTransformer3DModel": None,
    "MiniMaxH3Transformer3DModel": None,
    "LTX2VideoTransformer3DModel": None,
}


def run_model(model, inputs: dict, grad_param: str | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Output and the gradient of `grad_param` for the loss `sum(out ** 2)` (no gradient when it is `None`)."""
    if grad_param is None:
        with torch.no_grad():
            out = model(**inputs, return_dict=False)[0]
        return (out.wait() if hasattr(out, "wait") else out).clone(), None
    model.zero_grad()
    # return_dict=False as the pipelines call it: diffusers' CP hook on the model cannot pass a ModelOutput through.
    out = model(**inputs, return_dict=False)[0]
    out.square().sum().backward()
    # diffusers' output gather may leave a lazy `AsyncCollectiveTensor`; make it a plain tensor (also for saving).
    out = out.wait() if hasattr(out, "wait") else out
    return out.detach().clone(), model.get_parameter(grad_param).grad.detach().clone()


#: Drop-off and drop-in on, strong enough to change the output of the tiny Wan model (4 frames, 2 heads).
REGULARISED = {"top_k": 2, "local_window": 0, "causal": False, "drop_off": 0.9, "drop_in": 1.0, "backend": "torch"}


def run_regularised(model, inputs: dict, grad_param: str, seed: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """`run_model` in a training-mode forward with drop-off and drop-in, drawn from the global RNG seeded `seed`."""
    from diffusers_moc import moc_context

    model.train()
    torch.manual_seed(seed)
    with moc_context(regularise=True):
        return run_model(model, inputs, grad_param)


def worker(rank: int, world_size: int, port: int, out_dir: str, moc_config: dict) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        # diffusers 0.42.1 `ModelMixin._resolve_parallel_config` picks the device as
        # `rank % torch.accelerator.device_count()`, which divides by zero on a machine without an accelerator.
        # The rank's device is irrelevant on CPU, so pretend there is one.
        torch.accelerator.device_count = lambda: 1

        from diffusers import ContextParallelConfig

        from diffusers_moc import MoCConfig, apply_moc

        results = {}
        for model_name, build in MODELS.items():
            for variant, config in (("moc", moc_config), ("dense", DENSE_UNDER_CP[model_name])):
                model, inputs, grad_param = build()
                cp_config = ContextParallelConfig(ulysses_degree=world_size)
                if variant == "moc":
                    apply_moc(model, MoCConfig(**config))
                    model.enable_parallelism(config=cp_config)
                else:
                    # The other order: apply_moc must carry the parallel config over to its processors.
                    model.enable_parallelism(config=cp_config)
                    if config is not None:
                        apply_moc(model, MoCConfig(**config))
                out, grad = run_model(model, inputs, grad_param)
                # Each rank's parameter gradient covers its own tokens; an all-reduce (as DDP/FSDP do) makes it whole.
                if grad is not None:
                    dist.all_reduce(grad)
                results[model_name, variant] = (out, grad)
        # Drop-off and drop-in draw for all heads and keep this rank's: the same draws as one process.
        model, inputs, grad_param = tiny_wan()
        apply_moc(model, MoCConfig(**REGULARISED))
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world_size))
        out, grad = run_regularised(model, inputs, grad_param)
        dist.all_reduce(grad)
        results["WanTransformer3DModel", "regularised"] = (out, grad)
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "cp_results.pt"))
    finally:
        dist.destroy_process_group()
