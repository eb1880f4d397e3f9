"""Installing a diffusers `ModelHook` so that the module carrying it can still be pickled and copied.

MoC installs its hooks through diffusers' own mechanism (`diffusers.hooks.HookRegistry`): the registry keeps the
chain of hooks of a module, lists them (`get_hook`, its repr) and takes one out (`remove_hook`). Around it:

- the forward `HookRegistry.register_hook` leaves on the module is a `functools.partial` of a closure: a module
  carrying it cannot be pickled, and `copy.deepcopy` gives a copy whose forward still runs the original module, its
  weights and its hooks, silently. [`register_hook`] replaces that closure by a partial of [`hooked_forward`], a
  module-level function that takes the same three steps, and which is pickled and copied with its module. The
  closures of other diffusers hooks on the same module stay as diffusers makes them (with one, the module does not
  pickle, and a copy may run the original);
- [`remove_hook`] mends what `HookRegistry.remove_hook` gets wrong when a hook with `new_forward` was registered
  after the one removed, keeps a forward another library put on the module since, and leaves a forward that such
  a library still holds passing straight through.
"""

from __future__ import annotations

import functools

import torch
from diffusers.hooks import HookRegistry, ModelHook

__all__ = ["find_hook", "hooked_forward", "register_hook", "remove_hook"]


def hooked_forward(module: torch.nn.Module, fn_ref, *args, **kwargs):
    r"""
    The forward diffusers' `HookRegistry` gives a module for one hook: the hook's `pre_forward`, the rest of the
    chain, the hook's `post_forward`. A module-level function, so that `functools.partial(hooked_forward, module,
    fn_ref)` pickles and deep-copies with the module (a copy calls its own module's hook and chain), and
    `torch.export` reads its code as it reads the registry's own partial.

    Args:
        module (`torch.nn.Module`): the module whose forward this is.
        fn_ref (`diffusers.hooks.hooks.HookFunctionReference`): the hook's place in the registry's chain.
    """
    args, kwargs = fn_ref.pre_forward(module, *args, **kwargs)
    output = fn_ref.forward(*args, **kwargs)
    return fn_ref.post_forward(module, output)


def _installs(forward, hook: ModelHook) -> bool:
    """Whether `forward` is the one [`register_hook`] installed for `hook`."""
    return isinstance(forward, functools.partial) and forward.func is hooked_forward and forward.args[1] is hook.fn_ref


def register_hook(module: torch.nn.Module, hook: ModelHook, name: str) -> None:
    """Register `hook` as `name` in `module`'s diffusers `HookRegistry`, with a forward that pickles and copies."""
    previous = module.forward
    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)
    # `fn_ref` (set by `register_hook`) is this hook's place in the chain. `__wrapped__` is the previous forward, so
    # that `inspect.signature` (and `torch.export`) see the real one, as with the registry's own closure.
    module.forward = functools.update_wrapper(functools.partial(hooked_forward, module, hook.fn_ref), previous)


def find_hook(module: torch.nn.Module, name: str) -> ModelHook | None:
    """The hook registered as `name` in `module`'s `HookRegistry`, if any (without creating a registry)."""
    registry = getattr(module, "_diffusers_hook", None)
    return None if registry is None else registry.get_hook(name)


def _passes_args(module: torch.nn.Module, *args, **kwargs) -> tuple[tuple, dict]:
    return args, kwargs


def _passes_output(module: torch.nn.Module, output):
    return output


def remove_hook(module: torch.nn.Module, hook: ModelHook, name: str) -> None:
    """Take `hook` off `module` (not off its submodules) if it is the one registered as `name`; the module's class
    forward is its forward again when no other hook remains in its chain."""
    if find_hook(module, name) is not hook:
        return
    registry, fn_ref = module._diffusers_hook, hook.fn_ref
    index = registry._hook_order.index(name)
    later = registry._fn_refs[index + 1] if index + 1 < len(registry._fn_refs) else None
    later_forward = None if later is None else later.forward
    current = vars(module).get("forward")
    registry.remove_hook(name, recurse=False)
    if later is not None and later.original_forward is not None and later.forward is not later_forward:
        # diffusers 0.42 puts the previous forward in the later hook's `forward`; a hook with `new_forward` (the
        # cache hooks) keeps the chain's rest in `original_forward`, and would otherwise stop running.
        later.forward, later.original_forward = later_forward, later.forward
    if vars(module).get("forward") is not current and not _installs(current, hook):
        # The registry put back the forward from before this hook, but another library (accelerate's hooks) had
        # already wrapped or replaced this hook's forward: keep that one, not a stale one.
        if current is None:
            del module.forward
        else:
            module.forward = current
    # A wrapper may still hold this hook's forward (accelerate keeps it to put back): it now passes straight through.
    fn_ref.pre_forward, fn_ref.post_forward = _passes_args, _passes_output
    # The registry leaves the previous forward as an attribute; when that is the class's own, drop the attribute.
    forward = vars(module).get("forward")
    if getattr(forward, "__self__", None) is module and getattr(forward, "__func__", None) is type(module).forward:
        del module.forward
