"""The fidelity benchmark: its task is what it claims (recall decides), and its smoke run goes through every stage."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")
pytest.importorskip("av")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("fidelity", os.path.join(ROOT, "benchmarks", "fidelity.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["fidelity"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("fidelity", None)


def test_videos_bring_back_the_early_shot_and_only_it(bench):
    settings = bench.QUICK
    looks = bench.shot_looks(np.random.default_rng(3))
    assert np.array_equal(looks[bench.EARLY], looks[bench.RETURNING])
    assert all(np.abs(looks[d] - looks[bench.EARLY]).max() > 0.02 for d in bench.DISTRACTORS)
    video = bench.render_video(np.random.default_rng(3), settings)
    assert video.shape == (settings.num_frames, settings.size, settings.size, 3) and video.dtype == np.uint8
    starts = bench.pixel_shot_starts(settings.shot_frames)
    shots = [video[a:b] for a, b in zip(starts, starts[1:] + [len(video)])]
    # Each shot shows its own colours: most pixels are background (the median), the disc moves elsewhere.
    for shot, look in zip(shots, looks):
        assert np.abs(np.median(shot.reshape(-1, 3), axis=0) / 255 - look[0]).max() < 2 / 255
    early, returning = shots[bench.EARLY], shots[bench.RETURNING]
    assert not np.array_equal(early[-len(returning) :], returning)
    # Deterministic in the seed.
    assert np.array_equal(video, bench.render_video(np.random.default_rng(3), settings))
    assert not np.array_equal(video, bench.render_video(np.random.default_rng(4), settings))


def test_vae_lets_no_information_cross_a_shot_cut(bench):
    """A latent frame depends on its own pixel frame only: changing the early shot changes no other shot's latents."""
    settings = bench.QUICK
    vae = bench._local_vae(0)
    video = torch.from_numpy(bench.render_video(np.random.default_rng(0), settings)).permute(3, 0, 1, 2)
    video = video[None].float() / 127.5 - 1
    changed = video.clone()
    early_pixels = bench.pixel_shot_starts(settings.shot_frames)[1]
    changed[:, :, :early_pixels] = -video[:, :, :early_pixels]
    with torch.no_grad():
        a, b = (vae.encode(v).latent_dist for v in (video, changed))
    diff = (a.mean - b.mean).abs().amax(dim=(0, 1, 3, 4))
    early = bench.shot_slices(settings)[bench.EARLY]
    assert diff[early].min() > 0 and diff[early.stop :].max() == 0
    assert a.std.max() < 1e-6  # deterministic: the trainer's posterior samples are the means
    # A uniform frame gives a uniform latent (no border pattern), and the first frame is encoded like the others.
    flat = torch.full((1, 3, 5, 32, 32), 0.3)
    with torch.no_grad():
        z = vae.encode(flat).latent_dist.mean
    assert z.std(dim=(3, 4)).max() < 1e-5 and (z[:, :, 0] - z[:, :, 1]).abs().max() < 1e-5


def test_consistency_gap_rewards_recall_only(bench):
    settings = bench.QUICK
    torch.manual_seed(0)
    frames = settings.shot_frames
    looks = torch.randn(6, 16, len(frames))
    looks[:, :, bench.RETURNING] = looks[:, :, bench.EARLY]
    latents = torch.cat([looks[:, :, i, None, None, None].expand(-1, -1, n, 2, 2) for i, n in enumerate(frames)], 2)
    recalled = bench.consistency_gap(latents, settings)
    assert recalled.min() > 0.5
    forgot = latents.clone()  # a returning shot that copies a distractor instead
    forgot[:, :, bench.shot_slices(settings)[bench.RETURNING]] = latents[:, :, bench.shot_slices(settings)[1]]
    gap = bench.consistency_gap(forgot, settings)
    assert (recalled - gap).min() > 0.5 and gap.mean() < -0.2


def test_naive_baseline_is_the_smallest_window_at_least_as_dense_as_moc(bench):
    """The naive baseline routes nothing: the smallest local window at least as dense as MoC. A window stops at a shot
    cut, so the returning shot's queries never see the early shot; MoC's can only by routing."""
    from diffusers_moc import ChunkLayout
    from diffusers_moc.training import routed_density

    settings = bench.FULL
    configs = bench.target_configs(settings)
    assert configs["moc"].top_k == settings.top_k and configs["causal"] == configs["moc"].replace(causal=True)
    assert configs["naive"].top_k == 0 and not configs["naive"].anchor_own_shot
    layout = ChunkLayout.for_video(settings.latent_frames, bench._tokens_per_frame(settings), settings.shot_frames)
    moc, causal, naive = (routed_density(layout, configs[k]) for k in ("moc", "causal", "naive"))
    smaller = configs["naive"].replace(local_window=configs["naive"].local_window - 1)
    assert causal <= moc <= 0.25 and naive >= moc > routed_density(layout, smaller)
    seen = layout.anchor_mask(configs["naive"].local_window, False, configs["naive"].text_anchors)
    shots = bench.shot_slices(settings)
    assert not seen[shots[bench.RETURNING], shots[bench.EARLY]].any()


def test_quick_run_writes_results_through_the_trainer(bench, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    result = bench.main(["--quick", "--out", str(out), "--work", str(work)])
    stem = "fidelity_quick_cpu"
    names = {f"{stem}.json", f"{stem}.md", f"{stem}_curves.png", f"{stem}_metrics.png", f"{stem}_routing.png"}
    assert names <= set(os.listdir(out))
    with open(out / f"{stem}.json") as f:
        assert json.load(f)["summary"] == result["summary"]
    settings = bench.QUICK
    summary = result["summary"]
    assert set(summary) == {"data", *bench.VARIANTS}
    assert summary["dense"]["density"]["mean"] == 1.0
    moc, naive = summary["moc_adapted"]["density"]["mean"], summary["naive_adapted"]["density"]["mean"]
    assert 0 < moc <= 0.25 and naive >= moc
    for variant in bench.VARIANTS:
        for metric in ("val_loss", "returning_loss_high_noise", "consistency_gap"):
            assert np.isfinite(summary[variant][metric]["mean"])
    # Each adaptation is a `diffusers-moc train` run from its YAML file: it anneals from dense to the target and
    # exports the MoC LoRA with the target settings.
    from diffusers_moc import MoCConfig
    from diffusers_moc.training import load_train_config

    for run in result["runs"]:
        for kind in ("dense", "moc", "naive"):
            curve = run["curves"][kind]
            assert len(curve["loss"]) == settings.adapt_steps and curve["density"][0] == 1.0
            assert curve["density"][-1] == pytest.approx(summary[f"{kind}_adapted"]["density"]["mean"], abs=1e-6)
            config = load_train_config(work / f"seed{run['seed']}" / f"{kind}.yaml")
            final = os.path.join(config.output_dir, "final")
            assert MoCConfig.from_pretrained(final) == config.moc == MoCConfig.from_dict(run["configs"][kind])
    assert [t["met"] for t in result["targets"]].count(None) == 0
    with open(out / f"{stem}.md") as f:
        text = f.read()
    assert "MoC, adapted" in text and f"{stem}_routing.png" in text


def test_naive_is_judged_worse_than_dense_per_seed(bench):
    """A seed's variants share its data and base model: a consistent excess counts even where the levels vary more
    between seeds than the excess; an excess that one seed reverses does not."""

    def runs(dense_levels, excess):
        out = []
        for level, e in zip(dense_levels, excess):
            metrics = {v: {m: 0.5 for m in bench.METRICS} for v in ("data", *bench.VARIANTS)}
            metrics["dense"].update(returning_loss_high_noise=level, consistency_gap=level)
            metrics["naive_adapted"].update(returning_loss_high_noise=level + e, consistency_gap=level - e)
            out.append({"metrics": metrics})
        return out

    def met(r):
        targets = bench.check_targets(bench.summarise(r), r)
        return [t["met"] for t in targets if t["target"].startswith("naive adapted clearly worse")]

    assert met(runs([0.3, 0.5, 0.7], [0.05, 0.06, 0.05])) == [True, True]
    assert met(runs([0.3, 0.5, 0.7], [0.05, 0.06, -0.01])) == [False, False]
    assert met(runs([0.5, 0.5, 0.5], [0.01, 0.09, 0.02])) == [False, False]  # mean 0.04, std 0.044: noise
