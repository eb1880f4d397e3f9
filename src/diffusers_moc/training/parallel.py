"""How a training run spreads over processes: Ulysses context parallelism inside groups of ranks, data parallelism
across the groups, and optional FSDP2 parameter sharding through accelerate's plugin.

With `training.context_parallel: N`, the `W` processes form `W / N` groups of `N` consecutive ranks. The ranks of one
group train on the same samples: diffusers' `enable_parallelism(ContextParallelConfig(ulysses_degree=N))` splits
each sample's tokens over them (the transformer's output is gathered, so every rank computes the same loss), and MoC
attention exchanges token shards for head shards (`diffusers_moc.core.parallel`). A rank's backward gives the
parameter gradient of its own tokens; the sample's gradient is the sum over the group. DDP (and FSDP's
reduce-scatter) average over all `W` ranks, so the loss is multiplied by `N` for the backward only:
`mean over W of N * g_rank = mean over the groups of (sum over a group of g_rank)`, the data-parallel average of
whole-sample gradients. The groups draw their batches as `W / N` data-parallel ranks.

Every rank seeds the global RNG alike, so the ranks of a group draw the same noise and timesteps, and MoC's
drop-off / drop-in draw for all heads and keep the rank's heads (`route(..., head_shard=...)`): a run with context
parallelism reproduces the run with another degree. LoRA dropout (`lora.dropout > 0`) draws per rank on its tokens,
which differs from one process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .. import distributed
from .config import ConfigError

__all__ = [
    "Parallelism",
    "check_context_parallel",
    "enable_context_parallel",
    "fsdp_plugin",
    "lora_state_dict",
    "parallelism",
]


@dataclass(frozen=True)
class Parallelism:
    r"""
    Attributes:
        context_parallel (`int`): ranks that split one sample's tokens (1: none).
        data_rank (`int`): this rank's group, the rank the batch sampler shards by.
        data_world (`int`): the number of groups.
        fsdp (`bool`): parameters are sharded with FSDP2 (accelerate's plugin).
        mesh (`DeviceMesh`, *optional*): `("dp", "ring", "ulysses")` mesh for diffusers' context parallelism.
    """

    context_parallel: int = 1
    data_rank: int = 0
    data_world: int = 1
    fsdp: bool = False
    mesh: Any = None


def fsdp_plugin(block_classes: list[str]):
    r"""
    accelerate's FSDP2 plugin for a transformer: every block (`block_classes`, the model's `_no_split_modules`) is
    one sharded unit, the whole model another. Gradient checkpointing stays diffusers' (`training.
    gradient_checkpointing`); the checkpoint state is sharded (`torch.distributed.checkpoint`).
    """
    from accelerate import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(
        fsdp_version=2,
        auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=list(block_classes),
        state_dict_type="SHARDED_STATE_DICT",
        reshard_after_forward=True,
    )


def parallelism(accelerator, degree: int, fsdp: bool) -> Parallelism:
    """The run's layout over `accelerator.num_processes` ranks; checks that `degree` divides them."""
    from accelerate.utils import DistributedType

    world, rank = accelerator.num_processes, accelerator.process_index
    sharded = accelerator.distributed_type == DistributedType.FSDP
    if fsdp and not sharded:
        raise ConfigError(
            "training.fsdp",
            f"accelerate runs this job as {accelerator.distributed_type.value}, not FSDP: accelerate enables FSDP "
            "only for several processes on accelerators (launch with `accelerate launch --num_processes N` on GPUs)",
        )
    if sharded and getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1) != 2:
        raise ConfigError("training.fsdp", "needs FSDP2: set `fsdp_version: 2` in the accelerate config")
    if world % degree:
        raise ConfigError("training.context_parallel", f"must divide the number of processes ({world}), got {degree}")
    mesh = None
    if degree > 1:
        from torch.distributed.device_mesh import init_device_mesh

        # Groups of `degree` consecutive ranks split a sample; data parallelism runs across the groups.
        mesh = init_device_mesh(
            accelerator.device.type, (world // degree, 1, degree), mesh_dim_names=("dp", "ring", "ulysses")
        )
    return Parallelism(degree, rank // degree, world // degree, sharded, mesh)


def check_context_parallel(transformer: torch.nn.Module, degree: int, tokens: int) -> None:
    """The heads and the video tokens of a sample must divide by the degree (Ulysses needs whole shards)."""
    heads = transformer.config.num_attention_heads
    for what, n in (("attention heads", heads), ("video tokens of a sample", tokens)):
        if n % degree:
            raise ConfigError(
                "training.context_parallel",
                f"must divide the model's {what} ({n}), got {degree}",
            )


def enable_context_parallel(transformer: torch.nn.Module, par: Parallelism) -> None:
    """diffusers' Ulysses context parallelism on `transformer` (after MoC and the LoRA adapter are installed)."""
    if par.context_parallel > 1:
        distributed.enable_context_parallel(transformer, par.context_parallel, mesh=par.mesh)


def lora_state_dict(model: torch.nn.Module, fsdp: bool) -> dict[str, torch.Tensor]:
    r"""
    The LoRA adapter of `model` (PEFT names, whole tensors). Under FSDP the sharded adapter parameters are gathered
    (not the frozen base weights): a collective, every rank must call it.
    """
    from peft.utils import get_peft_model_state_dict

    if not fsdp:
        return get_peft_model_state_dict(model)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, ignore_frozen_params=True, cpu_offload=True)
    return get_peft_model_state_dict(model, state_dict=get_model_state_dict(model, options=options))
