"""The `diffusers-moc` command line: fast `--help`, one-line errors with exit code 2, `--debug`, flags honoured or
refused, video outputs complete or absent (writer failures, Ctrl-C, SIGTERM and SIGKILL at several moments)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from _fork import cli_until_paused

from diffusers_moc import video_io
from diffusers_moc.cli import main

pytest.importorskip("av")

BOARD = {
    "global_prompt": "a red car in a small city",
    "fps": 8,
    "max_sequence_length": 16,
    "shots": [
        {"prompt": "the car drives down the street", "num_frames": 5},
        {"prompt": "the car at night", "seconds": 1},
    ],
}


@pytest.fixture
def board(tmp_path):
    path = tmp_path / "board.yaml"
    path.write_text(yaml.safe_dump(BOARD), encoding="utf-8")
    return str(path)


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line, no traceback
    assert err[0].startswith("error: ")
    return err[0]


# ---------------------------------------------------------------------- --help
@pytest.mark.parametrize("argv", [["--help"], ["generate", "--help"], ["train", "--help"]])
def test_help_imports_neither_torch_nor_diffusers(argv):
    code = (
        "import sys\n"
        "from diffusers_moc.cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'accelerate') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "usage: diffusers-moc" in out
    assert out.strip().splitlines()[-1] == "[]"


# ---------------------------------------------------------------------- one-line errors, exit code 2, --debug
def test_train_config_error_is_one_line_naming_the_field(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(f"data: {{root: {tmp_path}}}\ntraining: {{learning_rate: -1}}\n")
    assert main(["train", str(path)]) == 2
    assert _error_line(capsys) == "error: training.learning_rate: must be > 0, got -1.0"
    with pytest.raises(ValueError, match="training.learning_rate"):  # --debug: the exception with its traceback
        main(["train", str(path), "--debug"])
    with pytest.raises(ValueError, match="training.learning_rate"):
        main(["--debug", "train", str(path)])


@pytest.mark.parametrize(
    "text, match",
    [
        ("data: {root: x}\ndata: {root: y}\n", "config: .*c.yaml: cannot parse .* key 'data' is given twice"),
        (
            "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n"
            + "".join(f"{n}: &{n} [{', '.join(['*' + p] * 10)}]\n" for p, n in zip("abcdef", "bcdefg")),
            "config: .*expands to more than 100000 values",
        ),
        (b"data: {root: caf\xe9}\n", r"config: .*c.yaml: the training config is not UTF-8 text \(byte 0xe9"),
        ("data: {root: x}\ntraining: {learning_rate: .nan}\n", "training.learning_rate: must be a finite number"),
        ("data: {root: x}\nseed: -1\n", r"seed: must be an integer in \[0, 2\*\*32\)"),
        ("data: {root: x}\nlora: {target_modules: [" + ", ".join(["to_q"] * 2000) + "]}\nlora: 1\n", "given twice"),
    ],
)
def test_bad_training_yaml_is_one_line(tmp_path, capsys, text, match):
    path = tmp_path / "c.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    assert main(["train", str(path)]) == 2
    line = _error_line(capsys)
    assert __import__("re").search(match, line), line
    assert len(line) < 600  # values are cut short


def test_moc_section_must_be_a_mapping(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(f"data: {{root: {tmp_path}}}\nmoc: [1, 2]\n")
    assert main(["train", str(path)]) == 2
    assert _error_line(capsys) == "error: moc: must be a mapping of MoCConfig settings, got [1, 2]"


def test_oversized_config_and_long_values_are_cut_short(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("data: {root: x}\n# " + "x" * (2 << 20) + "\n")
    assert main(["train", str(path)]) == 2
    assert "more than the 1048576-byte limit" in _error_line(capsys)
    path.write_text("data: {root: x}\nmodel: {pretrained: [" + ", ".join(["abc"] * 5000) + "]}\n")
    assert main(["train", str(path)]) == 2
    line = _error_line(capsys)
    assert line.startswith("error: model.pretrained: must be a string, got ['abc', 'abc',") and len(line) < 200


def test_set_values_are_parsed_within_bounds(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(f"data: {{root: {tmp_path}}}\n")
    assert main(["train", str(path), "--set", "training.max_steps=[unclosed"]) == 2
    assert "training.max_steps: --set value '[unclosed' is not valid YAML" in _error_line(capsys)
    assert main(["train", str(path), "--set", "data.root.x=1"]) == 2
    assert "root is not a section" in _error_line(capsys)


def test_missing_data_and_model_are_named_before_anything_loads(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(
        f"output_dir: {tmp_path / 'out'}\ndata: {{root: {tmp_path / 'nowhere'}}}\nmodel: {{pretrained: tiny}}\n"
    )
    assert main(["train", str(path)]) == 2
    assert _error_line(capsys).startswith("error: data.root: no metadata file")
    path.write_text(f"output_dir: {tmp_path / 'out'}\ndata: {{root: {tmp_path}}}\nmodel: {{pretrained: ./typo/dir}}\n")
    assert main(["train", str(path)]) == 2
    assert "model.pretrained: './typo/dir': no such folder, and not a valid Hub repo id" in _error_line(capsys)


# ---------------------------------------------------------------------- generate: flags honoured or refused
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_without_a_gpu_is_one_line(board, tmp_path, capsys):
    out = str(tmp_path / "v.mp4")
    assert main(["generate", board, "-o", out, "--tiny", "--device", "cuda"]) == 2
    assert "--device cuda: no cuda device is available" in _error_line(capsys)
    assert main(["generate", board, "-o", out, "--tiny", "--device", "gpu0"]) == 2
    assert "not a torch device" in _error_line(capsys)
    assert main(["generate", board, "-o", out, "--tiny", "--cpu-offload"]) == 2
    assert "--cpu-offload" in _error_line(capsys)
    assert main(["generate", board, "-o", out, "--tiny", "--cpu-offload", "--device", "cpu"]) == 2
    assert "--cpu-offload" in _error_line(capsys)
    assert not os.path.exists(out)


def test_tiny_honours_dtype(board, tmp_path, monkeypatch):
    from diffusers_moc.pipelines import LongVideoPipeline

    seen = []
    call = LongVideoPipeline.__call__

    def spy(self, *args, **kwargs):
        seen.append((self.transformer.dtype, self.text_encoder.dtype, self.vae.dtype))
        return call(self, *args, **kwargs)

    monkeypatch.setattr(LongVideoPipeline, "__call__", spy)
    out = tmp_path / "v.mp4"
    assert main(["generate", board, "-o", str(out), "--tiny", "--quiet", "--dtype", "bfloat16"]) == 0
    assert seen == [(torch.bfloat16, torch.bfloat16, torch.float32)] and out.exists()


@pytest.mark.parametrize(
    "change, match",
    [
        ({"fps": 1.0e-9}, "fps: must be between 0.1 and 1000"),
        ({"fps": float("inf")}, "fps: must be a positive number"),
        ({"height": 4096}, "the model cannot take this storyboard: height=4096"),
    ],
)
def test_storyboards_the_model_cannot_take_are_input_errors(board, tmp_path, capsys, change, match):
    with open(board, "w") as f:
        yaml.safe_dump({**BOARD, **change}, f)
    out = tmp_path / "v.mp4"
    argv = ["generate", board, "-o", str(out), "--tiny", "--quiet"]
    if "height" in change:
        argv += ["--height", "4096"]
    assert main(argv) == 2
    assert __import__("re").search(match, _error_line(capsys))
    assert sorted(os.listdir(tmp_path)) == ["board.yaml"]


def test_prompts_cut_at_max_sequence_length_are_reported(board, tmp_path, capsys):
    with open(board, "w") as f:
        yaml.safe_dump({**BOARD, "global_prompt": " ".join(["a red car"] * 10)}, f)
    assert main(["generate", board, "-o", str(tmp_path / "v.mp4"), "--tiny", "--quiet"]) == 0
    assert "global_prompt is 31 tokens; only the first 16 (max_sequence_length) are used" in capsys.readouterr().err


def test_a_silent_video_writer_failure_is_an_error(board, tmp_path, capsys, monkeypatch):
    # ffmpeg runs in a subprocess: when it fails (e.g. a rate it rejects) imageio may not raise and the file is
    # empty or missing. Reading the file back catches it.
    monkeypatch.setattr(video_io, "_write", lambda path, frames, fps, writer: open(path, "wb").close())
    out = tmp_path / "v.mp4"
    assert main(["generate", board, "-o", str(out), "--tiny", "--quiet"]) == 1
    captured = capsys.readouterr()
    assert "wrote" not in captured.out
    assert f"the video writer produced no data for {out}" in captured.err.strip().splitlines()[-1]
    assert sorted(os.listdir(tmp_path)) == ["board.yaml"]


def test_write_videos_puts_back_what_a_failed_rename_replaced(tmp_path, monkeypatch):
    """All or nothing also when a rename into place fails: the outputs already replaced get their old files back,
    those created are removed, nothing temporary is left; a folder in the way is refused before anything moves."""
    frames = np.zeros((3, 16, 16, 3), dtype=np.uint8)
    (tmp_path / "a.mp4").write_bytes(b"old a")
    (tmp_path / "map.png.partial").write_bytes(b"new map")
    outputs = [(tmp_path / "a.mp4", frames), (tmp_path / "b.mp4", frames), (tmp_path / "c.mp4", frames)]
    real = os.replace

    def replace(src, dst):
        if os.fspath(dst) == str(tmp_path / "c.mp4"):
            raise PermissionError(13, "Permission denied", dst)
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    extra = [(str(tmp_path / "map.png.partial"), str(tmp_path / "map.png"))]
    with pytest.raises(PermissionError):
        video_io.write_videos(outputs, fps=8, extra=extra)
    assert (tmp_path / "a.mp4").read_bytes() == b"old a"
    assert sorted(os.listdir(tmp_path)) == ["a.mp4"]
    monkeypatch.setattr(os, "replace", real)
    (tmp_path / "c.mp4").mkdir()
    with pytest.raises(IsADirectoryError, match="a folder is in the way of an output"):
        video_io.write_videos(outputs, fps=8)
    assert (tmp_path / "a.mp4").read_bytes() == b"old a"
    assert sorted(os.listdir(tmp_path)) == ["a.mp4", "c.mp4"]
    (tmp_path / "c.mp4").rmdir()
    assert video_io.write_videos(outputs, fps=8) == [str(tmp_path / n) for n in ("a.mp4", "b.mp4", "c.mp4")]
    assert sorted(os.listdir(tmp_path)) == ["a.mp4", "b.mp4", "c.mp4"]
    video_io.verify_video(str(tmp_path / "a.mp4"), 3, 8)


def test_write_videos_checks_its_arguments_and_reads_back(tmp_path):
    frames = np.zeros((3, 16, 16, 3), dtype=np.uint8)
    for fps in (1.0e-9, 0, -1, float("nan"), 1e6, True):
        with pytest.raises(ValueError, match="fps must be a number in"):
            video_io.write_videos([(tmp_path / "a.mp4", frames)], fps=fps)
    assert video_io.write_videos([(tmp_path / "a.mp4", frames)], fps=8) == [str(tmp_path / "a.mp4")]
    with pytest.raises(OSError, match="wrote 3 of 4 frames"):
        video_io.verify_video(str(tmp_path / "a.mp4"), 4, 8)
    with pytest.raises(OSError, match="at 8 fps instead of 16"):
        video_io.verify_video(str(tmp_path / "a.mp4"), 3, 16)
    (tmp_path / "junk.mp4").write_bytes(b"\0" * 100)
    with pytest.raises(OSError, match="unreadable file"):
        video_io.verify_video(str(tmp_path / "junk.mp4"), 3, 8)
    bad = [
        (np.full((3, 16, 16, 3), np.nan, np.float32), "NaN or infinite values"),  # would be a black video
        (np.zeros((3, 15, 16, 3), np.uint8), "even height and width, got 15x16"),
        (np.zeros((0, 16, 16, 3), np.uint8), "no frames to write"),
        (np.zeros((3, 16, 16), np.uint8), r"shaped \(frames, height, width, 3\)"),
    ]
    for frames_, match in bad:  # the good first video is not written either: every video is checked first
        with pytest.raises(ValueError, match=match):
            video_io.write_videos([(tmp_path / "b.mp4", frames), (tmp_path / "c.mp4", frames_)], fps=8)
    with pytest.raises(ValueError, match="nowhere does not exist"):
        video_io.write_videos([(tmp_path / "nowhere" / "b.mp4", frames)], fps=8)
    assert sorted(os.listdir(tmp_path)) == ["a.mp4", "junk.mp4"]


# ---------------------------------------------------------------------- generate: interrupted at several moments
@pytest.mark.parametrize(
    "moment, sig, code",
    [
        ("write_videos:written", signal.SIGINT, 130),
        ("write_videos:written", signal.SIGTERM, 130),
        ("write_videos:verified", signal.SIGINT, 130),
        ("write_videos:written", signal.SIGKILL, -signal.SIGKILL),
    ],
)
def test_interrupted_generate_leaves_nothing(board, tmp_path, moment, sig, code):
    out = tmp_path / "long.mp4"
    argv = ["generate", board, "-o", str(out), "--tiny", "--quiet", "--per-shot"]
    assert cli_until_paused(argv, moment, sig, tmp_path / "paused") == code
    left = sorted(os.listdir(tmp_path))
    if sig == signal.SIGKILL:
        # A killed process cannot clean up: only its hidden temporary folder is left, and the next run removes it.
        assert [n for n in left if n != "board.yaml"] and all(n.startswith(".long") for n in left if n != "board.yaml")
        assert main(argv) == 0
        assert sorted(os.listdir(tmp_path)) == ["board.yaml", "long.mp4", "long_shot01.mp4", "long_shot02.mp4"]
    else:
        assert left == ["board.yaml"]


@pytest.mark.parametrize(
    "moment, sig, complete",
    [
        ("write_videos:verified", signal.SIGINT, False),  # before the outputs are put in place: none is
        ("write_videos:moving", signal.SIGINT, True),  # one is in place: Ctrl-C waits for the others
    ],
)
def test_ctrl_c_while_generate_writes_its_outputs_says_what_it_left(board, tmp_path, capfd, moment, sig, complete):
    pytest.importorskip("matplotlib")
    out, picture = tmp_path / "long.mp4", tmp_path / "map.png"
    argv = ["generate", board, "-o", str(out), "--tiny", "--quiet", "--per-shot", "--routing-map", str(picture)]
    assert cli_until_paused(argv, moment, sig, tmp_path / "paused") == 130
    last = capfd.readouterr().err.strip().splitlines()[-1]
    outputs = ["long.mp4", "long_shot01.mp4", "long_shot02.mp4", "map.json", "map.png"]
    if complete:
        assert last.startswith("interrupted: the outputs were all written, complete, before it took effect: "), last
        assert sorted(os.listdir(tmp_path)) == ["board.yaml", *outputs]  # no temporary file either
        for name, frames in zip(outputs[:3], [14, 5, 9]):
            video_io.verify_video(str(tmp_path / name), frames, 8)
        assert json.loads((tmp_path / "map.json").read_text())
        assert picture.read_bytes().startswith(b"\x89PNG")
    else:
        assert last == "interrupted: no output was written"
        assert sorted(os.listdir(tmp_path)) == ["board.yaml"]


# ---------------------------------------------------------------------- a full disk
@pytest.mark.parametrize("writer", ["ffmpeg-200", "ffmpeg-5", "in-process"])
def test_a_full_disk_while_writing_a_video_is_named_and_leaves_nothing(tmp_path, monkeypatch, writer):
    """With ffmpeg (a subprocess), the disk is really full: the temporary file it writes, and the file this process
    writes to find out whether the disk is full, are links to /dev/full. 200 frames: ffmpeg quits while frames are
    still sent to it (the broken pipe imageio reports); 5 frames: it quits at the end, leaving no file. In-process
    (PyAV): the write raises ENOSPC."""
    if writer.startswith("ffmpeg"):
        if not os.path.exists("/dev/full"):
            pytest.skip("needs /dev/full (writes to it fail with ENOSPC)")
        make_folder = video_io._make_temporary_folder

        def full_folder(path, folders):
            tmp_dir = make_folder(path, folders)
            if os.path.basename(path) == "b.mp4":
                for name in ("b.mp4", video_io._SPACE_PROBE):
                    os.symlink("/dev/full", os.path.join(tmp_dir, name))
            return tmp_dir

        monkeypatch.setattr(video_io, "_make_temporary_folder", full_folder)
    else:
        write = video_io._write

        def write_until_full(path, frames, fps, writer):
            if os.path.basename(path) != "b.mp4":
                return write(path, frames, fps, writer)
            with open(path, "wb") as f:
                f.write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(video_io, "_write", write_until_full)
    num_frames = 200 if writer == "ffmpeg-200" else 5
    frames = np.random.default_rng(0).integers(0, 256, (num_frames, 64, 64, 3), dtype=np.uint8)
    b = tmp_path / "b.mp4"
    with pytest.raises(OSError) as info:
        video_io.write_videos([(tmp_path / "a.mp4", frames), (b, frames)], fps=8)
    assert info.value.errno == errno.ENOSPC
    assert str(info.value) == (
        f"[Errno {errno.ENOSPC}] No space left on device: the disk is full (writing {b} in {tmp_path}); nothing was "
        "written"
    )
    if writer == "ffmpeg-200":
        assert "Broken pipe" in str(info.value.__cause__)  # what was reported before
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------- MoCConfig and the Hub
def test_moc_config_from_pretrained_names_the_problem(tmp_path):
    from diffusers_moc import MoCConfig

    with pytest.raises(FileNotFoundError, match=r"'\./typo/dir': no such folder, and not a valid Hub repo id"):
        MoCConfig.from_pretrained("./typo/dir")
    path = tmp_path / "moc_config.json"
    for content, match in [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must hold a JSON object .* got a list"),
        (b'{"top_k": "\xff"}', "not UTF-8"),
        (json.dumps({"top_k": -1}).encode(), "top_k must be an integer >= 0"),
        (json.dumps({"topk": 1}).encode(), "unknown MoCConfig keys"),
        (b"[" * 100000 + b"]" * 100000, "nested too deeply"),
    ]:
        path.write_bytes(content)
        with pytest.raises(ValueError, match=match) as info:
            MoCConfig.from_pretrained(tmp_path)
        assert str(info.value).startswith(str(path))


def test_moc_config_from_the_hub_offline_says_so(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    from diffusers_moc import MoCConfig

    def offline(*args, **kwargs):
        raise LocalEntryNotFoundError("offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(FileNotFoundError, match="could not be downloaded from the Hub nor found in the local cache"):
        MoCConfig.from_pretrained("user/moc-lora")


def test_push_to_hub_deletes_stale_files_in_the_same_commit(tmp_path):
    from unittest import mock

    from huggingface_hub import HfApi

    from diffusers_moc.hub import push_to_hub

    for name in ("pytorch_lora_weights.safetensors", "moc_config.json", "README.md"):
        (tmp_path / name).write_text("x")
    remote = [".gitattributes", "README.md", "moc_config.json", "old_lora.safetensors", "samples/a.mp4"]
    with (
        mock.patch("huggingface_hub.hf_api.is_xet_available", return_value=False),  # the one-commit upload path
        mock.patch.object(HfApi, "create_repo"),
        mock.patch.object(HfApi, "_validate_yaml"),
        mock.patch.object(HfApi, "list_repo_files", return_value=remote),
        mock.patch.object(HfApi, "create_commit", return_value=mock.Mock(commit_url="https://hf.co/c/1")) as commit,
    ):
        assert push_to_hub(tmp_path, "user/moc", token="hf_x") == "https://hf.co/c/1"
    commit.assert_called_once()
    ops = {(type(op).__name__, op.path_in_repo) for op in commit.call_args.kwargs["operations"]}
    assert ops == {
        ("CommitOperationDelete", "old_lora.safetensors"),
        ("CommitOperationDelete", "samples/a.mp4"),
        ("CommitOperationAdd", "pytorch_lora_weights.safetensors"),
        ("CommitOperationAdd", "moc_config.json"),
        ("CommitOperationAdd", "README.md"),
    }
    with pytest.raises(ValueError, match="repo_id must look like"):
        push_to_hub(tmp_path, "user/a/b")
