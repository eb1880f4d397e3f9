"""The shared processor core: per-forward facts, no host reads outside the attention op, whole model objects."""

from __future__ import annotations

import collections
import copy
import io

import pytest
import torch
from _tiny_models import MODELS
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import diffusers_moc.core.attention as attention
from diffusers_moc import MoCConfig, apply_moc, moc_context
from diffusers_moc.core.attention_processors import MoCAttnProcessorBase, MoCHook, MoCWanAttnProcessor

SPARSE = MoCConfig(top_k=1, local_window=0, backend="torch")
# aten ops that read a tensor back to the host or give a data-dependent shape (`.item()`, `bool(t)`, `int(t)` and
# `.tolist()` all reach `_local_scalar_dense`).
_READS = {"_local_scalar_dense", "nonzero", "is_nonzero", "equal", "masked_select", "_unique2", "unique_consecutive"}


# Tensor methods that read to the host (`.tolist()` never reaches the dispatcher, so it is counted here).
_METHODS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "numpy"}


class _AtenReads(TorchDispatchMode):
    def __init__(self, reads: collections.Counter):
        super().__init__()
        self.reads, self.moc_calls = reads, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        if func._schema.name.startswith("diffusers_moc::"):
            self.moc_calls += 1
        elif name in _READS:
            self.reads[f"aten.{name}"] += 1
        elif name == "index" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
            self.reads["aten.index with a boolean mask"] += 1
        return func(*args, **(kwargs or {}))


class HostReads(TorchFunctionMode):
    """Counts host reads, as Tensor method calls and as aten ops. The MoC op is seen as one call by both modes: what
    runs inside it is not counted."""

    def __init__(self):
        super().__init__()
        self.reads: collections.Counter = collections.Counter()
        self._aten = _AtenReads(self.reads)

    @property
    def moc_calls(self) -> int:
        return self._aten.moc_calls

    def __enter__(self):
        self._aten.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        return self._aten.__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _METHODS:
            self.reads[f"Tensor.{name}"] += 1
        return func(*args, **(kwargs or {}))


def _hook(model) -> MoCHook:
    """The model's MoC hook, which its MoC processors hold and its diffusers `HookRegistry` runs (and no other)."""
    hooks = {id(m.processor.hook): m.processor.hook for m in model.modules() if _is_moc(m)}
    registry = model._diffusers_hook
    registered = [h for h in registry.hooks.values() if isinstance(h, MoCHook)]
    assert len(hooks) == 1 and registered == list(hooks.values()) and registry.get_hook("moc") is registered[0]
    return registered[0]


def _is_moc(module) -> bool:
    return isinstance(getattr(module, "processor", None), MoCAttnProcessorBase)


def _reads(model, inputs) -> HostReads:
    with torch.no_grad(), HostReads() as mode:
        model(**inputs)
    return mode


@pytest.mark.parametrize("name", list(MODELS))
def test_no_host_reads_outside_the_attention_op(name):
    model, inputs = MODELS[name]()
    stock = _reads(model, inputs).reads
    apply_moc(model, SPARSE)
    mode = _reads(model, inputs)
    assert mode.moc_calls > 0
    if name == "hunyuan_video15":
        # diffusers' own forward reads (`if torch.all(image_embeds == 0)`, boolean-mask packing); MoC adds none.
        assert stock and mode.reads == stock
    else:
        # Mochi's stock processor finds valid caption tokens with `nonzero`; MoC's reads nothing.
        assert mode.reads == {}, dict(mode.reads)


def test_the_counter_sees_host_reads():
    """The counter is not blind: the rotary fallback of `set_attn_processor` alone reads, and so does the op's body."""
    model, inputs = MODELS["wan"]()
    model.set_attn_processor(MoCWanAttnProcessor(SPARSE))
    assert sum(_reads(model, inputs).reads.values()) > 0
    q = torch.randn(1, 6, 1, 4)
    layout = attention.ChunkLayout.for_video(3, 2)
    routing = attention.route(q, q, layout, SPARSE)
    with HostReads() as mode:
        attention._forward_impl(
            q, q, q, routing.selected, routing.anchors, None, [2, 2, 2], [0] * 3, [False] * 3, 1.0, "torch"
        )
    assert sum(mode.reads.values()) > 0


@pytest.mark.parametrize("name", list(MODELS))
def test_models_with_moc_pickle_and_deepcopy(name):
    model, inputs = MODELS[name]()
    apply_moc(model, SPARSE)
    with torch.no_grad():
        expected = model(**inputs).sample
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    twin = copy.deepcopy(model)
    for other in (loaded, twin):
        with torch.no_grad():
            torch.testing.assert_close(other(**inputs).sample, expected, atol=0, rtol=0)
        # The copy has its own hook, registered on it and shared by its own processors.
        hook = _hook(other)
        procs = {id(m.processor) for m in other.modules() if _is_moc(m)}
        assert procs == {id(hook.processor)} and hook is not _hook(model)
        assert set(hook.layers) == {m for m in other.modules() if _is_moc(m)}


def test_diffusers_hook_registry_is_still_not_copy_safe():
    """Why `register_hook` replaces the forward diffusers' `HookRegistry` installs: with it, a model cannot be pickled,
    and its `copy.deepcopy` runs the original model's forward (its weights), silently. When this fails, diffusers'
    registry has become copy-safe and `diffusers_moc.core.model_hooks.hooked_forward` can go."""
    from diffusers.hooks import HookRegistry, ModelHook

    model, inputs = MODELS["wan"]()
    HookRegistry.check_if_exists_or_initialize(model).register_hook(ModelHook(), "noop")
    with pytest.raises(AttributeError, match="Can't pickle local object"):
        torch.save(model, io.BytesIO())
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in twin.parameters():
            parameter.add_(1.0)
        assert torch.equal(twin(**inputs).sample, model(**inputs).sample)


@pytest.mark.parametrize("name", list(MODELS))
def test_apply_and_remove_leave_no_trace_on_the_modules(name):
    """MoC's hook holds the replaced processors and the layer names; nothing is written on the model's modules but
    diffusers' hook registry and the forward it runs, and `remove_moc` takes the hook off, gives the modules their
    class forward back and puts the very same processors back."""
    from diffusers_moc import remove_moc

    model, inputs = MODELS[name]()

    def added():
        found = {n: set(vars(m)) - attributes[n] for n, m in model.named_modules()}
        return {n: names for n, names in found.items() if names}

    attributes = {name: set(vars(m)) for name, m in model.named_modules()}
    before = {name: m.processor for name, m in model.named_modules() if hasattr(m, "processor")}
    apply_moc(model, SPARSE)
    apply_moc(model, SPARSE)  # applied again: one hook, the first originals kept
    hook = _hook(model)
    assert {hook.layers[m]: p for m, p in hook.originals.items()} == {n: before[n] for n in hook.layers.values()}
    with torch.no_grad():
        model(**inputs)
    hooked = added()
    assert hooked[""] == {"_diffusers_hook", "forward"}
    assert all(names == {"_diffusers_hook", "forward"} for names in hooked.values())
    remove_moc(model)
    assert all(not model.get_submodule(n)._diffusers_hook.hooks for n in hooked)
    assert added() == {n: {"_diffusers_hook"} for n in hooked}
    assert all(model.get_submodule(n).processor is p for n, p in before.items())


def test_moc_replaced_by_hand_leaves_an_inert_hook():
    """`set_attn_processor` over MoC, then `apply_moc` again: the first hook computes nothing and lets go of gradient
    checkpointing, which follows the hook in use, and `remove_moc` leaves the checkpointing function as it was."""
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    from diffusers_moc import remove_moc
    from diffusers_moc.core.attention_processors.base import CheckpointWithFacts

    model, inputs = MODELS["wan"]()
    model.enable_gradient_checkpointing()
    plain = model._gradient_checkpointing_func
    apply_moc(model, SPARSE)
    first = _hook(model)
    with torch.no_grad():
        model(**inputs)
    assert model._gradient_checkpointing_func.hook is first
    model.set_attn_processor(WanAttnProcessor())
    apply_moc(model, SPARSE)
    second = model.blocks[0].attn1.processor.hook
    first.last_facts = None
    with torch.no_grad():
        model(**inputs)
    assert first.last_facts is None and second.last_facts is not None
    assert model._gradient_checkpointing_func.hook is second and model._gradient_checkpointing_func.inner is plain
    remove_moc(model)
    with torch.no_grad():
        model(**inputs)
    assert model._gradient_checkpointing_func is plain and not isinstance(plain, CheckpointWithFacts)


def test_facts_are_computed_once_per_forward_from_the_input_shape(monkeypatch):
    model, inputs = MODELS["wan"]()
    apply_moc(model, SPARSE)
    hook = _hook(model)
    calls = []
    original = MoCWanAttnProcessor.input_grid
    monkeypatch.setattr(MoCWanAttnProcessor, "input_grid", staticmethod(lambda *a: calls.append(1) or original(*a)))
    with torch.no_grad(), moc_context(shot_frames=[1, 3]):
        model(**inputs)
    assert calls == [1]  # once per forward, not once per layer
    facts = hook.last_facts
    assert facts.grid == (4, 2, 2) and facts.layout.shots == (0, 1, 1, 1) and facts.regularise is False


def test_ltx_condition_style_video_coords_give_the_frame_grid():
    """LTXConditionPipeline passes `video_coords`, not num_frames/height/width: the hook reads the frames off their
    time coordinates once per forward (eager)."""
    model, inputs = MODELS["ltx"]()
    frames, height, width = (inputs.pop(n) for n in ("num_frames", "height", "width"))
    inputs.pop("rope_interpolation_scale")
    grid = torch.stack(
        torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in (frames, height, width)), indexing="ij")
    )
    inputs["video_coords"] = grid.flatten(1)[None].expand(2, -1, -1) * torch.tensor([0.32, 32.0, 32.0])[None, :, None]
    with torch.no_grad():
        stock = model(**inputs).sample
        apply_moc(model, MoCConfig(top_k=100, causal=False, backend="torch"))
        torch.testing.assert_close(model(**inputs).sample, stock, atol=1e-5, rtol=1e-5)
    assert _hook(model).last_facts.grid == (frames, 1, height * width)
