"""Worker of `test_context_parallel.py`: one rank of a 2-process gloo run of a tiny Wan transformer with MoC."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def tiny_wan_transformer(seed: int = 0):
    """The tiny Wan transformer of `diffusers_moc.tiny`, built alone (no VAE / text encoder)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
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


def wan_inputs(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        # 4 latent frames of 4x4 -> 2x2 patches: 16 tokens, split 8 + 8 over two ranks.
        "hidden_states": torch.randn(1, 4, 4, 4, 4, generator=g),
        "encoder_hidden_states": torch.randn(1, 6, 16, generator=g),
        "timestep": torch.tensor([500]),
    }


def run_model(model, inputs: dict, grad_param: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Output and the gradient of `grad_param` for the loss `sum(out ** 2)`."""
    model.zero_grad()
    # return_dict=False as the pipelines call it: diffusers' CP hook on the model cannot pass a ModelOutput through.
    out = model(**inputs, return_dict=False)[0]
    out.square().sum().backward()
    return out.detach(), model.get_parameter(grad_param).grad.detach().clone()


def worker(rank: int, world_size: int, port: int, out_dir: str, moc_config: dict, grad_param: str) -> None:
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
        for name, config in (("moc", MoCConfig(**moc_config)), ("dense", None)):
            model = tiny_wan_transformer()
            if config is not None:
                apply_moc(model, config)
            model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world_size))
            out, grad = run_model(model, wan_inputs(), grad_param)
            # Each rank's parameter gradient covers its own tokens; data/FSDP-style all-reduce makes it whole.
            dist.all_reduce(grad)
            results[name] = (out, grad)
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "cp_results.pt"))
    finally:
        dist.destroy_process_group()
