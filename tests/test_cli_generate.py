"""`diffusers-moc generate STORYBOARD -o out.mp4 --tiny`: end to end in a temporary folder, and nothing on error."""

from __future__ import annotations

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
