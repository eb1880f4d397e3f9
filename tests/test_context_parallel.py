"""MoC under diffusers' Ulysses context parallelism: 2 CPU processes (gloo) equal one process."""

from __future__ import annotations

import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))
from _cp_worker import run_model, tiny_wan_transformer, wan_inputs, worker  # noqa: E402

from diffusers_moc import MoCConfig, apply_moc  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

# Sparse enough that routing matters: 4 frames, own frame + 1 routed frame.
MOC = {"top_k": 1, "local_window": 0, "causal": False, "backend": "torch"}
GRAD_PARAM = "blocks.0.attn1.to_q.weight"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ulysses_two_processes_equal_single_process(tmp_path):
    mp.spawn(worker, args=(2, _free_port(), str(tmp_path), MOC, GRAD_PARAM), nprocs=2, join=True)
    results = torch.load(tmp_path / "cp_results.pt")

    moc_model = apply_moc(tiny_wan_transformer(), MoCConfig(**MOC))
    moc_out, moc_grad = run_model(moc_model, wan_inputs(), GRAD_PARAM)
    dense_out, dense_grad = run_model(tiny_wan_transformer(), wan_inputs(), GRAD_PARAM)
    # The setting is sparse: MoC differs from dense, so the comparison below can tell them apart.
    assert not torch.allclose(moc_out, dense_out, atol=1e-3)

    cp_out, cp_grad = results["moc"]
    torch.testing.assert_close(cp_out, moc_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cp_grad, moc_grad, atol=1e-5, rtol=1e-4)
    # diffusers' own dense Ulysses attention on the same machine, as a control.
    torch.testing.assert_close(results["dense"][0], dense_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results["dense"][1], dense_grad, atol=1e-5, rtol=1e-4)
