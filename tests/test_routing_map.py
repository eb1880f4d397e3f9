"""Routing maps (`moc_routing_map`): numbers checked by hand, recording through models and pipelines, files, compile."""

from __future__ import annotations

import json

import pytest
import torch
from _tiny_models import MODELS
from test_processor_core import HostReads

from diffusers_moc import ChunkLayout, MoCConfig, apply_moc, moc_context, moc_routing_map, route
from diffusers_moc.core.recording import RoutingMap, active_routing_map

SPARSE = MoCConfig(top_k=1, local_window=0, backend="reference")


def _increasing_routing(layout: ChunkLayout, config: MoCConfig, heads: int = 2) -> torch.Tensor:
    """Routing where every query scores later chunks higher: keys of chunk c are all c, queries all ones, so each
    query routes to its latest candidates."""
    chunk = layout.token_chunks().float()
    k = chunk.view(1, -1, 1, 1).expand(1, layout.num_tokens, heads, 4).contiguous()
    q = torch.ones_like(k)
    return route(q, k, layout, config)


def test_numbers_by_hand_one_chunk_per_frame():
    """2 shots of 2 frames of 4 tokens, local window 1, top_k 1, causal: anchors are the frame and its same-shot
    neighbour; frames 2 and 3 route to frame 1 (the latest candidate), frames 0 and 1 have no candidates."""
    layout = ChunkLayout.for_video(4, 4, shot_frames=[2, 2])
    config = MoCConfig(top_k=1, local_window=1)
    rmap = RoutingMap()
    for _ in range(3):  # counts are averaged over calls
        rmap.record("blocks.0.attn1", _increasing_routing(layout, config), 0, 4, 4)
    layer = rmap.to_dict()["layers"]["blocks.0.attn1"]
    assert layer["calls"] == 3
    assert layer["anchor"] == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]
    assert layer["routed"] == [[0, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0]]
    # Every query attends 2 frames of anchors (8 tokens); frames 2 and 3 also one routed frame: 160 of 256 pairs.
    assert layer["density"] == pytest.approx((8 * 8 + 8 * 12) / 256)
    assert layer["density"] == pytest.approx(_increasing_routing(layout, config).density())
    assert rmap.shot_starts() == [0, 2] and rmap.to_dict()["frame_shots"] == [0, 0, 1, 1]


def test_numbers_by_hand_half_frame_chunks_after_a_caption():
    """A caption chunk first (joint attention), then 3 frames of 4 tokens in chunks of 2: a query routes to the chunk
    before its own, which is in the previous frame for a frame's first half and in its own frame for its second."""
    video = ChunkLayout.for_video(3, 4, chunk_tokens=2)
    layout = ChunkLayout.concat(ChunkLayout.for_captions([3], [-1]), video)
    config = MoCConfig(top_k=1, local_window=0)
    rmap = RoutingMap()
    rmap.record("blocks.0.attn1", _increasing_routing(layout, config), 3, 3, 4)
    layer = rmap.to_dict()["layers"]["blocks.0.attn1"]
    assert layer["anchor"] == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]  # the own chunk; the caption is no frame
    assert layer["routed"] == [[0.5, 0, 0], [0.5, 0.5, 0], [0, 0.5, 0.5]]
    # Caption queries attend the caption (3); video: own chunk (2) + caption (3) + a routed chunk (2), except the
    # first chunk, which has no candidate.
    assert layer["density"] == pytest.approx((3 * 3 + 2 * 5 + 10 * 7) / 15**2)


def test_recording_a_model_changes_nothing_and_names_layers():
    model, inputs = MODELS["wan"]()
    apply_moc(model, SPARSE)
    with torch.no_grad():
        expected = model(**inputs).sample
        with moc_routing_map() as rmap, moc_context(shot_frames=[1, 3]):
            model(**inputs)
        with moc_routing_map() as plain:
            got = model(**inputs).sample
    assert torch.equal(got, expected)
    assert plain.layer_names == ["blocks.0.attn1"] and rmap.shot_starts() == [0, 1]
    layer = plain.to_dict()["layers"]["blocks.0.attn1"]
    # One shot, top_k 1, no local window: the own frame as anchor, one earlier frame routed (none for frame 0).
    assert layer["anchor"] == torch.eye(4).tolist()
    assert [sum(row) for row in layer["routed"]] == [0, 1, 1, 1]
    assert active_routing_map() is None


def test_recording_is_off_outside_the_block_and_costs_no_host_reads():
    model, inputs = MODELS["wan"]()
    apply_moc(model, SPARSE)
    with torch.no_grad(), HostReads() as off:
        model(**inputs)
    with torch.no_grad(), moc_routing_map(), HostReads() as on:
        model(**inputs)
    assert off.reads == {}  # recording off: nothing read back outside the attention op
    assert sum(on.reads.values()) > 0  # the counter sees what recording reads


def test_a_pipeline_records_both_experts_and_chosen_layers(tmp_path):
    from diffusers import WanPipeline

    from diffusers_moc.tiny import tiny_wan_components

    pipe = WanPipeline(**tiny_wan_components(model="wan2.2-t2v-a14b"))
    pipe.set_progress_bar_config(disable=True)
    apply_moc(pipe, SPARSE)
    call = dict(prompt="a cat", height=32, width=32, num_frames=9, num_inference_steps=2, max_sequence_length=8)
    with moc_routing_map() as everything:
        pipe(**call, output_type="latent")
    names = ["blocks.0.attn1", "blocks.1.attn1", "transformer_2/blocks.0.attn1", "transformer_2/blocks.1.attn1"]
    assert everything.layer_names == names
    # One step per expert, with and without the prompt (guidance): 2 calls of each layer.
    assert {v["calls"] for v in everything.to_dict()["layers"].values()} == {2}
    with moc_routing_map(layers=[0, "transformer_2/*.1.*"]) as chosen:
        pipe(**call, output_type="latent")
    assert chosen.layer_names == ["blocks.0.attn1", "transformer_2/blocks.1.attn1"]
    assert chosen.to_dict()["layers"]["blocks.0.attn1"] == everything.to_dict()["layers"]["blocks.0.attn1"]

    picture, numbers = chosen.save(tmp_path / "map.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.json", "map.png"]
    assert open(picture, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert json.load(open(numbers)) == json.loads(json.dumps(chosen.to_dict()))
    axes = chosen.figure().axes
    assert "density" in axes[2].get_title() and axes[2].get_title().startswith("blocks.0.attn1: anchor")


def test_errors():
    with pytest.raises(ValueError, match="recorded no MoC attention call"):
        RoutingMap().to_dict()
    with pytest.raises(TypeError, match="layer positions"):
        RoutingMap(layers=[1.5])
    layout = ChunkLayout.for_video(2, 4)
    rmap = RoutingMap()
    rmap.record("blocks.0.attn1", _increasing_routing(layout, SPARSE), 0, 2, 4)
    with pytest.raises(ValueError, match="one moc_routing_map per video"):
        other = ChunkLayout.for_video(4, 2)
        rmap.record("blocks.0.attn1", _increasing_routing(other, SPARSE), 0, 4, 2)
    with pytest.raises(ValueError, match="must end in one of"):
        rmap.save("map.gif")


def test_a_fullgraph_compiled_model_refuses_to_record_and_keeps_working():
    model, inputs = MODELS["wan"]()
    apply_moc(model, SPARSE)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        expected = model(**inputs).sample
        torch.testing.assert_close(compiled(**inputs).sample, expected)
        with pytest.raises(RuntimeError, match="cannot record a torch.compile'd model"):
            with moc_routing_map():
                compiled(**inputs)
        torch.testing.assert_close(compiled(**inputs).sample, expected)  # recording off again: runs as before


def test_save_removes_what_a_killed_save_left(tmp_path):
    layout = ChunkLayout.for_video(2, 4)
    rmap = RoutingMap()
    rmap.record("blocks.0.attn1", _increasing_routing(layout, SPARSE), 0, 2, 4)
    (tmp_path / ".map.png.999999999-deadbeef.partial").write_bytes(b"left by a killed run")
    rmap.save(tmp_path / "map.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.json", "map.png"]
