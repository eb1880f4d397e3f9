"""`diffusers-moc generate STORYBOARD -o out.mp4 --tiny`: end to end in a temporary folder, and nothing on error."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import yaml

from diffusers_moc import video_io
from diffusers_moc.cli import build_parser, main
from diffusers_moc.commands.generate import shot_paths

av = pytest.importorskip("av")

BOARD = {
    "global_prompt": "a red car in a small city",
    "fps": 8,
    "guidance_scale": 3.0,
    "max_sequence_length": 16,
    "seed": 1,
    "moc": {"top_k": 2, "anchor_own_shot": True, "causal": True},
    "shots": [
        {"prompt": "the car drives down the street", "num_frames": 5},
        {"prompt": "close up of the driver", "seconds": 1},  # 1 s at 8 fps -> 9 frames
        {"prompt": "the car at night", "num_frames": 1},
    ],
}


def read(path) -> np.ndarray:
    with av.open(str(path)) as container:
        assert float(container.streams.video[0].average_rate) == 8
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.fixture
def board(tmp_path):
    path = tmp_path / "board.yaml"
    path.write_text(yaml.safe_dump(BOARD), encoding="utf-8")
    return path


def test_generate_is_registered():
    args = build_parser().parse_args(["generate", "board.yaml", "-o", "out.mp4", "--tiny", "--per-shot"])
    assert args.command == "generate" and args.tiny and args.per_shot
    with pytest.raises(SystemExit):  # --model and --tiny exclude each other
        build_parser().parse_args(["generate", "b.yaml", "-o", "o.mp4", "--tiny", "--model", "x"])


def test_generate_tiny_end_to_end(board, tmp_path, capsys):
    out = tmp_path / "video.mp4"
    assert main(["generate", str(board), "-o", str(out), "--tiny", "--per-shot", "--quiet"]) == 0
    frames = read(out)
    assert frames.shape == (15, 32, 32, 3)  # 5 + 9 + 1 frames at --tiny's 32x32
    per_shot = [read(p) for p in shot_paths(str(out), 3)]
    assert [len(f) for f in per_shot] == [5, 9, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "board.yaml",
        "video.mp4",
        "video_shot01.mp4",
        "video_shot02.mp4",
        "video_shot03.mp4",
    ]
    assert "wrote" in capsys.readouterr().out
    # The same seed gives the same video; an existing file needs --overwrite.
    assert main(["generate", str(board), "-o", str(out), "--tiny", "--quiet"]) == 2
    again = tmp_path / "again.mp4"
    assert main(["generate", str(board), "-o", str(again), "--tiny", "--quiet", "--height", "48"]) == 0
    assert read(again).shape == (15, 48, 32, 3)


@pytest.mark.parametrize(
    "change, args, match",
    [
        ({"shots": []}, [], "shots: is empty"),
        ({"shots": [{"prompt": "a", "num_frames": 6}]}, [], r"shots\[0\]\.num_frames: 6 cannot be decoded"),
        ({"colour": "red"}, [], "colour: unknown key"),
        ({}, ["--height", "40"], "height: must be a positive multiple of 16"),
        ({}, ["--no-tiny"], "no model"),
    ],
)
def test_errors_write_nothing(board, tmp_path, capsys, change, args, match):
    board.write_text(yaml.safe_dump({**BOARD, **change}), encoding="utf-8")
    out = tmp_path / "video.mp4"
    argv = ["generate", str(board), "-o", str(out), "--per-shot", "--quiet"]
    argv += [a for a in args if a != "--no-tiny"] + ([] if "--no-tiny" in args else ["--tiny"])
    assert main(argv) == 2
    assert re.search(match, capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["board.yaml"]


def test_bad_output_paths(board, tmp_path, capsys):
    assert main(["generate", str(board), "-o", str(tmp_path / "video.gif"), "--tiny"]) == 2
    assert "must end in one of" in capsys.readouterr().err
    assert main(["generate", str(board), "-o", str(tmp_path / "nope" / "video.mp4"), "--tiny"]) == 2
    assert "does not exist" in capsys.readouterr().err
    existing = tmp_path / "video_shot02.mp4"
    existing.write_bytes(b"keep")
    assert main(["generate", str(board), "-o", str(tmp_path / "video.mp4"), "--tiny", "--per-shot"]) == 2
    assert "video_shot02.mp4 exists" in capsys.readouterr().err
    assert existing.read_bytes() == b"keep" and not (tmp_path / "video.mp4").exists()


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def failing_write(path, frames, fps, writer):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        open(path, "wb").write(b"partial")

    monkeypatch.setattr(video_io, "_write", failing_write)
    frames = np.zeros((3, 16, 16, 3), dtype=np.float32)
    with pytest.raises(OSError, match="disk full"):
        video_io.write_videos([(tmp_path / "a.mp4", frames), (tmp_path / "b.mp4", frames)], fps=8)
    assert list(tmp_path.iterdir()) == []


def test_generate_with_model_folder(board, tmp_path):
    """`--model` loads a diffusers folder (here the tiny components saved with save_pretrained)."""
    from diffusers_moc.pipelines import LongVideoPipeline
    from diffusers_moc.tiny import tiny_wan_components

    LongVideoPipeline(**tiny_wan_components()).save_pretrained(tmp_path / "model")
    out = tmp_path / "video.mp4"
    argv = ["generate", str(board), "-o", str(out), "--model", str(tmp_path / "model"), "--quiet"]
    assert main(argv + ["--height", "32", "--width", "32", "--steps", "1"]) == 0
    assert read(out).shape == (15, 32, 32, 3)


# ---------------------------------------------------------------------- Wan 2.2, image start, routing map
def _picture(path, size=16):
    import PIL.Image

    ramp = np.linspace(0, 255, size, dtype=np.uint8)
    PIL.Image.fromarray(np.stack([np.tile(ramp, (size, 1))] * 3, -1)).save(path)
    return path


def test_tiny_ti2v_from_an_image_with_a_routing_map(tmp_path, capsys):
    """The storyboard names TI2V-5B and no fps: `--tiny` stands in for it (64x64: its VAE compresses 16x) at the
    model's 24 fps; the image (relative to the storyboard) starts shot 1; the map and its numbers are written."""
    board = {k: v for k, v in BOARD.items() if k != "fps"}
    board.update(model="Wan-AI/Wan2.2-TI2V-5B-Diffusers", image="start.png")
    board["shots"] = [
        {"prompt": "the car drives down the street", "num_frames": 5},
        {"prompt": "a dog", "seconds": 0.5},
    ]
    (tmp_path / "boards").mkdir()
    _picture(tmp_path / "boards" / "start.png")
    path = tmp_path / "boards" / "board.yaml"
    path.write_text(yaml.safe_dump(board), encoding="utf-8")
    out, picture = tmp_path / "video.mp4", tmp_path / "map.png"
    argv = ["generate", str(path), "-o", str(out), "--tiny", "--quiet", "--routing-map", str(picture)]
    assert main(argv) == 0
    with av.open(str(out)) as container:
        assert float(container.streams.video[0].average_rate) == 24
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    assert frames.shape == (5 + 13, 64, 64, 3)  # 0.5 s at 24 fps is 13 frames
    numbers = json.loads((tmp_path / "map.json").read_text())
    assert numbers["shot_starts"] == [0, 2] and list(numbers["layers"]) == ["blocks.0.attn1", "blocks.1.attn1"]
    assert picture.read_bytes()[:4] == b"\x89PNG"
    err = capsys.readouterr().err
    assert "Wan 2.2 TI2V-5B (tiny), from an image" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["boards", "map.json", "map.png", "video.mp4"]


@pytest.mark.parametrize(
    "change, args, match",
    [
        ({"image": "missing.png"}, ["--tiny", "wan2.1-i2v"], r"image: missing.png: no such file"),
        ({"image": "board.yaml"}, ["--tiny", "wan2.1-i2v"], r"image: board.yaml: cannot be read as an image"),
        ({"image": "start.png"}, ["--tiny"], r"image: Wan 2.1 T2V is a text-to-video model"),
        ({}, ["--tiny", "wan2.2-i2v-a14b"], r"image: Wan 2.2 I2V-A14B is an image-to-video model: set `image:`"),
        ({"guidance_scale_2": 2.0}, ["--tiny"], r"guidance_scale_2: only two-expert models"),
        ({}, ["--tiny", "wan3"], r"--tiny wan3: no such model family"),
        ({}, ["--tiny", "--image", "nope.png"], r"--image nope.png: no such file"),
        ({}, ["--tiny", "--routing-map", "map.gif"], r"--routing-map map.gif: the picture must end in one of"),
        ({}, ["--tiny", "--routing-map", "TMP/start.png"], r"start.png exists; pass --overwrite"),
        ({"model": "UNSUPPORTED"}, [], r"model: .* is a StableDiffusionPipeline model; LongVideoPipeline runs"),
        ({"model": "UNSUPPORTED"}, ["--tiny"], r"model: .* is a StableDiffusionPipeline model; LongVideoPipeline"),
        ({"model": "Wan-AI/Wan2.2-TI2V-5B-Diffusers", "height": 720}, [], r"height: Wan 2.2 TI2V-5B takes multiples"),
    ],
)
def test_model_and_image_errors_are_named_before_any_model_loads(board, tmp_path, capsys, change, args, match):
    _picture(tmp_path / "start.png")
    unsupported = tmp_path / "sd"
    unsupported.mkdir()
    (unsupported / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    if change.get("model") == "UNSUPPORTED":
        change = {"model": str(unsupported)}
    board.write_text(yaml.safe_dump({**BOARD, **change}), encoding="utf-8")
    before = sorted(p.name for p in tmp_path.iterdir())
    args = [a.replace("TMP/", f"{tmp_path}/") for a in args]
    argv = ["generate", str(board), "-o", str(tmp_path / "video.mp4"), "--quiet", *args]
    assert main(argv) == 2
    assert re.search(match, capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_failed_write_leaves_no_routing_map(board, tmp_path, monkeypatch):
    def failing_write(path, frames, fps, writer):
        raise OSError("disk full")

    monkeypatch.setattr(video_io, "_write", failing_write)
    argv = ["generate", str(board), "-o", str(tmp_path / "v.mp4"), "--tiny", "--quiet"]
    assert main([*argv, "--routing-map", str(tmp_path / "map.png")]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["board.yaml"]


def test_a_repo_id_the_hub_cannot_answer_is_a_named_input_error(board, tmp_path, capsys, monkeypatch):
    import huggingface_hub
    from huggingface_hub.utils import LocalEntryNotFoundError

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    board.write_text(yaml.safe_dump({**BOARD, "model": "Wan-AI/Wan2.2-T2V-A14B"}), encoding="utf-8")
    argv = ["generate", str(board), "-o", str(tmp_path / "video.mp4"), "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "model: cannot read the configuration of Wan-AI/Wan2.2-T2V-A14B from the Hub (a mistyped repo id" in err
    assert "no connection to the Hub and not in the cache" in err and "Traceback" not in err
    # --tiny downloads nothing: an unknown id runs the default tiny model, and says so.
    assert main([*argv, "--tiny"]) == 0
    assert "is not a known checkpoint id and --tiny downloads nothing, so the tiny model is Wan 2.1 T2V" in (
        capsys.readouterr().err
    )
