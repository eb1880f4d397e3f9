"""Training state on disk, all-or-nothing: the run plan at start, checkpoints and the exported `final/` folder.

What `output_dir` holds::

    checkpoint-<step>/            a complete checkpoint: accelerate's state, the LoRA in diffusers format, and
                                  `diffusers_moc_checkpoint.json` (written last, names the step)
    .checkpoint-<step>.partial/   a checkpoint being written; renamed to `checkpoint-<step>` once complete
    .checkpoint-<step>.deleting/  a checkpoint being removed (renamed first, so a half-deleted one is never taken)
    final/                        the exported adapter; replaced only by a complete new one (`.final.partial/`)

An interrupted or killed run therefore leaves complete checkpoints and temporary folders only; the next run takes the
newest complete checkpoint, warns about the rest and removes the temporary folders.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from typing import Literal

from ..core.atomic import (
    deferred_interrupts,
    pause_point,
    recover_replaced_dir,
    remove_path,
    replace_dir,
    write_text_atomic,
)
from .config import ConfigError

__all__ = [
    "CHECKPOINT_PREFIX",
    "MARKER_NAME",
    "Checkpoint",
    "RunPlan",
    "check_writable",
    "exported_step",
    "plan_run",
    "prepare_output_dir",
    "resume_differences",
    "save_checkpoint",
    "scan_checkpoints",
    "write_final",
]

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
#: Written last into a checkpoint: a checkpoint folder without it is incomplete.
MARKER_NAME = "diffusers_moc_checkpoint.json"
FINAL_NAME = "final"
_COMPLETE = re.compile(r"^checkpoint-(\d+)$")
_TEMPORARY = re.compile(r"^\.(checkpoint-\d+|final)\.(partial|deleting)$")


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint folder and the optimizer step it holds."""

    path: str
    step: int


def _marker_step(path: str) -> int | None:
    """The step recorded in `path`'s marker, or `None` when the marker is missing or unreadable."""
    try:
        with open(os.path.join(path, MARKER_NAME), encoding="utf-8") as f:
            step = json.load(f).get("step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) and step >= 0 else None


def scan_checkpoints(output_dir: str) -> tuple[list[Checkpoint], list[str]]:
    r"""
    The checkpoints of `output_dir`.

    Returns:
        `(complete, incomplete)`: complete checkpoints sorted by step, and the paths of `checkpoint-<step>` folders
        without a valid marker (interrupted saves of older versions, or damaged) and of temporary folders.
    """
    if not os.path.isdir(output_dir):
        return [], []
    complete, incomplete = [], []
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        match = _COMPLETE.match(name)
        if match and os.path.isdir(path):
            step = _marker_step(path)
            if step == int(match.group(1)):
                complete.append(Checkpoint(path, step))
            else:
                incomplete.append(path)
        elif _TEMPORARY.match(name):
            incomplete.append(path)
    complete.sort(key=lambda c: c.step)
    return complete, incomplete


def resume_differences(checkpoint: str, run_info: dict) -> list[str]:
    r"""
    The settings that differ between the run that wrote `checkpoint` and this one (`"training.learning_rate: 0.0001
    -> 0.001"`, ...), among those that make a resume exact: with any of them changed, the resumed run is not the run
    that would have gone on uninterrupted.
    """
    try:
        with open(os.path.join(checkpoint, MARKER_NAME), encoding="utf-8") as f:
            before = json.load(f).get("run") or {}
    except (OSError, ValueError, AttributeError):
        return []
    now = json.loads(json.dumps(run_info, default=str))
    keys = sorted(set(before) | set(now))
    return [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in keys if k in before and before.get(k) != now.get(k)]


def exported_step(final_dir: str) -> int | None:
    """The training step recorded in the model card of an exported `final/` folder, if any."""
    try:
        with open(os.path.join(final_dir, "README.md"), encoding="utf-8") as f:
            card = f.read()
    except (OSError, ValueError):
        return None
    match = re.search(r"## Training settings\s*```json\n(.*?)\n```", card, re.S)
    try:
        step = json.loads(match.group(1)).get("steps") if match else None
    except (ValueError, AttributeError):
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def check_writable(folder: str, field_path: str) -> None:
    """Write a probe file in `folder`, or where it would be created (its nearest existing parent folder), so that a
    run that fails later leaves no empty folder behind; a failure is a [`ConfigError`] naming the field."""
    existing = os.path.abspath(folder)
    while not os.path.lexists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(field_path, f"cannot write to {folder}: {existing} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=existing)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        reason = e.strerror or str(e)
        raise ConfigError(field_path, f"cannot write to {folder}: {reason}") from None


def prepare_output_dir(output_dir: str, clean_up: bool = True) -> None:
    r"""
    Before anything is loaded: check that `output_dir` is writable (and its `final/`, `logs/`, `validation/`
    subfolders where present); with `clean_up` (the main process), undo an interrupted replacement of `final/` and
    remove the temporary folders of interrupted saves (with a warning).
    """
    check_writable(output_dir, "output_dir")
    for sub in (FINAL_NAME, "logs", "validation"):
        path = os.path.join(output_dir, sub)
        if os.path.isdir(path):
            check_writable(path, "output_dir")
    if not clean_up or not os.path.isdir(output_dir):
        return
    if recover_replaced_dir(os.path.join(output_dir, FINAL_NAME)):
        logger.warning("restored %s/final: a run was killed while replacing it", output_dir)
    for name in sorted(os.listdir(output_dir)):
        match = _TEMPORARY.match(name)
        if match:
            if match.group(2) == "partial":
                logger.warning("removing %s: an interrupted run was writing it", os.path.join(output_dir, name))
            remove_path(os.path.join(output_dir, name))


@dataclass
class RunPlan:
    r"""
    What a `train()` call does, decided from `output_dir` before any model is loaded.

    Attributes:
        action (`str`): `"train"` (train from `start_step` to `max_steps`), `"export"` (the checkpoint reached
            `max_steps` but `final/` is missing or older: write it, no training) or `"done"` (nothing to do).
        resume (`Checkpoint`, *optional*): the checkpoint to load.
        start_step (`int`): the step training starts from.
        message (`str`, *optional*): why there is nothing (or only an export) to do.
        protected (`str`, *optional*): the checkpoint resumed from, which the `total_limit` rotation keeps.
        warnings (`list[str]`): things the user should know (incomplete checkpoints, a `final/` to be replaced).
    """

    action: Literal["train", "export", "done"]
    resume: Checkpoint | None = None
    start_step: int = 0
    message: str | None = None
    protected: str | None = None
    warnings: list[str] = field(default_factory=list)


def _names(checkpoints: list[Checkpoint]) -> str:
    names = [os.path.basename(c.path) for c in checkpoints]
    return ", ".join(names[:3] + ([f"... ({len(names)} in all)"] if len(names) > 3 else []))


def _explicit_checkpoint(path: str) -> Checkpoint:
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError("checkpointing.resume_from", f"{path!r} is a file, not a checkpoint folder")
    if not os.path.isdir(path):
        raise ConfigError("checkpointing.resume_from", f"checkpoint folder {path!r} does not exist")
    step = _marker_step(path)
    if step is None:
        raise ConfigError(
            "checkpointing.resume_from",
            f"{path} is not a complete checkpoint (no valid {MARKER_NAME}): its save was interrupted, or it was not "
            "written by diffusers-moc train",
        )
    return Checkpoint(os.path.abspath(path), step)


def plan_run(output_dir: str, resume_from: str | None, max_steps: int) -> RunPlan:
    r"""
    Decide what to do, from the checkpoints and `final/` of `output_dir` (read only).

    Raises:
        [`ConfigError`]: when training would overwrite earlier work (checkpoints of an earlier run or later than the
            resume point, or the `final/` of an earlier run without resuming), or the resume checkpoint is not
            complete.
    """
    complete, incomplete = scan_checkpoints(output_dir)
    plan = RunPlan(action="train")
    plan.warnings += [
        f"ignoring {p}: an incomplete checkpoint (its save was interrupted); it is replaced if that step is saved again"
        for p in incomplete
        if _COMPLETE.match(os.path.basename(p))
    ]
    final_dir = os.path.join(output_dir, FINAL_NAME)
    final_step = exported_step(final_dir) if os.path.isdir(final_dir) else None
    final_exists = os.path.isdir(final_dir)

    if resume_from is None:
        if complete or final_exists:
            what = f"checkpoints ({_names(complete)})" if complete else f"{FINAL_NAME}/ (step {final_step})"
            raise ConfigError(
                "checkpointing.resume_from",
                f"is not set, but {output_dir} already holds {what} of an earlier run, which training would "
                "overwrite: continue it with --resume latest, or train into another output_dir",
            )
        return plan
    if resume_from == "latest":
        plan.resume = complete[-1] if complete else None
        if plan.resume is None:
            logger.info(
                "checkpointing.resume_from=latest: no complete checkpoint in %s, starting at step 0", output_dir
            )
    else:
        plan.resume = _explicit_checkpoint(resume_from)
    plan.start_step = plan.resume.step if plan.resume else 0
    later = [c for c in complete if c.step > plan.start_step]
    if later:
        raise ConfigError(
            "checkpointing.resume_from",
            f"resuming at step {plan.start_step} would overwrite the later checkpoints {_names(later)} of "
            f"{output_dir}: resume from the newest (--resume latest), or move them away",
        )
    if plan.resume is not None and os.path.dirname(plan.resume.path) == os.path.abspath(output_dir):
        plan.protected = plan.resume.path

    if final_step is not None and final_step >= max_steps and (resume_from == "latest" or plan.resume is None):
        plan.action = "done"
        plan.message = (
            f"nothing to do: {final_dir} already holds the adapter trained to step {final_step} and "
            f"training.max_steps={max_steps} is reached; raise training.max_steps to train on, or use another "
            "output_dir"
        )
    elif plan.start_step > max_steps:
        plan.action = "done"
        plan.message = (
            f"nothing to do: {plan.resume.path} is at step {plan.start_step}, past training.max_steps={max_steps}; "
            "raise training.max_steps to train on"
        )
    elif plan.start_step == max_steps:
        plan.action = "export"
        plan.message = (
            f"{plan.resume.path} reached training.max_steps={max_steps}; writing the {FINAL_NAME}/ folder it lacks"
        )
    elif final_exists:
        plan.warnings.append(
            f"{final_dir} (step {final_step}) is replaced by this run's adapter when the run completes"
        )
    return plan


def save_checkpoint(
    accelerator,
    output_dir: str,
    step: int,
    total_limit: int | None,
    protected: str | None,
    run_info: dict | None = None,
) -> str:
    r"""
    Save `accelerator.save_state` as `output_dir/checkpoint-<step>`, all-or-nothing, then apply the `total_limit`
    rotation (oldest complete checkpoints first; never `protected`, the checkpoint this run resumed from).
    `run_info` (the settings that make a resume exact, see [`resume_differences`]) goes into the marker.

    Every process calls this (each saves its own RNG state); the main process renames and rotates.

    Returns:
        `str`: the checkpoint folder.
    """
    path = os.path.join(output_dir, f"{CHECKPOINT_PREFIX}{step}")
    tmp = os.path.join(output_dir, f".{CHECKPOINT_PREFIX}{step}.partial")
    main = accelerator.is_main_process
    if main:
        remove_path(tmp)
    accelerator.wait_for_everyone()
    try:
        pause_point(f"checkpoint-{step}:begin")
        accelerator.save_state(tmp)
        accelerator.wait_for_everyone()
        if main:
            pause_point(f"checkpoint-{step}:state-saved")
            marker = {"step": step, "format": 1, "run": run_info or {}}
            write_text_atomic(os.path.join(tmp, MARKER_NAME), json.dumps(marker, default=str) + "\n")
            pause_point(f"checkpoint-{step}:marked")
            with deferred_interrupts():
                if os.path.lexists(path):  # an incomplete folder of that name (see plan_run): replaced
                    os.rename(path, os.path.join(output_dir, f".{CHECKPOINT_PREFIX}{step}.deleting"))
                os.rename(tmp, path)
            pause_point(f"checkpoint-{step}:renamed")
            remove_path(os.path.join(output_dir, f".{CHECKPOINT_PREFIX}{step}.deleting"))
            logger.info("saved checkpoint %s", path)
            if total_limit is not None:
                _rotate(output_dir, step, total_limit, protected)
    finally:
        if main and os.path.lexists(tmp):
            with deferred_interrupts():
                remove_path(tmp)
    accelerator.wait_for_everyone()
    return path


def _rotate(output_dir: str, step: int, total_limit: int, protected: str | None) -> None:
    complete, _ = scan_checkpoints(output_dir)
    keep = {c.path for c in complete[-total_limit:]} | {protected}
    for old in [c for c in complete if c.path not in keep]:
        doomed = os.path.join(output_dir, f".{os.path.basename(old.path)}.deleting")
        with deferred_interrupts():
            os.rename(old.path, doomed)
        pause_point(f"checkpoint-{step}:rotating")
        remove_path(doomed)
        logger.info("removed %s (checkpointing.total_limit=%d)", old.path, total_limit)


def write_final(output_dir: str, write) -> str:
    r"""
    Write the exported adapter folder with `write(folder)` into `.final.partial`, then put it at `output_dir/final`
    in place of the old one ([`replace_dir`]).

    Returns:
        `str`: the `final/` folder.
    """
    dest = os.path.join(output_dir, FINAL_NAME)
    tmp = os.path.join(output_dir, f".{FINAL_NAME}.partial")
    remove_path(tmp)
    try:
        write(tmp)
        pause_point("final:written")
        replace_dir(tmp, dest)
    finally:
        if os.path.lexists(tmp):
            with deferred_interrupts():
                remove_path(tmp)
    return dest
