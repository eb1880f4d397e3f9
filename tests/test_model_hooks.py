"""MoC installs through diffusers' `HookRegistry`: it stacks with diffusers' own hooks in either order, keeps the
model's signature, and a forward that bypasses it raises instead of reusing an earlier forward's facts."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from _tiny_models import MODELS
from accelerate.hooks import ModelHook as AccelerateHook
from accelerate.hooks import add_hook_to_module, remove_hook_from_module
from diffusers.hooks import HookRegistry, ModelHook

from diffusers_moc import MoCConfig, apply_moc, remove_moc
from diffusers_moc.core.model_hooks import hooked_forward

SPARSE = MoCConfig(top_k=1, local_window=0, backend="torch")


class _Double(ModelHook):
    """A diffusers hook that doubles the model's output."""

    def post_forward(self, module, output):
        return output.__class__(sample=2 * output.sample)


class _Triple(ModelHook):
    """A diffusers hook with its own forward (as diffusers' cache hooks have), which triples the model's output."""

    def new_forward(self, module, *args, **kwargs):
        output = self.fn_ref.original_forward(*args, **kwargs)
        return output.__class__(sample=3 * output.sample)


def _sample(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).sample


@pytest.mark.parametrize("moc_first", [True, False])
def test_moc_stacks_with_other_diffusers_hooks(moc_first):
    model, inputs = MODELS["wan"]()
    stock = _sample(model, inputs)
    sparse = _sample(apply_moc(copy.deepcopy(model), SPARSE), inputs)
    registry = HookRegistry.check_if_exists_or_initialize(model)
    if moc_first:
        apply_moc(model, SPARSE)
        registry.register_hook(_Double(), "double")
    else:
        registry.register_hook(_Double(), "double")
        apply_moc(model, SPARSE)
    torch.testing.assert_close(_sample(model, inputs), 2 * sparse, rtol=0, atol=0)
    apply_moc(model, SPARSE)  # applied again: registered anew, last
    assert list(registry.hooks) == ["double", "moc"]
    torch.testing.assert_close(_sample(model, inputs), 2 * sparse, rtol=0, atol=0)
    remove_moc(model)
    assert list(registry.hooks) == ["double"]
    torch.testing.assert_close(_sample(model, inputs), 2 * stock, rtol=0, atol=0)
    registry.remove_hook("double")
    torch.testing.assert_close(_sample(model, inputs), stock, rtol=0, atol=0)


def test_diffusers_removes_the_other_hook_under_moc():
    model, inputs = MODELS["wan"]()
    sparse = _sample(apply_moc(copy.deepcopy(model), SPARSE), inputs)
    registry = HookRegistry.check_if_exists_or_initialize(model)
    registry.register_hook(_Double(), "double")
    apply_moc(model, SPARSE)
    registry.remove_hook("double")  # below MoC's hook in the chain
    torch.testing.assert_close(_sample(model, inputs), sparse, rtol=0, atol=0)
    assert model.forward.func is hooked_forward


def test_the_signature_is_the_models():
    model, _ = MODELS["wan"]()
    expected = inspect.signature(model.forward)
    apply_moc(model, SPARSE)
    assert model.forward.func is hooked_forward
    assert inspect.signature(model.forward) == expected


def test_facts_last_one_forward():
    """The facts are the running forward's: afterwards a layer called alone raises, naming the cause."""
    model, inputs = MODELS["wan"]()
    apply_moc(model, SPARSE)
    hook = model.blocks[0].attn1.processor.hook
    _sample(model, inputs)
    assert hook.facts is None and hook.last_facts.grid == (4, 2, 2)
    hidden = torch.randn(2, 16, model.config.num_attention_heads * model.config.attention_head_dim)
    with pytest.raises(RuntimeError, match="MoC's hook on the transformer did not run"):
        model.blocks[0].attn1(hidden)


def test_a_forward_replaced_by_another_library_raises():
    """accelerate hooks added before `apply_moc` and removed after it put back the forward from before MoC's hook:
    MoC's layers then raise rather than route with the facts of an earlier forward; re-applying and removing MoC
    keep accelerate's choice of forward (no stale one comes back)."""
    model, inputs = MODELS["wan"]()
    stock = _sample(model, inputs)
    sparse = _sample(apply_moc(copy.deepcopy(model), SPARSE), inputs)
    add_hook_to_module(model, AccelerateHook())
    apply_moc(model, SPARSE)
    torch.testing.assert_close(_sample(model, inputs), sparse, rtol=0, atol=0)
    remove_hook_from_module(model)
    with pytest.raises(RuntimeError, match="re-install MoC with `apply_moc"):
        _sample(model, inputs)
    apply_moc(model, SPARSE)
    torch.testing.assert_close(_sample(model, inputs), sparse, rtol=0, atol=0)
    remove_moc(model)
    assert "forward" not in vars(model)
    torch.testing.assert_close(_sample(model, inputs), stock, rtol=0, atol=0)


def test_accelerate_hooks_added_after_moc():
    """The order of `enable_model_cpu_offload` after `apply_moc`: accelerate wraps MoC's forward and gives it back."""
    model, inputs = MODELS["wan"]()
    stock = _sample(model, inputs)
    apply_moc(model, SPARSE)
    sparse = _sample(model, inputs)
    add_hook_to_module(model, AccelerateHook())
    torch.testing.assert_close(_sample(model, inputs), sparse, rtol=0, atol=0)
    remove_hook_from_module(model)
    assert model.forward.func is hooked_forward
    remove_moc(model)
    torch.testing.assert_close(_sample(model, inputs), stock, rtol=0, atol=0)


def test_a_later_hook_with_its_own_forward_survives_remove_moc():
    """diffusers' `HookRegistry.remove_hook` hands the forward below the removed hook to the next hook's `forward`,
    which a hook with `new_forward` does not call: `remove_moc` keeps such a hook running."""
    model, inputs = MODELS["wan"]()
    stock = _sample(model, inputs)
    apply_moc(model, SPARSE)
    sparse = _sample(model, inputs)
    registry = HookRegistry.check_if_exists_or_initialize(model)
    registry.register_hook(_Triple(), "triple")
    torch.testing.assert_close(_sample(model, inputs), 3 * sparse, rtol=0, atol=0)
    remove_moc(model)
    torch.testing.assert_close(_sample(model, inputs), 3 * stock, rtol=0, atol=0)
    registry.remove_hook("triple")
    torch.testing.assert_close(_sample(model, inputs), stock, rtol=0, atol=0)


def test_remove_moc_under_accelerate_hooks():
    """accelerate wraps MoC's forward and keeps it to put back: after `remove_moc` it runs no MoC step, also once
    accelerate's hooks are gone (a CogVideoX whose QKV is then fused runs its fused processor)."""
    model, inputs = MODELS["cogvideox"]()
    stock = _sample(model, inputs)
    apply_moc(model, SPARSE)
    add_hook_to_module(model, AccelerateHook())
    hook = model.transformer_blocks[0].attn1.processor.hook
    remove_moc(model)
    hook.last_facts = None
    torch.testing.assert_close(_sample(model, inputs), stock, rtol=0, atol=0)
    remove_hook_from_module(model)
    model.fuse_qkv_projections()
    torch.testing.assert_close(_sample(model, inputs), stock, rtol=1e-5, atol=1e-5)
    assert hook.last_facts is None
