"""The scale plan (`benchmarks/scale_plan.py`): its parameter counts are the released models', its memory model gives
what the H200 measured, its tables hold together, and the README's scale table is the one it generates."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

from diffusers_moc import MoCConfig

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
START, END = "<!-- scale-table:start -->", "<!-- scale-table:end -->"


@pytest.fixture(scope="module")
def plan():
    sys.path.insert(0, str(ROOT / "benchmarks"))  # it imports its sibling scripts
    spec = importlib.util.spec_from_file_location("scale_plan", ROOT / "benchmarks" / "scale_plan.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["scale_plan"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def committed() -> dict:
    return json.loads((RESULTS / "scale_plan.json").read_text(encoding="utf-8"))


def test_parameter_counts_are_the_released_models(plan):
    facts = {name: plan.parameter_facts(spec) for name, spec in plan.MODELS.items()}
    # The H200 run built Wan 2.1 1.3B's transformer and cast every weight to bfloat16: its bytes are this count.
    long_video = json.loads((RESULTS / "long_video_memory_NVIDIA_H200.json").read_text(encoding="utf-8"))
    assert facts["wan2.1-t2v-1.3b"]["parameters"] == round(long_video["rows"][0]["weights_gib"] * 2**30 / 2)
    assert facts["wan2.1-t2v-1.3b"]["parameters"] == pytest.approx(1.42e9, rel=0.01)  # "1.3B" rounds it down
    assert facts["wan2.2-t2v-a14b"]["parameters"] == pytest.approx(14e9, rel=0.03)  # per expert
    assert facts["wan2.2-ti2v-5b"]["parameters"] == pytest.approx(5e9, rel=0.01)
    for name, spec in plan.MODELS.items():
        # LoRA on to_q, to_k, to_v, to_out.0 of both attentions: 8 square projections of `dim` per block.
        lora = 8 * plan.LORA_RANK * 2 * spec.dim * spec.config["num_layers"]
        assert facts[name]["lora_parameters"] == lora, name
        assert facts[name]["weight_bytes"] > 2 * facts[name]["parameters"]  # bfloat16, and a few float32 modules


def test_the_memory_model_gives_the_measured_peak(plan):
    """A Wan 2.1 1.3B forward at 32,760 tokens peaked at 1,542 MiB above its weights on the H200 (dense attention);
    the fake run of the same code gives that within 1%."""
    spec = plan.MODELS["wan2.1-t2v-1.3b"]
    measured = [m for m in plan.measurements(RESULTS) if m["kind"] == "transformer forward" and m["tokens"] == 32760]
    dense = next(m for m in measured if m["backend"] == "dense")
    modelled = plan.model_of_measurement(dense, spec, plan.parameter_facts(spec))["modelled_gib"]
    assert modelled == pytest.approx(dense["measured_gib"], rel=0.01)


def test_depth_extrapolation_equals_the_whole_model(plan):
    """Memory and FLOPs are extrapolated from 2 and 3 blocks; with checkpointing and MoC's training routing (the least
    regular case: one block's recomputation on top of every block's input) it equals a 4-block run."""
    base = plan.MODELS["wan2.1-t2v-1.3b"]
    spec = dataclasses.replace(base, config={**base.config, "num_layers": 4})
    run = plan.Run(spec, 3, "lora_ckpt", MoCConfig(top_k=1, anchor_own_shot=True, backend="torch"), [2, 1])
    assert plan.simulate_full_depth(run) == plan.simulate(run, 4)


def test_a_quick_plan_writes_its_tables(plan, tmp_path, capsys):
    argv = ["--models", "wan2.1-t2v-1.3b", "--tokens", "32k", "--gpus", "1", "2", "8", "--modes", "inference"]
    result = plan.main([*argv, "--measurements", "", "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "## Fewest GPUs that fit" in printed and "`MoCConfig(top_k=5, anchor_own_shot=True)`" in printed
    assert sorted(os.listdir(tmp_path)) == ["scale_plan.json", "scale_plan.md"]
    assert json.loads((tmp_path / "scale_plan.json").read_text()) == json.loads(json.dumps(result))
    one, two, eight = (next(r for r in result["memory"] if r["gpus"] == n) for n in (1, 2, 8))
    assert [r["mode"] for r in result["memory"]] == ["inference"] * 3
    assert not eight["possible"] and "12 heads" in eight["why_not"]
    assert two["activation_gib"] == pytest.approx(one["activation_gib"] / 2)  # Ulysses splits the tokens
    assert two["state_gib"] == one["state_gib"] and two["total_gib"] < one["total_gib"]  # weights replicated
    (flops,) = result["flops"]
    assert flops["tokens"] == 21 * 1560 and 0 < flops["moc_density"] < 1
    assert flops["forward_moc"] < flops["forward_dense"] and flops["inference_dense"] == 2 * flops["forward_dense"]


@pytest.mark.parametrize(
    "argv, named", [(["--gpus", "0"], "--gpus"), (["--tokens", "32x"], "32x"), (["--top-k", "0"], "--top-k")]
)
def test_bad_arguments_are_named_before_any_work(plan, argv, named, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        plan.main([*argv, "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and named in capsys.readouterr().err
    assert not os.listdir(tmp_path)


def test_the_committed_plan_holds_together(plan, committed):
    assert set(committed["models"]) == set(plan.MODELS) and committed["settings"]["gpus"] == [1, 2, 4, 8]
    for m in committed["measurements"]:
        assert m["model_over_measured"] == pytest.approx(1.0, abs=0.01), m
    groups: dict = {}
    for r in committed["memory"]:
        groups.setdefault((r["model"], r["mode"], r["tokens"]), []).append(r)
    for (model, mode, tokens), rows in groups.items():
        heads = plan.MODELS[model].heads
        assert [r["possible"] for r in rows] == [heads % r["gpus"] == 0 for r in rows]
        rows = [r for r in rows if r["possible"]]
        totals = [r["total_gib"] for r in rows]
        assert totals == sorted(totals, reverse=True), (model, mode, tokens)
        modelled = [r["activation_gib"] * r["gpus"] for r in rows if r["source"] == "model"]
        assert modelled == pytest.approx([modelled[0]] * len(modelled))
        states = [r["state_gib"] for r in rows]
        if mode.startswith("lora"):  # FSDP shards the training state
            assert states == sorted(states, reverse=True) and len(set(states)) == len(states)
        else:  # inference replicates the weights
            assert len(set(states)) == 1
    for model in plan.MODELS:
        lengths = [r for r in committed["flops"] if r["model"] == model]
        assert len(lengths) == 4
        for short, long in zip(lengths, lengths[1:]):
            growth = long["tokens"] / short["tokens"]
            assert long["self_attention_dense_forward"] / short["self_attention_dense_forward"] == pytest.approx(
                growth**2
            )
            assert growth < long["forward_dense"] / short["forward_dense"] < growth**2
            assert long["moc_density"] < short["moc_density"]
        for r in lengths:
            for step in ("forward", "inference", "lora", "lora_ckpt"):
                assert r[f"{step}_moc"] < r[f"{step}_dense"], (model, r["tokens"], step)
    assert plan.fewest_gpus(committed["memory"], [1, 2, 4, 8]) == committed["fewest_gpus"]


def test_readme_scale_table_is_the_generated_one(plan, committed):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert START in readme and END in readme, f"README.md has no scale table between {START} and {END}"
    table = readme.split(START, 1)[1].split(END, 1)[0].strip()
    assert table == plan.fit_table(committed).strip(), (
        "README.md's scale table is out of date: paste the 'Fewest GPUs that fit' table of "
        "benchmarks/results/scale_plan.md"
    )
