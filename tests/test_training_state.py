"""Training state on disk: checkpoints complete or absent, runs killed mid-save resume to the same weights, nothing
overwritten or lost, and every problem found before the model loads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from unittest import mock

import pytest
import torch
import yaml
from _fork import TIMEOUT_S, cli_until_paused
from _train_helpers import _config, _reset_accelerate
from safetensors.torch import load_file

from diffusers_moc.core.atomic import PAUSE_ENV, PAUSE_FILE_ENV
from diffusers_moc.hub import LORA_WEIGHT_NAME
from diffusers_moc.training import ConfigError, MoCLoRATrainer
from diffusers_moc.training.checkpoints import MARKER_NAME, exported_step, plan_run, scan_checkpoints

pytest.importorskip("imageio.v3")

# Four steps, a checkpoint every two, one kept: the save of checkpoint-4 also rotates checkpoint-2 away.
RUN = {"training": {"max_steps": 4}, "checkpointing": {"every": 2, "total_limit": 1}}


pytestmark = pytest.mark.usefixtures("_one_thread", "_fresh_accelerate_state")


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(folder, LORA_WEIGHT_NAME))


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def reference(data_root, tmp_path_factory, _one_thread):
    """The uninterrupted run: its final weights."""
    _reset_accelerate()
    out = tmp_path_factory.mktemp("reference")
    result = MoCLoRATrainer(_config(data_root, out, **RUN)).train()
    _reset_accelerate()
    assert sorted(os.listdir(out)) == ["checkpoint-4", "final"]
    return _weights(result.final_dir)


def _write_yaml(data_root, out, path, **sections) -> str:
    config = _config(data_root, out, **{**RUN, **sections})
    path.write_text(yaml.safe_dump(config.to_dict()))
    return str(path)


def _temporaries(out) -> list[str]:
    return sorted(n for n in os.listdir(out) if n.startswith("."))


# ---------------------------------------------------------------------- killed mid-save, resumed
@pytest.mark.parametrize(
    "moment, sig, left",
    [
        ("checkpoint-4:begin", signal.SIGINT, ["checkpoint-2"]),
        ("checkpoint-4:weights-saved", signal.SIGKILL, ["checkpoint-2"]),
        ("checkpoint-4:state-saved", signal.SIGINT, ["checkpoint-2"]),
        ("checkpoint-4:marked", signal.SIGKILL, ["checkpoint-2"]),
        ("checkpoint-4:renamed", signal.SIGINT, ["checkpoint-2", "checkpoint-4"]),
        ("checkpoint-4:rotating", signal.SIGKILL, ["checkpoint-4"]),
        ("final:written", signal.SIGINT, ["checkpoint-4"]),
        ("final:written", signal.SIGKILL, ["checkpoint-4"]),
    ],
)
def test_run_killed_while_saving_resumes_to_the_same_weights(data_root, tmp_path, reference, moment, sig, left):
    from diffusers_moc.cli import main

    out = tmp_path / "run"
    config = _write_yaml(data_root, out, tmp_path / "train.yaml")
    code = cli_until_paused(["train", config], moment, sig, tmp_path / "paused")
    assert code == (130 if sig == signal.SIGINT else -signal.SIGKILL)
    complete, _ = scan_checkpoints(str(out))
    assert [os.path.basename(c.path) for c in complete] == left  # complete checkpoints only, never a partial one
    if sig == signal.SIGINT:
        assert _temporaries(out) == []  # Ctrl-C removes what it was writing
    assert not (out / "final").exists()

    _reset_accelerate()
    assert main(["train", config, "--resume", "latest"]) == 0
    _assert_same_weights(_weights(out / "final"), reference)
    # The temporary folders of the killed run are gone; the checkpoint it resumed from is kept.
    assert sorted(os.listdir(out)) == sorted({*left, "checkpoint-4", "final"})


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_run_killed_while_replacing_final_keeps_a_complete_one(data_root, tmp_path, reference, sig):
    from diffusers_moc.cli import main

    out = tmp_path / "run"
    config = _write_yaml(data_root, out, tmp_path / "train.yaml")
    assert main(["train", config, "--set", "training.max_steps=2"]) == 0
    assert exported_step(str(out / "final")) == 2
    _reset_accelerate()
    code = cli_until_paused(["train", config, "--resume", "latest"], "replace:final:moved-old", sig, tmp_path / "p")
    if sig == signal.SIGINT:
        # Ctrl-C is held back between the two renames: the new final/ is in place, then the run stops.
        assert code == 130 and exported_step(str(out / "final")) == 4 and _temporaries(out) == []
    else:
        assert code == -signal.SIGKILL and not (out / "final").exists()
        assert _temporaries(out) == [".final.old", ".final.partial"]
    _reset_accelerate()
    # The next run restores the old final/ (or keeps the new one), sees checkpoint-4 reached max_steps and
    # exports it (or, with the new final/ in place, has nothing to do).
    assert main(["train", config, "--resume", "latest"]) == 0
    assert exported_step(str(out / "final")) == 4
    _assert_same_weights(_weights(out / "final"), reference)
    assert _temporaries(out) == []


def test_ctrl_c_of_the_command_line_during_a_save(data_root, tmp_path):
    """The real `diffusers-moc train` process, interrupted as a user would, while the LoRA is being written."""
    out = tmp_path / "run"
    config = _write_yaml(data_root, out, tmp_path / "train.yaml")
    flag = tmp_path / "paused"
    env = {**os.environ, PAUSE_ENV: "checkpoint-2:weights-saved", PAUSE_FILE_ENV: str(flag)}
    # `python -m diffusers_moc.cli`, with SIGINT handled as in a terminal (see _fork.as_in_a_terminal).
    start = (
        "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "runpy.run_module('diffusers_moc.cli', run_name='__main__')"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", start, "train", config],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + TIMEOUT_S  # bounds a failure only: the pause file says when to press Ctrl-C
        while not flag.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if not flag.exists():
            proc.kill()
            pytest.fail(f"the run did not reach its pause point: {proc.communicate()}")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "interrupted", err
    assert sorted(os.listdir(out)) == []  # nothing half-written left behind


# ---------------------------------------------------------------------- nothing overwritten, nothing lost
def test_continuing_a_finished_run_says_so_and_writes_nothing(data_root, tmp_path, caplog):
    out = tmp_path / "run"
    MoCLoRATrainer(_config(data_root, out, **RUN)).train()
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    _reset_accelerate()
    with mock.patch.object(MoCLoRATrainer, "_load_components") as load:
        result = MoCLoRATrainer(
            _config(data_root, out, **{**RUN, "checkpointing": {**RUN["checkpointing"], "resume_from": "latest"}})
        ).train()
    load.assert_not_called()
    assert result.final_dir is None and "nothing to do" in result.message and "max_steps=4" in result.message
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()} == before


def test_resume_keeps_its_checkpoint_and_never_overwrites_later_ones(data_root, tmp_path):
    out = tmp_path / "run"
    keep_all = {"training": {"max_steps": 4}, "checkpointing": {"every": 2}}
    MoCLoRATrainer(_config(data_root, out, **keep_all)).train()
    _reset_accelerate()
    early = str(out / "checkpoint-2")
    with pytest.raises(
        ConfigError, match=r"checkpointing.resume_from: resuming at step 2 would overwrite .*checkpoint-4"
    ):
        MoCLoRATrainer(_config(data_root, out, checkpointing={"every": 2, "resume_from": early})).train()

    # Resumed from checkpoint-2 with total_limit=1: the rotation removes checkpoint-4 once checkpoint-6 is saved,
    # but never the checkpoint the run resumed from.
    os.rename(out / "checkpoint-4", tmp_path / "checkpoint-4-moved")
    (out / "final").rename(tmp_path / "final-moved")
    _reset_accelerate()
    limited = {"every": 2, "total_limit": 1, "resume_from": "latest"}
    MoCLoRATrainer(_config(data_root, out, training={"max_steps": 6}, checkpointing=limited)).train()
    assert sorted(os.listdir(out)) == ["checkpoint-2", "checkpoint-6", "final"]


def test_a_fresh_run_into_a_used_output_dir_is_refused(data_root, tmp_path):
    out = tmp_path / "run"
    MoCLoRATrainer(_config(data_root, out, training={"max_steps": 1})).train()  # final/ only, no checkpoint
    _reset_accelerate()
    with mock.patch.object(MoCLoRATrainer, "_load_components") as load:
        with pytest.raises(ConfigError, match="already holds final/ .*--resume latest"):
            MoCLoRATrainer(_config(data_root, out, training={"max_steps": 1})).train()
    load.assert_not_called()


@pytest.mark.parametrize("field", ["output_dir", "data.cache_dir"])
def test_unwritable_folders_fail_before_the_model_loads(data_root, tmp_path, field):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")  # a folder cannot be created inside a file (works as root too, unlike chmod)
    sections = {"data": {"cache": True, "cache_dir": str(blocker / "cache")}} if field == "data.cache_dir" else {}
    out = blocker / "out" if field == "output_dir" else tmp_path / "out"
    with mock.patch.object(MoCLoRATrainer, "_load_components") as load:
        with pytest.raises(ConfigError, match=f"^{field}: cannot write to {blocker}"):
            MoCLoRATrainer(_config(data_root, out, **sections)).train()
    load.assert_not_called()


def test_a_run_that_fails_its_checks_leaves_no_output_folder(tmp_path):
    out = tmp_path / "runs" / "new"
    with pytest.raises(ConfigError, match="data.root"):
        MoCLoRATrainer(_config(tmp_path / "no-such-data", out)).train()
    assert not (tmp_path / "runs").exists()


def test_model_too_small_for_the_size_fails_before_encoding(data_root, tmp_path):
    from diffusers import AutoencoderKLWan

    config = _config(data_root, tmp_path, data={"height": 480, "width": 832, "cache": True, "validate_clips": False})
    with mock.patch.object(AutoencoderKLWan, "encode") as encode:
        with pytest.raises(ConfigError, match=r"data.width: 832 pixels are 52 patches, .* rope_max_seq_len=32"):
            MoCLoRATrainer(config).train()
    encode.assert_not_called()
    assert not (tmp_path / "cache").exists() or not os.listdir(tmp_path / "cache")


# ---------------------------------------------------------------------- the run plan, from folders alone
def _checkpoint(out, step: int, complete: bool = True):
    path = out / f"checkpoint-{step}"
    path.mkdir(parents=True)
    if complete:
        (path / MARKER_NAME).write_text(json.dumps({"step": step}))
    return str(path)


def test_plan_takes_the_newest_complete_checkpoint_and_warns_about_the_rest(tmp_path):
    _checkpoint(tmp_path, 2)
    _checkpoint(tmp_path, 4)
    _checkpoint(tmp_path, 6, complete=False)  # a save interrupted by an older version: no marker
    (tmp_path / "checkpoint-8").mkdir()
    (tmp_path / "checkpoint-8" / MARKER_NAME).write_text("{not json")
    plan = plan_run(str(tmp_path), "latest", max_steps=10)
    assert plan.action == "train" and plan.resume.step == 4 and plan.protected == plan.resume.path
    assert sum("incomplete checkpoint" in w for w in plan.warnings) == 2

    with pytest.raises(ConfigError, match="already holds checkpoints .*checkpoint-2, checkpoint-4"):
        plan_run(str(tmp_path), None, max_steps=10)
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        plan_run(str(tmp_path), str(tmp_path / "checkpoint-6"), max_steps=10)
    with pytest.raises(ConfigError, match="does not exist"):
        plan_run(str(tmp_path), str(tmp_path / "checkpoint-9"), max_steps=10)


def test_plan_at_or_past_max_steps(tmp_path):
    _checkpoint(tmp_path, 4)
    assert plan_run(str(tmp_path), "latest", max_steps=4).action == "export"  # final/ is missing
    assert plan_run(str(tmp_path), "latest", max_steps=3).action == "done"
    assert plan_run(str(tmp_path), "latest", max_steps=5).action == "train"
    assert plan_run(str(tmp_path / "empty"), "latest", max_steps=5).resume is None


def test_resume_with_other_settings_warns_or_fails_clearly(data_root, tmp_path, caplog):
    out = tmp_path / "run"
    MoCLoRATrainer(_config(data_root, out, training={"max_steps": 2}, checkpointing={"every": 2})).train()
    (out / "final").rename(tmp_path / "final-moved")
    resume = {"every": 2, "resume_from": "latest"}
    _reset_accelerate()
    with caplog.at_level("WARNING", logger="diffusers_moc.training.trainer"):
        changed = {"max_steps": 3, "learning_rate": 5e-4}
        MoCLoRATrainer(_config(data_root, out, training=changed, checkpointing=resume)).train()
    warning = " ".join(r.getMessage() for r in caplog.records if "different settings" in r.getMessage())
    assert "training.learning_rate: 0.001 -> 0.0005" in warning and "max_steps" not in warning
    _reset_accelerate()
    (out / "final").rename(tmp_path / "final-2")
    with pytest.raises(ConfigError, match="checkpointing.resume_from: .*checkpoint-2 cannot be loaded .*size mismatch"):
        MoCLoRATrainer(
            _config(data_root, out, lora={"rank": 8}, training={"max_steps": 3}, checkpointing=resume)
        ).train()
