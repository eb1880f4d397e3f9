"""A pytest plugin that runs diffusers' own model tests with MoC installed, at full density, on every transformer
class `apply_moc` supports: each such model gets `apply_moc` as the last step of its construction, whether a test
builds it from a config or loads it with `from_pretrained`.

Run from a checkout of diffusers' repository (its `tests/` folder is not part of the wheel) at the installed version:

    PYTHONPATH=/path/to/diffusers-moc/tools python -m pytest -p moc_diffusers_plugin \
        tests/models/transformers/test_models_transformer_helios.py

The session ends with a line saying how many models MoC was applied to, so a run that never built a supported model
cannot pass for a MoC run.
"""

from __future__ import annotations

import functools

from diffusers_moc import MoCConfig, apply_moc
from diffusers_moc.core.apply import registered_models

#: Every query attends every key: MoC must give the stock model's outputs.
FULL_DENSITY = MoCConfig(top_k=1_000_000, causal=False, drop_off=0.0, drop_in=0.0)

_applied: dict[str, int] = {}


def _with_moc(cls: type):
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if type(self) is cls:  # once, after the most derived constructor
            apply_moc(self, FULL_DENSITY)
            _applied[cls.__name__] = _applied.get(cls.__name__, 0) + 1

    __init__.moc_plugin = True
    return __init__


def pytest_configure(config) -> None:
    for cls in registered_models():
        if not getattr(cls.__init__, "moc_plugin", False):
            cls.__init__ = _with_moc(cls)


def pytest_terminal_summary(terminalreporter) -> None:
    counts = ", ".join(f"{name} x{n}" for name, n in sorted(_applied.items())) or "none"
    terminalreporter.write_line(f"MoC (full density) applied to: {counts}")
