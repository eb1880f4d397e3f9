r"""Peak memory and matmul FLOPs of a model run on fake tensors: the real code, shapes and dtypes only, no arithmetic.

Under `FakeTensorMode` every op runs its shape logic and allocates nothing, so a 14B-parameter transformer's forward
and backward at 360k tokens runs on a laptop in a second. `LiveMemory` follows every storage an op creates from its
creation until Python frees it, as the CUDA caching allocator's `max_memory_allocated` counts: sizes rounded up to
512 bytes, storages that existed before (parameters, buffers, inputs) not counted. It records the peak of the sum,
what was live at that peak by category, and the FLOPs of the matrix products and convolutions (PyTorch's own
`torch.utils.flop_counter` formulas). The attention kernels' FLOPs are not counted here: they depend on what is
attended, which the caller knows.

Category "attention": storages created inside `attention_region` (the self-attention call: routing and kernel) and by
the backward of the self-attention kernels; everything else is "activation".

Used by `scale_plan.py`. On a Wan 2.1 1.3B forward it gives the peaks `gpu_check.py` measured on an H200 within 0.3%.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

__all__ = ["FAKE", "LiveMemory", "attention_region", "to_fake"]

#: One fake mode for the whole process: MoC caches small tensors per layout across calls, and fake tensors of two
#: modes cannot mix.
FAKE = FakeTensorMode()

# The CUDA caching allocator rounds every request up to a multiple of 512 bytes.
_ROUND = 512
_aten = torch.ops.aten
_COUNTED = {_aten.mm, _aten.addmm, _aten.bmm, _aten.baddbmm, _aten.convolution, _aten.convolution_backward}


def to_fake(module: torch.nn.Module, dtype_of: Callable[[torch.nn.Module, torch.nn.Parameter], torch.dtype]) -> None:
    r"""
    Replace every parameter and buffer of `module` (built on the meta device) by a fake CPU tensor of its shape.

    Args:
        module (`torch.nn.Module`): the model, on the meta device.
        dtype_of (`Callable`): `(owning module, parameter) -> dtype`, as loading the checkpoint would cast it.
    """
    with FAKE:
        for mod in module.modules():
            for name, p in list(mod._parameters.items()):
                if p is not None:
                    fake = torch.empty_strided(p.shape, p.stride(), dtype=dtype_of(mod, p), device="cpu")
                    mod._parameters[name] = torch.nn.Parameter(fake, requires_grad=p.requires_grad)
            for name, b in list(mod._buffers.items()):
                if b is not None:
                    mod._buffers[name] = torch.empty_strided(b.shape, b.stride(), dtype=b.dtype, device="cpu")


class LiveMemory(TorchDispatchMode):
    r"""
    Bytes of the storages created while active, their peak, what was live at the peak, and matmul FLOPs.

    Args:
        existing (`Iterable[torch.Tensor]`): tensors that exist before (parameters, buffers, inputs, gradients):
            views of them cost nothing.

    Attributes:
        peak (`int`): the largest sum of live bytes.
        at_peak (`dict[str, int]`): live bytes per category at that moment.
        flops (`dict[str, int]`): matmul and convolution FLOPs per category.
    """

    CATEGORIES = ("activation", "attention")

    def __init__(self, existing=()):
        super().__init__()
        self._existing = {id(t.untyped_storage()) for t in existing if isinstance(t, torch.Tensor)}
        self._refs: dict[int, weakref.ref] = {}
        self.live = dict.fromkeys(self.CATEGORIES, 0)
        self.peak = 0
        self.at_peak = dict(self.live)
        self.flops = dict(self.live)
        self.region = 0  # > 0 inside `attention_region`

    def _freed(self, key: int, category: str, nbytes: int) -> Callable:
        def callback(_):
            self.live[category] -= nbytes
            self._refs.pop(key, None)

        return callback

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        category = "attention" if self.region or _self_attention_backward(func, args) else "activation"
        if func._overloadpacket in _COUNTED:
            self.flops[category] += int(flop_registry[func._overloadpacket](*args, **kwargs, out_val=out))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = id(storage)
            if key in self._existing or key in self._refs:
                continue  # a view, or an op writing into an existing tensor
            nbytes = -(-storage.nbytes() // _ROUND) * _ROUND
            self._refs[key] = weakref.ref(storage, self._freed(key, category, nbytes))
            self.live[category] += nbytes
        total = sum(self.live.values())
        if total > self.peak:
            self.peak, self.at_peak = total, dict(self.live)
        return out


def _self_attention_backward(func, args) -> bool:
    """The backward of a self-attention kernel: MoC's op, or a dense kernel whose queries and keys are equally long
    (cross-attention attends to the 512 caption tokens)."""
    name = func.name()
    if not name.endswith("_backward") or "attention" not in name:
        return False
    if name.startswith("diffusers_moc::"):
        return True
    tensors = [a for a in args if isinstance(a, torch.Tensor) and a.dim() == 4]  # grad_out, q, k, v, out
    return len(tensors) >= 3 and tensors[1].shape[-2] == tensors[2].shape[-2]  # (B, H, L, D)


@contextlib.contextmanager
def attention_region(tracker: LiveMemory) -> Iterator[None]:
    """Inside this block, the self-attention calls of diffusers' Wan processor and of MoC's processors (routing and
    kernel) count as "attention"."""
    import diffusers.models.transformers.transformer_wan as wan  # noqa: PLC0415

    import diffusers_moc.core.attention_processors.base as moc_base  # noqa: PLC0415

    def flagged(fn: Callable, is_self: Callable[..., bool]) -> Callable:
        def wrapper(*args, **kwargs):
            if not is_self(*args, **kwargs):
                return fn(*args, **kwargs)
            tracker.region += 1
            try:
                return fn(*args, **kwargs)
            finally:
                tracker.region -= 1

        return wrapper

    dense, moc = wan.dispatch_attention_fn, moc_base.moc_attention
    wan.dispatch_attention_fn = flagged(dense, lambda q, k, *a, **kw: q.shape[1] == k.shape[1])  # (B, L, H, D)
    moc_base.moc_attention = flagged(moc, lambda *a, **kw: True)
    try:
        yield
    finally:
        wan.dispatch_attention_fn, moc_base.moc_attention = dense, moc
