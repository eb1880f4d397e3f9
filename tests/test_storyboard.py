"""Storyboard files: parsing YAML/JSON, defaults, and validation errors that name the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from diffusers_moc import MoCConfig
from diffusers_moc.pipelines import Shot, Storyboard, StoryboardError, load_storyboard

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "storyboard.yaml"

VALID = {
    "global_prompt": "a red car in a small city",
    "negative_prompt": "blurry",
    "fps": 16,
    "height": 32,
    "width": 48,
    "num_inference_steps": 2,
    "seed": 7,
    "moc": {"top_k": 3, "anchor_own_shot": True},
    "shots": [
        {"prompt": "the car drives down the street", "seconds": 5},
        {"prompt": "close up of the driver", "num_frames": 9},
    ],
}


def write(tmp_path, data, name="board.yaml"):
    path = tmp_path / name
    path.write_text(json.dumps(data) if name.endswith(".json") else yaml.safe_dump(data), encoding="utf-8")
    return path


@pytest.mark.parametrize("name", ["board.yaml", "board.yml", "board.json"])
def test_load_yaml_and_json(tmp_path, name):
    board = load_storyboard(write(tmp_path, VALID, name))
    assert board.shots == (Shot("the car drives down the street", seconds=5.0), Shot("close up of the driver", 9))
    assert board.shot_frames == [81, 9]
    assert board.num_frames == 90
    assert board.moc == MoCConfig(top_k=3, anchor_own_shot=True)
    assert (board.height, board.width, board.seed, board.guidance_scale) == (32, 48, 7, 5.0)
    kwargs = board.pipeline_kwargs()
    assert kwargs["global_prompt"] == "a red car in a small city" and kwargs["moc_config"] == board.moc
    assert Storyboard.from_dict(board.to_dict()) == board


def test_defaults():
    board = Storyboard.from_dict({"shots": [{"prompt": "a cat", "num_frames": 81}]})
    assert (board.fps, board.height, board.width, board.num_inference_steps) == (16, 480, 832, 50)
    assert board.global_prompt is None and board.model is None and board.moc == MoCConfig()


def test_example_storyboard_is_valid():
    board = load_storyboard(EXAMPLE)
    assert len(board.shots) == 3
    assert all((f - 1) % 4 == 0 for f in board.shot_frames)


def _with(**changes):
    data = json.loads(json.dumps(VALID))
    for key, value in changes.items():
        if value is _DROP:
            data.pop(key)
        else:
            data[key] = value
    return data


_DROP = object()


@pytest.mark.parametrize(
    "data, match",
    [
        (_with(shots=_DROP), r"shots: missing"),
        (_with(shots=[]), r"shots: is empty"),
        (_with(shots={"prompt": "a"}), r"shots: must be a list"),
        (_with(shots=[{"prompt": "a", "num_frames": 0}]), r"shots\[0\]\.num_frames: must be positive"),
        (_with(shots=[{"prompt": "a", "seconds": 0}]), r"shots\[0\]\.seconds: must be a positive number"),
        (_with(shots=[{"prompt": "a", "seconds": 1e-9}]), r"shots\[0\]\.seconds: 1e-09 s is shorter than one frame"),
        (_with(shots=[{"prompt": "a", "seconds": 1e12}]), r"shots\[0\]\.seconds: 1e\+12 s at 16 fps is more than"),
        (_with(shots=[{"prompt": "a", "num_frames": 4 * 10**9 + 1}]), r"shots\[0\]\.num_frames: must be at most"),
        (_with(shots=[{"prompt": "a", "num_frames": 80}]), r"shots\[0\]\.num_frames: 80 cannot be decoded .*4n\+1"),
        (_with(shots=[{"prompt": "a", "num_frames": 8.5}]), r"shots\[0\]\.num_frames: must be an integer"),
        (_with(shots=[{"prompt": "a"}]), r"shots\[0\]: needs num_frames or seconds"),
        (_with(shots=[{"prompt": "a", "num_frames": 5, "seconds": 1}]), r"shots\[0\]: give num_frames or seconds"),
        (_with(shots=[{"prompt": "", "num_frames": 5}]), r"shots\[0\]\.prompt: must be a non-empty string"),
        (_with(shots=[{"prompt": "a", "frames": 5}]), r"shots\[0\]\.frames: unknown key"),
        (_with(shots=["a cat"]), r"shots\[0\]: must be a mapping"),
        (_with(resolution=480), r"resolution: unknown key"),
        (_with(height=500), r"height: must be a positive multiple of 16"),
        (_with(width=True), r"width: must be a positive multiple of 16"),
        (_with(fps=0), r"fps: must be a positive number"),
        (_with(num_inference_steps=0), r"num_inference_steps: must be a positive integer"),
        (_with(guidance_scale="high"), r"guidance_scale: must be a number"),
        (_with(seed=-1), r"seed: must be an integer in \[0, 2\*\*64\)"),
        (_with(seed=2**70), r"seed: must be an integer in \[0, 2\*\*64\)"),
        (_with(global_prompt=""), r"global_prompt: is empty"),
        (_with(negative_prompt=3), r"negative_prompt: must be a string"),
        (_with(moc={"top_k": -1}), r"moc: MoCConfig\.top_k must be an integer >= 0"),
        (_with(moc={"topk": 3}), r"moc: unknown MoCConfig keys \['topk'\]"),
        (_with(moc=5), r"moc: must be a mapping"),
        ([1, 2], r"must be a mapping of settings"),
    ],
)
def test_validation_errors_name_the_field(tmp_path, data, match):
    path = write(tmp_path, data)
    with pytest.raises(StoryboardError, match=match) as info:
        load_storyboard(path)
    assert str(info.value).startswith(str(path))


def test_file_errors(tmp_path):
    with pytest.raises(StoryboardError, match="no such storyboard file"):
        load_storyboard(tmp_path / "missing.yaml")
    txt = tmp_path / "board.txt"
    txt.write_text("shots: []")
    with pytest.raises(StoryboardError, match=r"\.yaml, \.yml or \.json"):
        load_storyboard(txt)
    bad = tmp_path / "bad.yaml"
    bad.write_text("shots: [unclosed\n")
    with pytest.raises(StoryboardError, match="cannot parse"):
        load_storyboard(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(StoryboardError, match="must be a mapping"):
        load_storyboard(empty)


# ---------------------------------------------------------------------- bounded parsing
def _alias_bomb(levels: int = 9) -> str:
    text = 'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n'
    names = "abcdefghijklmnop"
    for prev, name in zip(names, names[1 : levels + 1]):
        text += f"{name}: &{name} [{', '.join(['*' + prev] * 9)}]\n"
    return text + f"shots: *{names[levels]}\n"


@pytest.mark.parametrize(
    "text, match",
    [
        (_alias_bomb(), "expands to more than 100000 values .* alias bomb"),  # 9**10 strings if expanded
        ("shots: &s [*s]\n", "recursive alias"),
        ("shots: " + "[" * 200 + "]" * 200 + "\n", "nested more than 64 levels"),
        ("fps: 8\nfps: 16\nshots: []\n", "key 'fps' is given twice"),
        ("shots:\n  - {prompt: a, prompt: b, num_frames: 5}\n", "key 'prompt' is given twice"),
    ],
)
def test_yaml_bombs_deep_documents_and_duplicate_keys_are_refused(tmp_path, text, match):
    path = tmp_path / "board.yaml"
    path.write_text(text)
    with pytest.raises(StoryboardError, match=match) as info:
        load_storyboard(path)
    assert str(info.value).startswith(f"{path}: cannot parse") and len(str(info.value)) < 600


def test_yaml_merge_keys_and_anchors_still_work(tmp_path):
    path = tmp_path / "board.yaml"
    path.write_text("shots:\n  - &s {prompt: a cat, num_frames: 9}\n  - {<<: *s, prompt: a dog}\n  - *s\n")
    board = load_storyboard(path)
    assert board.shot_frames == [9, 9, 9] and board.shots[1].prompt == "a dog"


def test_file_size_encoding_and_echoed_values_are_bounded(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("shots: []\n#" + "x" * (1 << 20) + "\n")
    with pytest.raises(StoryboardError, match=r"big.yaml: the storyboard is \d+ bytes, more than the 1048576-byte"):
        load_storyboard(big)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("global_prompt: café\nshots: []\n".encode("latin-1"))
    with pytest.raises(
        StoryboardError, match=r"latin.yaml: the storyboard is not UTF-8 text \(byte 0xe9 at offset 18\)"
    ):
        load_storyboard(latin)
    for name, data in [
        ("long.yaml", {"shots": [{"prompt": "x" * 100_000, "num_frames": 4}]}),
        ("list.json", {"shots": [{"prompt": list(range(50_000)), "num_frames": 5}]}),
        ("key.json", {"k" * 100_000: 1, "shots": []}),
    ]:
        path = write(tmp_path, data, name)
        with pytest.raises(StoryboardError) as info:
            load_storyboard(path)
        assert len(str(info.value)) < 400, str(info.value)[:400]
    dup = tmp_path / "dup.json"
    dup.write_text('{"shots": [{"prompt": "a", "prompt": "b", "num_frames": 5}]}')
    with pytest.raises(StoryboardError, match="dup.json: cannot parse: key 'prompt' is given twice"):
        load_storyboard(dup)
    with pytest.raises(StoryboardError, match="is a folder, not a storyboard file"):
        load_storyboard(tmp_path)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(StoryboardError, match="deep.json: cannot parse"):
        load_storyboard(deep)


@pytest.mark.parametrize("fps", [1.0e-9, 0.05, 1001, 1e12])
def test_fps_outside_what_the_writers_take_is_refused(tmp_path, fps):
    with pytest.raises(StoryboardError, match="fps: must be between 0.1 and 1000"):
        load_storyboard(write(tmp_path, _with(fps=fps)))


def test_model_defaults_fill_only_what_the_storyboard_leaves_out(tmp_path):
    from diffusers_moc.model_families import WAN_FAMILIES

    ti2v = WAN_FAMILIES["wan2.2-ti2v-5b"].defaults
    board = Storyboard.from_dict({"height": 32, "shots": [{"prompt": "a cat", "seconds": 0.5}]})
    assert (board.fps, board.shot_frames) == (16, [9])  # Wan 2.1's defaults without a model
    resolved = board.with_model_defaults(ti2v)
    assert (resolved.fps, resolved.width, resolved.height, resolved.shot_frames) == (24, 1280, 32, [13])
    assert resolved.with_overrides({"width": 64}, "cli").with_model_defaults(ti2v).width == 64
    a14b = board.with_model_defaults(WAN_FAMILIES["wan2.2-t2v-a14b"].defaults)
    assert (a14b.guidance_scale, a14b.guidance_scale_2, a14b.num_inference_steps) == (4.0, 3.0, 40)
    # A given guidance_scale also guides the low-noise expert, as in WanPipeline and LongVideoPipeline.
    given = Storyboard.from_dict({"guidance_scale": 6, "shots": [{"prompt": "a cat", "seconds": 0.5}]})
    a14b = given.with_model_defaults(WAN_FAMILIES["wan2.2-t2v-a14b"].defaults)
    assert (a14b.guidance_scale, a14b.guidance_scale_2) == (6.0, 6.0)
    assert given.with_model_defaults(ti2v).guidance_scale_2 is None
    both = Storyboard.from_dict({"guidance_scale": 6, "guidance_scale_2": 2, "shots": [{"prompt": "a", "seconds": 1}]})
    assert both.with_model_defaults(WAN_FAMILIES["wan2.2-t2v-a14b"].defaults).guidance_scale_2 == 2.0


def test_image_is_a_readable_file_relative_to_the_storyboard(tmp_path):
    import PIL.Image

    (tmp_path / "shots").mkdir()
    PIL.Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "shots" / "start.png")
    board = load_storyboard(write(tmp_path, _with(image="shots/start.png")))
    assert board.image == str(tmp_path / "shots" / "start.png")
    assert board.load_image().getpixel((0, 0)) == (255, 0, 0)
    assert board.pipeline_kwargs()["image"].size == (8, 8)
    assert Storyboard.from_dict(board.to_dict()) == board
    for value, match in [
        ("nope.png", r"image: nope.png: no such file \(relative to"),
        ("board.yaml", "image: board.yaml: cannot be read as an image"),
        (3, "image: must be the path of an image file"),
    ]:
        with pytest.raises(StoryboardError, match=match):
            load_storyboard(write(tmp_path, _with(image=value)))
    with pytest.raises(StoryboardError, match="guidance_scale_2: must be a number >= 0"):
        load_storyboard(write(tmp_path, _with(guidance_scale_2=-1)))
