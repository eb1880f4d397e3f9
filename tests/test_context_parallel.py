"""MoC under diffusers' Ulysses context parallelism: 2 CPU processes (gloo) equal one process."""

from __future__ import annotations

import os
import socket
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))
from _cp_worker import FORWARD_ONLY, MODELS, REGULARISED, run_model, run_regularised, tiny_wan, worker  # noqa: E402

from diffusers_moc import MoCConfig, apply_moc  # noqa: E402
from diffusers_moc.core.attention_processors import (  # noqa: E402
    MoCCogVideoXAttnProcessor,
    MoCHunyuanVideo15AttnProcessor,
    MoCHunyuanVideoAttnProcessor,
    MoCLTXVideoAttnProcessor,
    MoCMochiAttnProcessor,
    MoCWanAttnProcessor,
)
from diffusers_moc.core.parallel import ulysses_config  # noqa: E402

# Sparse enough that routing matters: 4 frames, own frame + 1 routed frame.
MOC = {"top_k": 1, "local_window": 0, "causal": False, "backend": "torch"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cp_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("cp")
    mp.spawn(worker, args=(2, _free_port(), str(out_dir), MOC), nprocs=2, join=True)
    return torch.load(out_dir / "cp_results.pt")


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("model_name", list(MODELS))
def test_ulysses_two_processes_equal_single_process(cp_results, model_name):
    model, inputs, grad_param = MODELS[model_name]()
    moc_out, moc_grad = run_model(apply_moc(model, MoCConfig(**MOC)), inputs, grad_param)
    model, inputs, grad_param = MODELS[model_name]()
    dense_out, dense_grad = run_model(model, inputs, grad_param)
    # The setting is sparse: MoC differs from dense, so the comparison below can tell them apart.
    assert not torch.allclose(moc_out, dense_out, atol=1e-3)

    cp_out, cp_grad = cp_results[model_name, "moc"]
    torch.testing.assert_close(cp_out, moc_out, atol=1e-5, rtol=1e-5)
    # Dense control under CP: diffusers' own Ulysses attention (LTX-Video: MoC at full density, see DENSE_UNDER_CP).
    torch.testing.assert_close(cp_results[model_name, "dense"][0], dense_out, atol=1e-5, rtol=1e-5)
    if model_name in FORWARD_ONLY:
        # The stock model's own gradients under its plan differ from one process: nothing to compare MoC's with.
        assert not torch.allclose(cp_results[model_name, "dense"][1], dense_grad, atol=1e-3)
        return
    if grad_param is not None:  # LTX-2 runs forward only (see tiny_ltx2)
        torch.testing.assert_close(cp_grad, moc_grad, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(cp_results[model_name, "dense"][1], dense_grad, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_drop_off_and_drop_in_under_ulysses_draw_as_one_process(cp_results):
    # Same seed, degree 2 vs degree 1, training-mode forward with drop-off and drop-in: same outputs and gradients.
    def single(seed: int):
        model, inputs, grad_param = tiny_wan()
        return run_regularised(apply_moc(model, MoCConfig(**REGULARISED)), inputs, grad_param, seed=seed)

    out, grad = single(7)
    cp_out, cp_grad = cp_results["WanTransformer3DModel", "regularised"]
    torch.testing.assert_close(cp_out, out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cp_grad, grad, atol=1e-5, rtol=1e-4)
    # The draws matter: another seed, or no regularisers, gives other outputs.
    assert not torch.allclose(single(8)[0], out, atol=1e-3)
    model, inputs, grad_param = tiny_wan()
    assert not torch.allclose(
        run_model(apply_moc(model, MoCConfig(**REGULARISED)), inputs, grad_param)[0], out, atol=1e-3
    )


def test_head_shards_draw_the_slices_of_the_whole_model_draw():
    from diffusers_moc.core.layout import ChunkLayout
    from diffusers_moc.core.routing import route

    layout = ChunkLayout.for_video(6, 4)
    config = MoCConfig(top_k=3, local_window=0, causal=False, drop_off=0.9, drop_in=1.5)
    q, k = torch.randn(2, 2, 24, 4, 8).unbind(0)
    whole = route(q, k, layout, config, training=True, generator=torch.Generator().manual_seed(3)).selected
    for first in (0, 2):
        g = torch.Generator().manual_seed(3)
        part = route(
            q[:, :, first : first + 2],
            k[:, :, first : first + 2],
            layout,
            config,
            training=True,
            generator=g,
            head_shard=(first, 4),
        ).selected
        torch.testing.assert_close(part, whole[:, first : first + 2])
    # Without the shard, a rank's two heads draw like heads 0 and 1.
    g = torch.Generator().manual_seed(3)
    alone = route(q[:, :, 2:], k[:, :, 2:], layout, config, training=True, generator=g).selected
    assert not torch.equal(alone, whole[:, 2:])
    with pytest.raises(ValueError, match="head_shard"):
        route(q, k, layout, config, training=True, head_shard=(2, 4))


def _parallel_config(ring: int = 1, ulysses: int = 2, anything: bool = False):
    cp = SimpleNamespace(ring_degree=ring, ulysses_degree=ulysses, ulysses_anything=anything)
    return SimpleNamespace(context_parallel_config=cp)


def test_ulysses_config_accepts_ulysses_and_rejects_ring():
    assert ulysses_config(None) is None
    assert ulysses_config(SimpleNamespace(context_parallel_config=None)) is None  # tensor parallelism
    assert ulysses_config(_parallel_config()) is not None
    with pytest.raises(NotImplementedError, match="ring_degree=2"):
        ulysses_config(_parallel_config(ring=2, ulysses=1))
    with pytest.raises(NotImplementedError, match="ulysses_anything"):
        ulysses_config(_parallel_config(anything=True))


@pytest.mark.parametrize("proc_cls", [MoCWanAttnProcessor, MoCLTXVideoAttnProcessor])
def test_ring_attention_is_refused_inside_the_model(proc_cls):
    model, inputs, _ = MODELS[
        "WanTransformer3DModel" if proc_cls is MoCWanAttnProcessor else "LTXVideoTransformer3DModel"
    ]()
    apply_moc(model, MoCConfig(**MOC))
    for module in model.modules():
        if isinstance(getattr(module, "processor", None), proc_cls):
            module.processor._parallel_config = _parallel_config(ring=2, ulysses=1)
    with pytest.raises(NotImplementedError, match="Ulysses"):
        model(**inputs)


@pytest.mark.parametrize(
    "proc_cls",
    [MoCHunyuanVideoAttnProcessor, MoCHunyuanVideo15AttnProcessor, MoCCogVideoXAttnProcessor, MoCMochiAttnProcessor],
)
def test_joint_models_without_cp_plan_refuse_context_parallelism(proc_cls):
    proc = proc_cls(MoCConfig())
    proc._parallel_config = _parallel_config()
    attn = SimpleNamespace(add_q_proj=None)
    x = torch.zeros(1, 4, 8)
    with pytest.raises(NotImplementedError, match="no context-parallel plan"):
        proc(attn, x, x, None, (torch.zeros(4, 4), torch.zeros(4, 4)))


def test_example_script_under_torchrun_equals_single_process(tmp_path):
    import subprocess

    import numpy as np
    from diffusers import WanPipeline

    from diffusers_moc.tiny import tiny_wan_components

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "frames.npy"
    env = dict(os.environ, PYTHONPATH=os.path.join(root, "src"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1"]
    cmd += [f"--master_port={_free_port()}", os.path.join(root, "examples", "context_parallel_wan.py")]
    cmd += ["--tiny", "--top-k", "0", "--output", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    pipe = WanPipeline(**tiny_wan_components())
    apply_moc(pipe.transformer, MoCConfig(top_k=0))
    expected = pipe(
        "a red car drives along a street at night",
        num_frames=9,
        height=32,
        width=32,
        num_inference_steps=2,
        max_sequence_length=16,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).frames[0]
    np.testing.assert_allclose(np.load(out), expected, atol=1e-4)
