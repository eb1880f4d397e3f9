"""Every command in the README's shell blocks runs as written: the offline ones (`--tiny`) are run, the others (which
download a real model) are parsed by the command line and their configs are loaded."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Commands of this project; `pip install` and `python -m pytest` lines are set-up, not documented usage.
PROGRAMS = ("diffusers-moc", "torchrun", "accelerate", "python examples/")


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#") and line.startswith(PROGRAMS):
                commands.append(" ".join(line.split()))
    return commands


COMMANDS = _readme_commands()
OFFLINE = [c for c in COMMANDS if "--tiny" in shlex.split(c)]


def test_the_readme_documents_commands():
    assert len(COMMANDS) >= 7 and len(OFFLINE) >= 2, COMMANDS


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("command", OFFLINE)
def test_offline_readme_command_runs(command, tmp_path):
    shutil.copytree(ROOT / "examples", tmp_path / "examples")  # relative paths as in the README; outputs land here
    argv = shlex.split(command)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if argv[0] == "diffusers-moc":
        argv = [sys.executable, "-m", "diffusers_moc.cli", *argv[1:]]
    elif argv[0] == "torchrun":  # the same launcher, on a free port (tests may run side by side)
        argv = [sys.executable, "-m", "torch.distributed.run", f"--master_port={_free_port()}", *argv[1:]]
    proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = re.findall(r"^wrote (.+)$", proc.stdout, re.M)
    assert written and all((tmp_path / path).stat().st_size > 0 for path in written), proc.stdout


@pytest.mark.parametrize("command", [c for c in COMMANDS if c not in OFFLINE])
def test_online_readme_command_parses_and_its_inputs_load(command, monkeypatch):
    """Commands that need a real model: their flags parse and their storyboard or config loads."""
    import importlib.util

    from diffusers_moc.cli import build_parser
    from diffusers_moc.pipelines import load_storyboard
    from diffusers_moc.training import load_train_config

    monkeypatch.chdir(ROOT)
    argv = shlex.split(command)
    scripts = [a for a in argv if a.startswith("examples/") and a.endswith(".py")]
    if scripts:
        spec = importlib.util.spec_from_file_location("example", ROOT / scripts[0])
        example = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(example)
        example.parse_args(argv[argv.index(scripts[0]) + 1 :])
        return
    args = build_parser().parse_args(argv[argv.index("diffusers_moc.cli") + 1 :] if "-m" in argv else argv[1:])
    if args.command == "train":
        config = load_train_config(args.config, list(args.overrides), resume_from=args.resume)
        assert config.model.pretrained.startswith("Wan-AI/")
    else:
        assert load_storyboard(args.storyboard).shots
