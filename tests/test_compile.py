"""torch.compile, torch.export and AOTInductor with MoC applied, on tiny models of every supported transformer.

Matrix (kept small: an inductor compile takes 10-30 s on a 2-core CPU, a dynamo trace a second or two):

- every model, sparse and at full density, inference: `torch.compile(transformer, fullgraph=True)` traces whole
  (dynamo, `backend="eager"`) and equals eager; the second call with the same shapes does not recompile
  (HunyuanVideo 1.5: diffusers' own forward is data-dependent, asserted below);
- every model, full density, a training step: regional compile (`compile_repeated_blocks(fullgraph=True)`) with
  AOTAutograd (`backend="aot_eager"`: fake tensors, the op's fake implementation and registered autograd) gives the
  eager output, which is the stock output, and the eager gradients; no recompile;
- every model: `torch.export` equals eager, with MoC as one opaque op in the graph;
- every model, sparse, inference: regional compile (`compile_repeated_blocks(fullgraph=True)`) with inductor equals
  eager, no recompile; and at full density, `torch.compile(transformer, fullgraph=True)` with inductor equals eager,
  no recompile (HunyuanVideo 1.5 without `fullgraph`);
- inductor: diffusers' `test_compile_works_with_aot` (an AOTInductor package, deterministic algorithms on as in
  diffusers' suite) on Wan with the default config and HunyuanVideo with `top_k=3`, a Wan sparse training step with
  drop-off / drop-in compiled whole, and (`test_attention.py`) MoC attention with per-sample caption padding.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
from _tiny_models import MODELS, compile_regionally

from diffusers_moc import MoCConfig, apply_moc, moc_context

SPARSE = MoCConfig(top_k=1, local_window=0, backend="torch")
DENSE = MoCConfig(top_k=1000, causal=False, backend="torch")
REGULARISED = MoCConfig(top_k=1, local_window=0, drop_off=1.0, drop_in=1.0, backend="torch")
# diffusers' HunyuanVideo 1.5 forward branches on `torch.all(image_embeds == 0)` and packs its condition tokens with
# boolean masks: no fullgraph or export, with or without MoC (asserted below). Its blocks compile.
NO_FULLGRAPH = {"hunyuan_video15"}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _out(model, inputs):
    out = model(**inputs, return_dict=False)[0]
    return out.wait() if hasattr(out, "wait") else out


def _training_step(model, inputs, seed: int = 0, params: torch.nn.Module | None = None):
    """Forward, loss, backward; returns the output and every parameter's gradient (of `params`, default `model`)."""
    params = model if params is None else params
    params.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # drop-off / drop-in draw from the global RNG
    out = _out(model, inputs)
    out.square().mean().backward()
    # A parameter the loss does not reach has no gradient in eager and a zero one from a compiled backward.
    return out.detach(), {
        n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in params.named_parameters()
    }


def _assert_grads_close(got: dict, expected: dict):
    assert got.keys() == expected.keys() and any(g.abs().sum() > 0 for g in expected.values())
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("density", ["sparse", "dense"])
@pytest.mark.parametrize("name", [n for n in MODELS if n not in NO_FULLGRAPH])
def test_fullgraph_compile_equals_eager_without_recompiling(name, density):
    model, inputs = MODELS[name]()
    apply_moc(model, SPARSE if density == "sparse" else DENSE)
    with torch.no_grad():
        eager = _out(model, inputs)
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        torch.testing.assert_close(_out(compiled, inputs), eager, atol=1e-5, rtol=1e-5)
        with torch._dynamo.config.patch(error_on_recompile=True):
            torch.testing.assert_close(_out(compiled, inputs), eager, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_regional_compile_training_step_at_full_density(name):
    model, inputs = MODELS[name]()
    with torch.no_grad():
        stock = _out(model, inputs)
    apply_moc(model, DENSE)
    model.train()  # tiny models have no dropout; MoC's regularisers are forced off to keep full density exact
    with moc_context(regularise=False):
        eager_out, eager_grads = _training_step(model, inputs)
        torch.testing.assert_close(eager_out, stock, atol=1e-5, rtol=1e-5)
        compile_regionally(model, fullgraph=True, backend="aot_eager")
        out, grads = _training_step(model, inputs)
        torch.testing.assert_close(out, eager_out, atol=1e-5, rtol=1e-5)
        _assert_grads_close(grads, eager_grads)
        with torch._dynamo.config.patch(error_on_recompile=True):
            _training_step(model, inputs)


@pytest.mark.parametrize("name", list(MODELS))
def test_regional_inductor_compile_equals_eager_without_recompiling(name):
    """diffusers' recommended idiom, `compile_repeated_blocks(fullgraph=True)`, with inductor on every model: the
    sparse MoC forward equals eager, and the second call does not recompile."""
    model, inputs = MODELS[name]()
    apply_moc(model, SPARSE)
    with torch.no_grad():
        eager = _out(model, inputs)
        compile_regionally(model, fullgraph=True)
        torch.testing.assert_close(_out(model, inputs), eager, atol=1e-5, rtol=1e-5)
        with torch._dynamo.config.patch(error_on_recompile=True):
            torch.testing.assert_close(_out(model, inputs), eager, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_whole_model_inductor_compile_at_full_density_equals_eager(name):
    """`torch.compile(transformer, fullgraph=True)` with inductor on every model, at full density (the regional test
    above runs sparse): equals eager, and the second call does not recompile."""
    model, inputs = MODELS[name]()
    apply_moc(model, DENSE)
    with torch.no_grad():
        eager = _out(model, inputs)
        compiled = torch.compile(model, fullgraph=name not in NO_FULLGRAPH)
        torch.testing.assert_close(_out(compiled, inputs), eager, atol=1e-5, rtol=1e-5)
        with torch._dynamo.config.patch(error_on_recompile=True):
            torch.testing.assert_close(_out(compiled, inputs), eager, atol=1e-5, rtol=1e-5)


def test_inductor_training_step_with_regularisers_equals_eager():
    """Sparse routing plus drop-off / drop-in, compiled whole: inductor's RNG is told to follow eager's, so the same
    seed routes the same and the gradients match."""
    model, inputs = MODELS["wan"]()
    apply_moc(model, REGULARISED)
    model.train()
    eager_out, eager_grads = _training_step(model, inputs, seed=3)
    _, plain_grads = _training_step(model, inputs, seed=4)
    assert any(not torch.allclose(plain_grads[n], g) for n, g in eager_grads.items())  # the regularisers act
    compiled = torch.compile(model, fullgraph=True)
    with torch._inductor.config.patch(fallback_random=True):
        out, grads = _training_step(compiled, inputs, seed=3, params=model)
        torch.testing.assert_close(out, eager_out, atol=1e-5, rtol=1e-5)
        _assert_grads_close(grads, eager_grads)
        with torch._dynamo.config.patch(error_on_recompile=True):
            _training_step(compiled, inputs, seed=3, params=model)


@pytest.mark.parametrize("name", [n for n in MODELS if n not in NO_FULLGRAPH])
def test_export_equals_eager(name):
    model, inputs = MODELS[name]()
    apply_moc(model, SPARSE)
    with torch.no_grad():
        eager = _out(model, inputs)
    exported = torch.export.export(model, args=(), kwargs=inputs)
    assert any("diffusers_moc.attention" in str(n.target) for n in exported.graph.nodes)  # one opaque op
    with torch.no_grad():
        out = exported.module()(**inputs)
    torch.testing.assert_close(out[0] if isinstance(out, tuple) else out.sample, eager, atol=1e-5, rtol=1e-5)


@pytest.fixture
def _deterministic():
    """diffusers' test modules call `enable_full_determinism()`: deterministic algorithms, under which inductor hands
    scatters to aten, whose C++ call AOTInductor writes out with the scalar arguments."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


# The default config and the README's, on a cross-attention and a joint-attention model (each package is a full
# inductor and C++ build: these two keep the test's time in bounds); routing with two slots or more is what AOTInductor
# once failed to build.
AOT_CASES = {"wan-default": ("wan", MoCConfig()), "hunyuan_video-top_k=3": ("hunyuan_video", MoCConfig(top_k=3))}


@pytest.mark.usefixtures("_deterministic")
@pytest.mark.parametrize("case", list(AOT_CASES))
def test_compile_works_with_aot(case):
    """diffusers' `TorchCompileTesterMixin.test_compile_works_with_aot` with MoC, as diffusers runs it (deterministic
    algorithms on)."""
    from torch._inductor.package import load_package

    name, config = AOT_CASES[case]
    model, inputs = MODELS[name]()
    apply_moc(model, config)
    with torch.no_grad():
        eager = _out(model, inputs)
    exported_model = torch.export.export(model, args=(), kwargs=inputs)
    with tempfile.TemporaryDirectory() as tmpdir:
        package_path = os.path.join(tmpdir, f"{type(model).__name__}.pt2")
        _ = torch._inductor.aoti_compile_and_package(exported_model, package_path=package_path)
        assert os.path.exists(package_path)
        loaded_binary = load_package(package_path, run_single_threaded=True)
    model.forward = loaded_binary
    with torch.no_grad():
        first = model(**inputs)
        second = model(**inputs)
    for out in (first, second):
        torch.testing.assert_close(
            out[0] if isinstance(out, (tuple, list)) else out.sample, eager, atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize("moc", [False, True])
def test_hunyuan_video15_fullgraph_fails_in_diffusers_itself(moc):
    """Not a MoC limitation: the stock model does not compile whole either (if diffusers fixes its forward, this
    fails and HunyuanVideo 1.5 joins the fullgraph tests)."""
    model, inputs = MODELS["hunyuan_video15"]()
    if moc:
        apply_moc(model, SPARSE)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad(), pytest.raises(Exception, match="(?i)data.dependent|dynamic shape|guard"):
        _out(compiled, inputs)


def test_shots_captions_and_settings_are_guarded_not_baked_in():
    """A compiled model follows `moc_context` and `update_moc_config`: each change recompiles (never a stale
    graph); returning to a setting seen before reuses its graph."""
    from diffusers_moc import update_moc_config

    model, inputs = MODELS["wan"]()
    apply_moc(model, SPARSE.replace(local_window=1))  # with a local window, shot cuts change the routing
    compiled = torch.compile(model, fullgraph=True, backend="eager")  # guards are dynamo's
    captions = {"caption_spans": [(0, 2), (2, 5)], "global_caption_span": (0, 2)}
    settings = [{}, {"shot_frames": [1, 3]}, {"shot_frames": [1, 3], **captions}, {"shot_frames": [2, 2], **captions}]
    with torch.no_grad():
        outputs = []
        for context in settings:
            with moc_context(**context):
                outputs.append(_out(model, inputs))
                torch.testing.assert_close(_out(compiled, inputs), outputs[-1], atol=1e-5, rtol=1e-5)
        assert all((a - b).abs().max() > 1e-4 for a, b in zip(outputs, outputs[1:]))  # every change matters
        with torch._dynamo.config.patch(error_on_recompile=True):
            for context, expected in zip(settings, outputs):
                with moc_context(**context):
                    torch.testing.assert_close(_out(compiled, inputs), expected, atol=1e-5, rtol=1e-5)
        update_moc_config(model, top_k=2)
        torch.testing.assert_close(_out(compiled, inputs), _out(model, inputs), atol=1e-5, rtol=1e-5)
        assert (_out(model, inputs) - outputs[0]).abs().max() > 1e-4


def test_set_attn_processor_alone_under_compile_names_apply_moc():
    from diffusers_moc import MoCWanAttnProcessor

    model, inputs = MODELS["wan"]()
    model.set_attn_processor(MoCWanAttnProcessor(SPARSE))
    with torch.no_grad():
        _out(model, inputs)  # eager: works (the grid is read off the rotary table)
        with pytest.raises(Exception, match="apply_moc"):
            _out(torch.compile(model, fullgraph=True, backend="eager"), inputs)
