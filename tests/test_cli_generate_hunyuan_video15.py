"""`diffusers-moc generate` on HunyuanVideo 1.5: `--tiny hunyuanvideo1.5-t2v | -i2v`, storyboards naming its
checkpoints or folders, the settings the loaded model picks, and errors named before any model loads."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import yaml
from test_cli_generate import _picture

from diffusers_moc.cli import main
from diffusers_moc.model_families import HUNYUAN_VIDEO15_FAMILIES, family_of_repo_id, family_of_source
from diffusers_moc.pipelines import Storyboard

av = pytest.importorskip("av")

BOARD = {
    "global_prompt": "a red car in a small city",
    "fps": 8,
    "max_sequence_length": 16,
    "seed": 1,
    "moc": {"top_k": 1, "anchor_own_shot": True, "causal": True, "text_anchors": "shot"},
    "shots": [
        {"prompt": "the car drives down the street", "num_frames": 5},
        {"prompt": "close up of the driver", "num_frames": 5},
    ],
}
T2V_ID = "hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_t2v"
I2V_ID = "hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-720p_i2v"


def _frames(path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def _board(tmp_path, **change) -> str:
    path = tmp_path / "board.yaml"
    path.write_text(yaml.safe_dump({**BOARD, **change}), encoding="utf-8")
    return str(path)


def test_known_ids_and_folders_are_hunyuan_video15_families(tmp_path):
    assert family_of_repo_id(T2V_ID).name == "hunyuanvideo1.5-t2v"
    assert family_of_repo_id(I2V_ID.upper()).name == "hunyuanvideo1.5-i2v"
    for name, family in (("HunyuanVideo15Pipeline", "t2v"), ("HunyuanVideo15ImageToVideoPipeline", "i2v")):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "model_index.json").write_text(json.dumps({"_class_name": name}))
        assert family_of_source(folder).name == f"hunyuanvideo1.5-{family}"


def test_storyboard_leaves_size_and_guidance_to_the_loaded_model():
    family = HUNYUAN_VIDEO15_FAMILIES["hunyuanvideo1.5-t2v"]
    board = Storyboard.from_dict(BOARD).with_model_defaults(family.defaults)
    assert (board.height, board.width, board.guidance_scale) == (None, None, None)
    assert board.model_chosen == {"height", "width", "guidance_scale"} and board.max_sequence_length == 16
    assert board.fps == 8 and board.num_inference_steps == 50  # set by the storyboard / the family
    board = board.with_overrides({"height": 64}, "board")  # what the command line sets is no longer the model's
    assert board.height == 64 and board.model_chosen == {"width", "guidance_scale"}
    filled = board.with_model_settings({"height": 480, "width": 848, "guidance_scale": 6.0})
    assert (filled.height, filled.width, filled.guidance_scale, filled.model_chosen) == (64, 848, 6.0, frozenset())
    assert Storyboard.from_dict({**BOARD, "height": 48}).with_model_defaults(family.defaults).height == 48


def test_tiny_t2v_end_to_end_with_a_routing_map_of_its_captions(tmp_path, capsys):
    out, picture = tmp_path / "video.mp4", tmp_path / "map.png"
    argv = ["generate", _board(tmp_path), "-o", str(out), "--tiny", "hunyuanvideo1.5-t2v", "--quiet"]
    assert main([*argv, "--routing-map", str(picture), "--per-shot"]) == 0
    assert _frames(out).shape == (10, 32, 32, 3)
    assert "HunyuanVideo 1.5 T2V (tiny)" in capsys.readouterr().err
    numbers = json.loads((tmp_path / "map.json").read_text())
    assert numbers["rows"][:3] == ["caption (global)", "caption (shot 0)", "frame 0"]
    assert "caption (shot 1)" in numbers["rows"] and numbers["skipped_calls"] > 0  # the unconditional pass
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["board.yaml", "map.json", "map.png", "video.mp4", "video_shot01.mp4", "video_shot02.mp4"]


def test_tiny_stands_in_for_the_storyboards_i2v_checkpoint(tmp_path, capsys):
    _picture(tmp_path / "start.png")
    path = _board(tmp_path, model=I2V_ID, image="start.png")
    assert main(["generate", path, "-o", str(tmp_path / "v.mp4"), "--tiny", "--quiet", "--steps", "1"]) == 0
    assert _frames(tmp_path / "v.mp4").shape == (10, 32, 32, 3)
    assert "HunyuanVideo 1.5 I2V (tiny), from an image" in capsys.readouterr().err


def test_a_saved_folder_runs_at_the_size_and_guidance_the_model_picks(tmp_path, capsys, monkeypatch):
    from diffusers_moc.pipelines import HunyuanVideo15LongVideoPipeline
    from diffusers_moc.tiny_hunyuan_video15 import tiny_hunyuan_video15_components

    folder = tmp_path / "model"
    HunyuanVideo15LongVideoPipeline(**tiny_hunyuan_video15_components()).save_pretrained(folder)
    seen = {}
    call = HunyuanVideo15LongVideoPipeline.__call__

    def spy(self, *args, **kwargs):
        seen.update(kwargs)
        return call(self, *args, **kwargs)

    monkeypatch.setattr(HunyuanVideo15LongVideoPipeline, "__call__", spy)
    argv = ["generate", _board(tmp_path), "-o", str(tmp_path / "v.mp4"), "--model", str(folder), "--steps", "1"]
    assert main([*argv, "--quiet"]) == 0
    # What the tiny model picks: target_size 32 (16:9 rounds to 32x32 there) and its guider's scale.
    assert (seen["height"], seen["width"], seen["guidance_scale"]) == (32, 32, 6.0)
    assert _frames(tmp_path / "v.mp4").shape == (10, 32, 32, 3)


@pytest.mark.parametrize(
    "change, args, match",
    [
        ({"image": "start.png"}, ["--tiny", "hunyuanvideo1.5-t2v"], r"image: HunyuanVideo 1.5 T2V is a text-to-video"),
        ({"model": I2V_ID}, ["--tiny"], r"image: HunyuanVideo 1.5 I2V is an image-to-video model: set `image:`"),
        ({"guidance_scale_2": 2.0}, ["--tiny", "hunyuanvideo1.5-t2v"], r"guidance_scale_2: only two-expert models"),
        ({"height": 40}, ["--tiny", "hunyuanvideo1.5-t2v"], r"height: must be a positive multiple of 16"),
        ({"model": T2V_ID, "image": "start.png"}, [], r"image: HunyuanVideo 1.5 T2V is a text-to-video model"),
        ({"model": T2V_ID, "width": 856}, [], r"width: must be a positive multiple of 16"),
        ({"model": T2V_ID, "guidance_scale": "high"}, [], r"guidance_scale: must be a number >= 0"),
        ({}, ["--tiny", "hunyuanvideo2"], r"--tiny hunyuanvideo2: no such model family; choose one of .*hunyuan"),
    ],
)
def test_errors_are_named_before_any_model_loads(tmp_path, capsys, monkeypatch, change, args, match):
    from diffusers_moc.pipelines import HunyuanVideo15LongVideoPipeline

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(HunyuanVideo15LongVideoPipeline, "from_pretrained", no_loading)
    monkeypatch.setattr("diffusers_moc.tiny_hunyuan_video15.tiny_hunyuan_video15_components", no_loading)
    _picture(tmp_path / "start.png")
    path = _board(tmp_path, **change)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["generate", path, "-o", str(tmp_path / "video.mp4"), "--quiet", *args]) == 2
    assert re.search(match, capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
