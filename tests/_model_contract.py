"""What every model MoC supports must satisfy, as checks the per-model test files run on their tiny models: full
density is the stock model bit for bit, sparse MoC changes the output the same way on every backend, `apply_moc` takes
exactly the video self-attention and `remove_moc` gives the stock model back, regional compile equals eager."""

from __future__ import annotations

from collections.abc import Callable

import torch

from diffusers_moc import MoCConfig, apply_moc, remove_moc
from diffusers_moc.core.attention_processors import MoCAttnProcessorBase

DENSE = MoCConfig(top_k=100, causal=False, backend="reference")
# One routed chunk besides its own: sparse enough that the output must differ from dense.
SPARSE = MoCConfig(top_k=1, local_window=0, backend="torch")

Build = Callable[[], tuple[torch.nn.Module, dict]]


def run(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """The model's first output (several outputs, as Cosmos 3's list, flattened into one tensor)."""
    with torch.no_grad():
        out = model(**inputs, return_dict=False)[0]
    return torch.cat([x.flatten() for x in out]) if isinstance(out, list) else out


def moc_modules(model: torch.nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(getattr(m, "processor", None), MoCAttnProcessorBase)}


def full_density_equals_stock(build: Build) -> None:
    model, inputs = build()
    stock = run(model, inputs)
    apply_moc(model, DENSE)
    assert torch.equal(run(model, inputs), stock)


def sparse_changes_output_and_backends_agree(build: Build) -> None:
    model, inputs = build()
    stock = run(model, inputs)
    apply_moc(model, SPARSE)
    sparse = run(model, inputs)
    assert not torch.allclose(sparse, stock, atol=1e-3)
    apply_moc(model, SPARSE.replace(backend="reference"))
    torch.testing.assert_close(run(model, inputs), sparse, atol=1e-5, rtol=1e-5)


def apply_and_remove(build: Build, targets: set[str]) -> None:
    model, inputs = build()
    stock = run(model, inputs)
    before = {n: type(m.processor) for n, m in model.named_modules() if hasattr(m, "processor")}
    apply_moc(model, SPARSE)
    assert moc_modules(model) == targets
    remove_moc(model)
    assert {n: type(m.processor) for n, m in model.named_modules() if hasattr(m, "processor")} == before
    assert torch.equal(run(model, inputs), stock)


def regional_compile_equals_eager(build: Build, backend: str = "inductor", precision_casts: bool = False) -> None:
    """`compile_repeated_blocks(fullgraph=True)` equals eager, twice, without a recompile. `backend="aot_eager"`
    checks the same capture (one graph, MoC's op and its autograd traced) without inductor's code generation, which is
    the same for every model and costs seconds per model. `precision_casts`: the model rounds to a lower precision on
    purpose, which inductor keeps only when asked (Kandinsky 5)."""
    model, inputs = build()
    apply_moc(model, SPARSE)
    eager = run(model, inputs)
    torch._dynamo.reset()
    with (
        torch._dynamo.config.patch(error_on_recompile=True),
        torch._inductor.config.patch(emulate_precision_casts=precision_casts),
    ):
        model.compile_repeated_blocks(fullgraph=True, backend=backend)
        torch.testing.assert_close(run(model, inputs), eager, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(run(model, inputs), eager, atol=1e-5, rtol=1e-5)
