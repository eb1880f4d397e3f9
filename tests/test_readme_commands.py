"""Every command in the shell blocks of the README and of the pages under docs/ runs as written: the offline ones
(`--tiny`) are run, the others (which download a real model) are parsed by the command line and their configs are
loaded. CI runs the README's install and test commands verbatim."""

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


DOCS = sorted((ROOT / "docs").glob("*.md"))


def _shell_lines(path: Path) -> list[str]:
    """The lines of `path`'s ```bash blocks, continuation lines joined, comments dropped."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(encoding="utf-8"), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                lines.append(" ".join(line.split()))
    return lines


def _commands(path: Path) -> list[str]:
    return [line for line in _shell_lines(path) if line.startswith(PROGRAMS)]


def _offline(commands: list[str]) -> list[str]:
    return [c for c in commands if "--tiny" in shlex.split(c)]


README_COMMANDS = _commands(ROOT / "README.md")
COMMANDS = list(dict.fromkeys(README_COMMANDS + [c for page in DOCS for c in _commands(page)]))
OFFLINE = _offline(COMMANDS)


def test_the_readme_documents_commands():
    assert len(README_COMMANDS) >= 7 and len(_offline(README_COMMANDS)) >= 2, README_COMMANDS
    assert len(COMMANDS) > len(README_COMMANDS), "the docs pages' commands are collected too"


def test_ci_runs_the_readme_install_and_test_commands_verbatim():
    """`.ci/run` is the README's install command, then its test command, and nothing else runs in between."""
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()]
    ci = [line for line in ci if line and not line.startswith("#")]
    install = next(line for line in _shell_lines(ROOT / "README.md") if line.startswith("pip install"))
    test = next(line for line in _shell_lines(ROOT / "README.md") if line.startswith("python -m pytest"))
    assert install.startswith("pip install torch==") and '".[test]"' in install, install
    assert ci[-2:] == [install, test], (ci, install, test)


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
