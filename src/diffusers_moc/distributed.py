"""Generation on several processes: the launcher's process group, Ulysses context parallelism on every transformer
of a pipeline, and a failed process ending every process with an error naming it.

`torchrun` and `accelerate launch` start one process per GPU and describe the group in the environment (`RANK`,
`WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`); [`launch_from_env`] reads it and [`process_group`] joins
the group. When a process fails, it records its error in the group's key-value store before it exits; the others,
whose next collective then fails (or whom the launcher stops), read it and stop with an error naming that rank.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .core.apply import pipeline_transformers

__all__ = [
    "DistributedRunError",
    "Launch",
    "enable_context_parallel",
    "launch_from_env",
    "process_group",
]

#: Store keys: a counter of failed processes and, for the n-th, `FAILED/n` = "rank R: error".
_FAILURES, _FAILED = "diffusers_moc/failures", "diffusers_moc/failed/"


class DistributedRunError(RuntimeError):
    """A process of a multi-process run failed, or stopped because another one did; the message names the rank."""


@dataclass(frozen=True)
class Launch:
    r"""
    This process's place in a multi-process launch.

    Attributes:
        rank (`int`): its rank, `0 .. world_size - 1`; rank 0 alone writes outputs.
        world_size (`int`): the number of processes.
        local_rank (`int`): its rank on this machine (its GPU index).
        degree (`int`): the Ulysses context-parallel degree (every process is in the one group).
    """

    rank: int
    world_size: int
    local_rank: int
    degree: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(environ: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = environ.get(name)
    if value is None and default is not None:
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"environment variable {name}={value!r} is not an integer (set by the launcher)") from None


def launch_from_env(context_parallel: int | None = None, environ: Mapping[str, str] | None = None) -> Launch | None:
    r"""
    The launch described by `torchrun` / `accelerate launch` in the environment, or `None` for a single process.

    Args:
        context_parallel (`int`, *optional*): the Ulysses degree asked for; default: every process. One video is one
            sequence, so the degree must equal the number of processes (processes outside the group would only
            repeat the same video).
        environ (`Mapping[str, str]`, *optional*): the environment (`os.environ`).

    Raises:
        `ValueError`: a degree that does not match the launch, naming both.
    """
    environ = os.environ if environ is None else environ
    world = _env_int(environ, "WORLD_SIZE", 1)
    degree = world if context_parallel is None else context_parallel
    if degree < 1:
        raise ValueError(f"the context-parallel degree must be at least 1, got {degree}")
    if world <= 1:
        if degree > 1:
            raise ValueError(
                f"context parallelism over {degree} processes needs a launcher: this is one process; run "
                f"`torchrun --nproc_per_node {degree} -m diffusers_moc.cli generate ...`"
            )
        return None
    if degree != world:
        raise ValueError(
            f"context-parallel degree {degree}, but {world} processes were launched: every process holds a part of "
            f"the one video, so launch {degree} processes (torchrun --nproc_per_node {degree})"
        )
    rank = _env_int(environ, "RANK")
    return Launch(rank=rank, world_size=world, local_rank=_env_int(environ, "LOCAL_RANK", rank), degree=degree)


@contextlib.contextmanager
def _accelerator_index_on_cpu(device_type: str) -> Iterator[None]:
    # diffusers 0.42.1 `ModelMixin._resolve_parallel_config` derives the rank's device as
    # `rank % torch.accelerator.device_count()`, a division by zero on a machine without an accelerator. On CPU the
    # index is unused (the mesh we pass says where the collectives run), so report one device while it looks.
    if device_type != "cpu" or torch.accelerator.device_count() > 0:
        yield
        return
    original = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = original


def enable_context_parallel(pipe, ulysses_degree: int | None = None, mesh=None) -> None:
    r"""
    Ulysses context parallelism on every transformer of `pipe` (both experts on Wan 2.2 A14B), over one device mesh.

    Call it on every process, after `torch.distributed.init_process_group` and after moving the pipeline to its
    device; MoC may be applied before or after.

    Args:
        pipe: a pipeline (e.g. [`LongVideoPipeline`]) or a transformer.
        ulysses_degree (`int`, *optional*): the number of processes sharing each video; default: all of them.
        mesh (`DeviceMesh`, *optional*): the `("ring", "ulysses")` (or `("dp", "ring", "ulysses")`) mesh to run on;
            default: one `(1, ulysses_degree)` mesh of all processes.
    """
    from diffusers import ContextParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    degree = dist.get_world_size() if ulysses_degree is None else ulysses_degree
    transformers = list(pipeline_transformers(pipe).values()) if hasattr(pipe, "components") else [pipe]
    device_type = next(transformers[0].parameters()).device.type
    # One mesh for all experts: a mesh is a set of communicators, built once rather than per transformer.
    if mesh is None:
        mesh = init_device_mesh(device_type, (1, degree), mesh_dim_names=("ring", "ulysses"))
    with _accelerator_index_on_cpu(device_type):
        for transformer in transformers:
            transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=degree, mesh=mesh))


def _store():
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # no group, or a torch without it: failures are then reported without peers
        return None


def _first_failure(store) -> str | None:
    """The first failure another process recorded, or `None`."""
    try:
        if store is None or not store.check([_FAILED + "1"]):
            return None
        return store.get(_FAILED + "1").decode()
    except Exception:  # the store is gone with its host: nothing to read
        return None


def _record_failure(store, text: str) -> None:
    try:
        if store is not None:
            store.set(_FAILED + str(store.add(_FAILURES, 1)), text)
    except Exception:
        pass


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return f"{type(error).__name__}: {text[:500]}"


@contextlib.contextmanager
def process_group(launch: Launch, device: torch.device | str, timeout: float = 600.0) -> Iterator[None]:
    r"""
    Join the launcher's process group for the block (NCCL on CUDA, gloo on CPU) and leave it afterwards; a group
    that is already initialized is used as it is.

    A failure inside the block is recorded for the other processes and raised as [`DistributedRunError`] naming
    this rank; a process whose collective fails (or whom the launcher stops) after another one failed raises
    [`DistributedRunError`] naming the rank that failed first.

    Args:
        launch ([`Launch`]): from [`launch_from_env`].
        device (`torch.device` or `str`): this process's device (`cuda:LOCAL_RANK` or `cpu`).
        timeout (`float`, defaults to 600): seconds a collective waits for the other processes before it fails, so
            that a process that died without a word (e.g. killed) cannot leave the others waiting forever.
    """
    device = torch.device(device)
    owned = not dist.is_initialized()
    if owned:
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout), **kwargs)
    try:
        yield
    except BaseException as error:
        try:
            replacement = _failure(launch, error)
        except KeyboardInterrupt:  # the launcher stopping every process arrived while this one reported: report
            replacement = _failure(launch, error)
        if replacement is error:
            raise
        raise replacement from error
    finally:
        if owned:
            dist.destroy_process_group()


def _failure(launch: Launch, error: BaseException) -> BaseException:
    """What to raise for `error` on this process: it names the rank that failed first."""
    from .errors import InputError

    if isinstance(error, InputError):  # the same input reaches every process: each refuses it alike
        return error
    store = _store()
    first = _first_failure(store)
    if first is not None:
        return DistributedRunError(f"rank {launch.rank} stopped because {first}")
    if isinstance(error, KeyboardInterrupt):  # Ctrl-C, or the launcher stopping every process
        return error
    if _is_collective_error(error):
        # Not recorded: this process did not fail, it lost the others (one died without a word, e.g. killed).
        return DistributedRunError(
            f"rank {launch.rank} stopped: a collective failed, so another process died without reporting an error "
            f"(killed, or out of memory; the launcher's summary names it): {_one_line(error)}"
        )
    text = f"rank {launch.rank} failed: {_one_line(error)}"
    _record_failure(store, text)
    return DistributedRunError(text)


def _is_collective_error(error: BaseException) -> bool:
    # gloo reports a lost peer as a plain RuntimeError naming its transport; NCCL and timeouts as DistError.
    text = str(error).lower()
    return isinstance(error, dist.DistError) or any(
        word in text for word in ("gloo", "nccl", "connection closed", "connection reset")
    )
