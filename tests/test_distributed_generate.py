"""`LongVideoPipeline` and `diffusers-moc generate` under Ulysses context parallelism: 2 CPU processes (gloo) equal
one process, rank 0 alone decodes and writes, bad degrees are refused before any model loads, and a failed process
ends every process with an error naming it."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(__file__))
from _cp_long_video_worker import CASES, ROOT, STORYBOARD_YAML, generate_args, run_case, worker  # noqa: E402

from diffusers_moc.cli import main  # noqa: E402

av = pytest.importorskip("av")
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_frames(path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.fixture(scope="module")
def cp_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("cp_long_video")
    storyboard = tmp_path_factory.mktemp("storyboard") / "shots.yaml"
    storyboard.write_text(STORYBOARD_YAML)
    mp.spawn(worker, args=(2, _free_port(), str(out_dir), str(storyboard)), nprocs=2, join=True)
    return out_dir, storyboard, [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("model", list(CASES))
def test_long_video_pipeline_under_ulysses_equals_one_process(cp_run, model):
    _, _, ranks = cp_run
    expected = run_case(model, context_parallel=False)
    if model == "wan2.1-t2v":  # decoded frames: rank 0 alone decodes, the other rank gets None
        np.testing.assert_allclose(ranks[0][model], expected, atol=1e-4)
        assert ranks[1][model] is None
        return
    for rank in ranks:  # latents: every rank holds the whole video
        torch.testing.assert_close(rank[model], expected, atol=1e-4, rtol=1e-4)


def test_generate_under_ulysses_writes_once_what_one_process_writes(cp_run, tmp_path, capsys):
    out_dir, storyboard, ranks = cp_run
    assert [r["generate"] for r in ranks] == [0, 0]
    # Rank 0 wrote the video; rank 1 wrote nothing and said nothing.
    assert re.findall(r"^wrote (.+)$", ranks[0]["generate_stdout"], re.M) == [str(out_dir / "cp.mp4")]
    assert ranks[1]["generate_stdout"] == ""
    assert sorted(p.name for p in out_dir.iterdir()) == ["cp.mp4", "rank0.pt", "rank1.pt"]  # no leftovers
    assert main(generate_args(str(storyboard), str(tmp_path / "one.mp4"))) == 0
    one, cp = _read_frames(tmp_path / "one.mp4"), _read_frames(out_dir / "cp.mp4")
    assert one.shape == cp.shape and one.shape[0] == 5 + 9
    np.testing.assert_allclose(cp.astype(int), one.astype(int), atol=2)


# ------------------------------------------------------------------------------------------------ refused early


STORYBOARD = os.path.join(ROOT, "examples", "storyboard.yaml")


@pytest.fixture
def no_model(monkeypatch):
    """Fail if anything loads a model or joins a process group."""
    from diffusers_moc.commands import generate

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(generate, "_load_pipeline", refuse)
    monkeypatch.setattr(dist, "init_process_group", refuse)


def _launched(monkeypatch, world: int, rank: int = 0) -> None:
    for name, value in (("WORLD_SIZE", world), ("RANK", rank), ("LOCAL_RANK", rank)):
        monkeypatch.setenv(name, str(value))


def _wan_folder(tmp_path, heads: int) -> str:
    """A Wan 2.1 T2V diffusers folder holding only configs (enough to check it, not to run it)."""
    folder = tmp_path / "wan"
    (folder / "transformer").mkdir(parents=True)
    (folder / "vae").mkdir()
    index = {"_class_name": "WanPipeline", "transformer": ["diffusers", "WanTransformer3DModel"]}
    index["vae"] = ["diffusers", "AutoencoderKLWan"]
    (folder / "model_index.json").write_text(json.dumps(index))
    transformer = {"_class_name": "WanTransformer3DModel", "num_attention_heads": heads, "patch_size": [1, 2, 2]}
    (folder / "transformer" / "config.json").write_text(json.dumps({**transformer, "in_channels": 16}))
    (folder / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLWan", "z_dim": 16}))
    return str(folder)


@pytest.mark.parametrize(
    "world, extra, match",
    [
        # 48x48 pixels are 3x3 patches: 55 latent frames of 9 tokens.
        (2, ["--tiny", "--height", "48", "--width", "48"], r"495 video tokens is not divisible by 2 .*48x48"),
        (4, ["--tiny"], r"2 attention heads is not divisible by 4 \(the tiny model: 2 heads"),
        (8, ["--model", "WAN", "--height", "480", "--width", "832"], r"12 attention heads is not divisible by 8"),
        (2, ["--tiny", "--context-parallel", "4"], r"degree 4, but 2 processes were launched"),
        (1, ["--tiny", "--context-parallel", "2"], r"needs a launcher: this is one process; run `torchrun"),
        (2, ["--tiny", "--routing-map", "map.png"], r"--routing-map is not available with context parallelism"),
    ],
)
def test_bad_context_parallel_settings_are_refused_before_any_model_loads(
    world, extra, match, tmp_path, monkeypatch, capsys, no_model
):
    _launched(monkeypatch, world)
    extra = [_wan_folder(tmp_path, heads=12) if a == "WAN" else a for a in extra]
    assert main(["generate", STORYBOARD, "-o", str(tmp_path / "out.mp4"), *extra]) == 2
    assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "out.mp4").exists()


def test_only_rank_0_prints_a_refusal(tmp_path, monkeypatch, capsys, no_model):
    _launched(monkeypatch, 4, rank=3)
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", STORYBOARD, "-o", str(tmp_path / "out.mp4"), "--tiny"])
    assert exit_info.value.code == 2 and capsys.readouterr().err == ""


# ------------------------------------------------------------------------------------------------ failures


@pytest.mark.parametrize("how", ["raise", "kill"])
def test_a_failed_process_ends_every_process_with_its_rank_named(how, tmp_path):
    """Rank 1 raises (or is killed) at denoising step 1, while rank 0 waits for it in a collective."""
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"), OMP_NUM_THREADS="1")
    env.update(FAIL_RANK="1", FAIL_STEP="1", FAIL_HOW=how)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1"]
    cmd += [f"--master_port={_free_port()}", os.path.join(ROOT, "tests", "_failing_generate.py")]
    cmd += ["generate", STORYBOARD, "--tiny", "--quiet", "-o", str(tmp_path / "long.mp4")]
    start = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=500)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    # Generous: a run takes ~15 s here; a process left waiting on a dead peer would take --dist-timeout (600 s).
    assert elapsed < 300, elapsed
    if how == "raise":
        assert "error: DistributedRunError: rank 1 failed: RuntimeError: injected failure at step 1" in proc.stderr
        assert "rank 0 stopped because rank 1 failed: RuntimeError: injected failure" in proc.stderr
    else:
        assert "rank 0 stopped: a collective failed, so another process died" in proc.stderr
        assert re.search(r"rank\s*: 1 \(local_rank: 1\)\s+exitcode\s*: -9", proc.stderr)  # torchrun's summary
    assert os.listdir(tmp_path) == []  # complete or absent: nothing, not even a temporary file


def test_long_video_pipeline_refuses_tokens_the_degree_does_not_divide(monkeypatch):
    from diffusers_moc.pipelines import LongVideoPipeline
    from diffusers_moc.tiny import tiny_wan_components

    pipe = LongVideoPipeline(**tiny_wan_components())
    monkeypatch.setattr(LongVideoPipeline, "_context_parallel", lambda self: (0, 2))
    # 48x48 pixels are 3x3 patches; 5 frames are 2 latent frames: 18 tokens split evenly, 9 frames (3) are 27.
    pipe.check_inputs(["a cat"], None, None, 48, 48, 5, 16, 2, 1, "np", 16, None)
    with pytest.raises(ValueError, match="27 video tokens is not divisible by 2"):
        pipe.check_inputs(["a cat"], None, None, 48, 48, 9, 16, 2, 1, "np", 16, None)
