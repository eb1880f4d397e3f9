"""Distributed training on 2 CPU processes (gloo): `training.context_parallel: 2` and FSDP2 train what one process
trains (same seed and data, drop-off and drop-in on, gradient checkpointing on), checkpoints resume exactly, and a
distributed run killed inside a checkpoint save resumes from the last complete checkpoint.

One launch of 2 processes runs everything distributed (`_train_parallel_worker.py`), ending with the run that is
killed; the references and the resume run in this process.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))
from _train_helpers import _config, _make_dataset, _reset_accelerate  # noqa: E402
from _train_parallel_worker import KILL_AT, worker  # noqa: E402

from diffusers_moc.training import MoCLoRATrainer  # noqa: E402
from diffusers_moc.training.checkpoints import scan_checkpoints  # noqa: E402

pytest.importorskip("imageio.v3")
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weights(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "pytorch_lora_weights.safetensors"))


def _assert_same_weights(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return _make_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def single(data_root, tmp_path_factory):
    """One process, 4 steps: losses and final weights."""
    _reset_accelerate()
    out = tmp_path_factory.mktemp("single")
    result = MoCLoRATrainer(_config(data_root, out, training={"max_steps": 4}, checkpointing={"every": 2})).train()
    _reset_accelerate()
    return result.losses, _weights(result.final_dir)


@pytest.fixture(scope="module")
def distributed(data_root, tmp_path_factory):
    """The 2-process launch: its results, and its output folder after it was killed in its last checkpoint save."""
    out = tmp_path_factory.mktemp("distributed")
    flag = out / "paused"
    context = mp.start_processes(
        worker, args=(2, _free_port(), data_root, str(out), str(flag)), nprocs=2, join=False, start_method="spawn"
    )
    try:
        deadline = time.monotonic() + 900
        while not flag.exists():
            # A worker that fails raises here, with its traceback.
            if context.join(timeout=0.5):
                raise AssertionError(f"the distributed runs ended before {KILL_AT}")
            assert time.monotonic() < deadline, f"the distributed runs did not reach {KILL_AT}"
    finally:
        for process in context.processes:  # SIGKILL, as a crash or a preempted job ends
            if process.is_alive():
                os.kill(process.pid, signal.SIGKILL)
        for process in context.processes:
            process.join()
    return torch.load(out / "results.pt"), out


def test_context_parallel_training_equals_one_process(single, distributed):
    losses, weights = single
    results, _ = distributed
    cp = results["cp"]
    assert cp["step"] == 4
    torch.testing.assert_close(torch.tensor(cp["losses"]), torch.tensor(losses), atol=1e-5, rtol=1e-4)
    _assert_same_weights(_weights(cp["final"]), weights)
    # The LoRA trained (lora_B starts at zero), so equal weights mean equal training.
    assert any(v.abs().max() > 1e-4 for k, v in weights.items() if "lora_B" in k)


def test_fsdp_training_equals_one_process_and_resumes_exactly(single, distributed):
    losses, weights = single
    results, _ = distributed
    # FSDP2 over both ranks (which also split each sample's tokens): 2 steps, checkpoint-2, then resumed to 4.
    assert results["fsdp"]["step"] == 2 and results["fsdp_resume"]["step"] == 4
    got = results["fsdp"]["losses"] + results["fsdp_resume"]["losses"]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(losses), atol=1e-5, rtol=1e-4)
    _assert_same_weights(_weights(results["fsdp_resume"]["final"]), weights)


def test_distributed_run_killed_while_saving_resumes_from_its_last_checkpoint(data_root, single, distributed):
    _, weights = single
    _, out = distributed
    run = out / "killed"
    complete, _ = scan_checkpoints(str(run))
    assert [os.path.basename(c.path) for c in complete] == ["checkpoint-2"]  # never the half-written checkpoint-4
    assert not (run / "final").exists()
    # The context-parallel run's checkpoint resumes on one process, to the weights of the uninterrupted run.
    _reset_accelerate()
    config = _config(data_root, run, training={"max_steps": 4}, checkpointing={"every": 2, "resume_from": "latest"})
    result = MoCLoRATrainer(config).train()
    _reset_accelerate()
    assert result.global_step == 4 and len(result.losses) == 2
    torch.testing.assert_close(torch.tensor(result.losses), torch.tensor(single[0][2:]), atol=1e-5, rtol=1e-4)
    _assert_same_weights(_weights(result.final_dir), weights)
    assert sorted(n for n in os.listdir(run) if n.startswith(".")) == []  # the partial checkpoint was cleaned up


@pytest.mark.parametrize(
    "training, message",
    [
        ({"context_parallel": 2}, r"training.context_parallel: must divide the number of processes \(1\), got 2"),
        ({"fsdp": True}, "training.fsdp: accelerate runs this job as NO, not FSDP"),
    ],
)
def test_parallel_settings_are_checked_against_the_processes(data_root, tmp_path, training, message):
    from diffusers_moc.training import ConfigError

    _reset_accelerate()
    try:
        with pytest.raises(ConfigError, match=message):
            MoCLoRATrainer(_config(data_root, tmp_path / "out", training=training)).train()
    finally:
        _reset_accelerate()
    assert not (tmp_path / "out").exists()  # refused before anything is written
