"""Worker of `test_training_parallel.py`: one of 2 CPU processes (gloo) training the tiny Wan model with
`training.context_parallel: 2`, then with FSDP2 as well (2 steps, then resumed to 4), then a run that the test kills
inside a checkpoint save."""

from __future__ import annotations

import os

import torch


def force_fsdp_on_cpu() -> None:
    r"""
    accelerate turns its FSDP plugin on only for processes on accelerators (`AcceleratorState` keeps `MULTI_CPU`
    otherwise) although FSDP2 itself runs on CPU over gloo; run accelerate's FSDP2 code path on CPU anyway.
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__
    if getattr(original, "_forces_fsdp", False):
        return

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            # Both singletons: every `AcceleratorState()` copies the process state's fields over its own.
            PartialState().distributed_type = DistributedType.FSDP
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    init._forces_fsdp = True
    AcceleratorState.__init__ = init


#: Where the last run stops (the main process, after writing the adapter into the partial checkpoint-4), to be killed.
KILL_AT = "checkpoint-4:weights-saved"


def _reset_accelerator_state(port: int) -> None:
    # Between runs: a run ends with `accelerator.end_training()`, which destroys the process group; the next
    # `Accelerator` creates a new one, on a new port (the old rendezvous store is gone).
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    os.environ["MASTER_PORT"] = str(port)
    os.environ.pop("ACCELERATE_USE_FSDP", None)  # set by an `Accelerator` given an FSDP plugin


def worker(rank: int, world_size: int, port: int, data_root: str, out_dir: str, flag: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        ACCELERATE_USE_CPU="true",  # accelerate runs several CPU processes (gloo) only when told so
    )
    torch.set_num_threads(1)
    from _train_helpers import _config

    from diffusers_moc.training import MoCLoRATrainer

    force_fsdp_on_cpu()
    results = {}
    cp = {"context_parallel": 2, "max_steps": 4}
    runs = [
        ("cp", os.path.join(out_dir, "cp"), {"training": cp}),
        # FSDP2 over both ranks, which also split each sample's tokens; a checkpoint at step 2, then resumed to 4.
        ("fsdp", os.path.join(out_dir, "fsdp"), {"training": {**cp, "fsdp": True, "max_steps": 2}}),
        (
            "fsdp_resume",
            os.path.join(out_dir, "fsdp"),
            {"training": {**cp, "fsdp": True}, "checkpointing": {"every": 2, "resume_from": "latest"}},
        ),
    ]
    for i, (name, out, sections) in enumerate(runs):
        sections.setdefault("checkpointing", {"every": 2})
        _reset_accelerator_state(port + i)
        result = MoCLoRATrainer(_config(data_root, out, **sections)).train()
        results[name] = {"losses": result.losses, "step": result.global_step, "final": result.final_dir}
    if rank == 0:
        torch.save(results, os.path.join(out_dir, "results.pt"))
    # Last: a context-parallel run that pauses inside its second checkpoint save, where the test kills both ranks.
    from diffusers_moc.core.atomic import PAUSE_ENV, PAUSE_FILE_ENV

    os.environ[PAUSE_ENV], os.environ[PAUSE_FILE_ENV] = KILL_AT, flag
    _reset_accelerator_state(port + len(runs))
    config = _config(data_root, os.path.join(out_dir, "killed"), training=cp, checkpointing={"every": 2})
    MoCLoRATrainer(config).train()
    raise AssertionError(f"the run went past {KILL_AT}")
