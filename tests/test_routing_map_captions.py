"""Routing maps of streams with per-shot caption chunks (HunyuanVideo 1.5 with `caption_shots`): each caption a row
and a column of its own, in stream order; numbers by hand, through the transformer and through the pipeline."""

from __future__ import annotations

import json

import pytest
import torch
from test_hunyuan_video15_captions import CAPTIONS, SHOTS, _inputs, _model
from test_routing_map import _increasing_routing

from diffusers_moc import MoCConfig, Shot, apply_moc, moc_context, moc_routing_map
from diffusers_moc.core.joint_stream import joint_stream
from diffusers_moc.core.layout import ChunkLayout
from diffusers_moc.core.recording import RoutingMap

SHOT_CAPTIONS = MoCConfig(top_k=1, local_window=0, causal=True, text_anchors="shot", backend="reference")
#: The rows of the tiny transformer's stream under CAPTIONS: global caption, then per shot its glyph text (shot 1's
#: ByT5 tokens come first in diffusers' packing, but MoC's order groups by shot), its caption and its frames.
ROWS = [
    "caption (global)",
    "glyph text (shot 0)",
    "caption (shot 0)",
    "frame 0",
    "frame 1",
    "glyph text (shot 1)",
    "caption (shot 1)",
    "frame 2",
    "frame 3",
]


def test_numbers_by_hand_captions_are_rows_and_columns():
    """Two shots of 2 frames of 2 tokens; a global caption (2 tokens), one caption per shot (1 token), 2 padded
    tokens. Anchors: own chunk and, with text_anchors="shot", the global caption and the own shot's caption; the
    increasing routing sends each query to its latest causal candidate."""
    video = ChunkLayout.for_video(4, 2, shot_frames=(2, 2))
    stream = joint_stream(video, ((2, -1), (1, 0), (1, 1)), padding=2)
    labels = [None] * stream.layout.num_chunks
    for chunk, i in enumerate(stream.text_index):
        if i is not None:
            labels[chunk] = ["caption (global)", "caption (shot 0)", "caption (shot 1)"][i]
    rmap = RoutingMap()
    routing = _increasing_routing(stream.layout, SHOT_CAPTIONS)
    rmap.record("blocks.0.attn", routing, 0, 4, 2, text_rows=labels)
    data = rmap.to_dict()
    assert data["rows"] == ["caption (global)", "caption (shot 0)", "frame 0", "frame 1"] + [
        "caption (shot 1)",
        "frame 2",
        "frame 3",
    ]
    assert data["row_shots"] == [-1, 0, 0, 0, 1, 1, 1] and data["frame_shots"] == [0, 0, 1, 1]
    layer = data["layers"]["blocks.0.attn"]
    g, c0, f0, f1, c1, f2, f3 = range(7)
    anchor = torch.tensor(layer["anchor"])
    # A frame of shot 1 anchors itself, the global caption and its own caption, never shot 0's.
    assert anchor[f2].tolist() == [1, 0, 0, 0, 1, 1, 0]
    assert anchor[c0].tolist() == [1, 1, 0, 0, 0, 0, 0]  # a caption anchors itself and the global caption
    routed = torch.tensor(layer["routed"])
    # Each query routes to its latest earlier chunk that is no anchor: frame 0 has none (the captions before it are
    # anchors); shot 1's caption and frame 2 take frame 1, frame 3 takes frame 2.
    assert routed[f0].tolist() == [0] * 7 and routed[f1].tolist() == [0, 0, 1, 0, 0, 0, 0]
    assert routed[c1].tolist() == routed[f2].tolist() == [0, 0, 0, 1, 0, 0, 0]
    assert routed[f3].tolist() == [0, 0, 0, 0, 0, 1, 0]
    assert routed[g].tolist() == [0] * 7  # the first chunk has no earlier chunk
    assert layer["density"] == pytest.approx(routing.density())
    assert data["skipped_calls"] == 0


def test_through_the_transformer_each_shot_anchors_its_own_caption():
    model = _model()
    apply_moc(model, SHOT_CAPTIONS)
    inputs = _inputs()
    with torch.no_grad(), moc_context(shot_frames=SHOTS, **CAPTIONS):
        expected = model(**inputs).sample
        with moc_routing_map() as rmap:
            got = model(**inputs).sample
    assert torch.equal(got, expected)  # recording changes nothing
    data = rmap.to_dict()
    assert data["rows"] == ROWS and data["frames"] == 4
    assert list(data["layers"]) == ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]
    mean = torch.tensor(data["mean"]["anchor"])
    frames0, frames1 = [3, 4], [7, 8]
    assert (mean[frames0][:, [0, 1, 2]] == 1).all() and (mean[frames0][:, [5, 6]] == 0).all()
    assert (mean[frames1][:, [0, 5, 6]] == 1).all() and (mean[frames1][:, [1, 2]] == 0).all()
    # Causal: nothing of shot 0 (its captions and frames) attends anything of shot 1.
    both = mean + torch.tensor(data["mean"]["routed"])
    assert (both[:5, 5:] == 0).all()


def test_a_pipeline_map_shows_the_captions_and_leaves_out_the_unconditional_pass(tmp_path):
    from test_hunyuan_video15_pipeline import T2V, make_pipe, run

    pipe = make_pipe(T2V)
    shots = [Shot("a cat walks", num_frames=5), Shot("a dog runs", num_frames=5)]
    with moc_routing_map() as rmap:
        run(pipe, shots, num_inference_steps=1, moc_config=SHOT_CAPTIONS)
    data = rmap.to_dict()
    # No glyph text in these captions: one caption chunk each.
    assert data["rows"] == ["caption (global)", "caption (shot 0)", "frame 0", "frame 1", "caption (shot 1)"] + [
        "frame 2",
        "frame 3",
    ]
    layers = len(data["layers"])
    assert {v["calls"] for v in data["layers"].values()} == {1} and data["skipped_calls"] == layers
    picture, numbers = rmap.save(tmp_path / "map.svg")
    assert json.load(open(numbers)) == json.loads(json.dumps(data))
    svg = open(picture, encoding="utf-8").read()
    assert "caption s1" in svg and "caption global" in svg
    axes = rmap.figure().axes
    assert [t.get_text() for t in axes[0].get_yticklabels()][:3] == ["caption global", "caption s0", "0"]


def test_calls_without_captions_first_are_left_out_and_other_videos_refused():
    video = ChunkLayout.for_video(2, 2)
    stream = joint_stream(video, ((1, 0),), padding=0)
    labels = ["caption (shot 0)" if i is not None else None for i in stream.text_index]
    plain = ChunkLayout.concat(video, ChunkLayout.for_captions([3], [-1]))
    rmap = RoutingMap()
    rmap.record("a", _increasing_routing(plain, SHOT_CAPTIONS), 0, 2, 2)  # the unconditional pass came first
    rmap.record("a", _increasing_routing(stream.layout, SHOT_CAPTIONS), 0, 2, 2, text_rows=labels)
    rmap.record("a", _increasing_routing(plain, SHOT_CAPTIONS), 0, 2, 2)
    data = rmap.to_dict()
    assert data["rows"] == ["caption (shot 0)", "frame 0", "frame 1"] and data["skipped_calls"] == 2
    assert data["layers"]["a"]["calls"] == 1
    with pytest.raises(ValueError, match="one moc_routing_map per video"):
        other = joint_stream(ChunkLayout.for_video(3, 2), ((1, 0),))
        rows = ["caption (shot 0)" if i is not None else None for i in other.text_index]
        rmap.record("a", _increasing_routing(other.layout, SHOT_CAPTIONS), 0, 3, 2, text_rows=rows)
    with pytest.raises(ValueError, match="labels 1 chunks"):
        rmap.record("a", _increasing_routing(stream.layout, SHOT_CAPTIONS), 0, 2, 2, text_rows=labels[:1])
