import pytest
import torch

from diffusers_moc import ChunkLayout


def test_from_chunks_derives_offsets_and_token_map():
    layout = ChunkLayout.from_chunks([2, 3, 1], [-1, 0, 0], [True, False, False], num_tokens=6)
    assert layout.num_chunks == 3 and layout.num_tokens == 6
    assert layout.offsets == (0, 2, 5, 6)
    assert layout.token_chunks().tolist() == [0, 0, 1, 1, 1, 2]
    assert layout.chunk_sizes().tolist() == [2, 3, 1]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sizes=[2, 2], num_tokens=5), "sum to 4 tokens but the sequence has 5"),
        (dict(sizes=[2, 0, 1]), "chunk 1 is empty"),
        (dict(sizes=[2, -1]), "chunk 1 is empty or negative"),
        (dict(sizes=[2, 2], shots=[0]), "one entry per chunk"),
        (dict(sizes=[2, 2], shots=[0, 0], text=[False]), "one entry per chunk"),
        (dict(sizes=[2, 2], shots=[0, -1], text=[False, False]), "video chunk 1 has negative shot id -1"),
        (dict(sizes=[2, 2], shots=[1, 0]), "shots must follow shot order"),
        (dict(sizes=[2, 2], shots=[0, -2], text=[False, True]), "text chunk 1 has shot id -2"),
        (dict(sizes=[]), "at least one chunk"),
        (dict(sizes=[2, 1.5]), r"sizes\[1\] must be an integer"),
    ],
)
def test_from_chunks_rejects_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ChunkLayout.from_chunks(**kwargs)


def test_for_video_one_chunk_per_frame_and_shots():
    layout = ChunkLayout.for_video(5, 4, shot_frames=[2, 3])
    assert layout.sizes == (4,) * 5
    assert layout.shots == (0, 0, 1, 1, 1)
    assert not any(layout.is_text)


def test_for_video_chunk_tokens_runs_of_frames_never_cross_shots():
    layout = ChunkLayout.for_video(5, 4, shot_frames=[3, 2], chunk_tokens=8)
    assert layout.sizes == (8, 4, 8)
    assert layout.shots == (0, 0, 1)


def test_for_video_chunk_tokens_split_frames():
    layout = ChunkLayout.for_video(2, 10, chunk_tokens=4)
    assert layout.sizes == (4, 3, 3, 4, 3, 3)
    assert layout.num_tokens == 20


@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        ((4, 3), dict(shot_frames=[2, 1]), "sum to 3, but there are 4 frames"),
        ((4, 3), dict(shot_frames=[4, 0]), "at least one latent frame"),
        ((0, 3), {}, "must be positive"),
        ((2, 3), dict(chunk_tokens=0), "chunk_tokens"),
    ],
)
def test_for_video_rejects_bad_input(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ChunkLayout.for_video(*args, **kwargs)


def test_captions_and_video_in_one_sequence():
    layout = ChunkLayout.for_video_with_captions(
        3, 2, caption_tokens=[4, 2, 3], caption_shots=[-1, 0, 1], shot_frames=[1, 2], captions_first=False
    )
    assert layout.sizes == (2, 2, 2, 4, 2, 3)
    assert layout.shots == (0, 1, 1, -1, 0, 1)
    assert layout.is_text == (False, False, False, True, True, True)
    with pytest.raises(ValueError, match="at least one layout"):
        ChunkLayout.concat()


def test_anchor_mask_local_window_skips_text_and_other_shots():
    # video chunks 0..3 of shot 0 with a shot-0 caption in between, then shot 1.
    layout = ChunkLayout.from_chunks(
        [1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1], [False, False, True, False, False, False, False]
    )
    mask = layout.anchor_mask(local_window=1, anchor_own_shot=False, text_anchors="shot")
    # chunk 3 (video): neighbours are chunks 1 and 4 (the caption at 2 is skipped), plus its caption at 2.
    assert torch.nonzero(mask[3]).flatten().tolist() == [1, 2, 3, 4]
    # chunk 4: its next video neighbour would be chunk 5, which is another shot.
    assert torch.nonzero(mask[4]).flatten().tolist() == [2, 3, 4]
    # chunk 5 (shot 1) does not see shot 0's caption under text_anchors="shot".
    assert torch.nonzero(mask[5]).flatten().tolist() == [5, 6]
    all_text = layout.anchor_mask(local_window=0, anchor_own_shot=False, text_anchors="all")
    assert torch.nonzero(all_text[5]).flatten().tolist() == [2, 5]


def test_candidates_exclude_anchors_and_respect_causality():
    layout = ChunkLayout.for_video(4, 2)
    cand = layout.candidate_mask(local_window=1, anchor_own_shot=False, text_anchors="all", causal=True)
    assert torch.nonzero(cand[3]).flatten().tolist() == [0, 1]
    cand = layout.candidate_mask(local_window=1, anchor_own_shot=False, text_anchors="all", causal=False)
    assert torch.nonzero(cand[0]).flatten().tolist() == [2, 3]


def test_token_blocks_never_cross_chunks():
    layout = ChunkLayout.from_chunks([5, 3])
    token_block, block_chunk = layout.token_blocks(2)
    assert token_block.tolist() == [0, 0, 1, 1, 2, 3, 3, 4]
    assert block_chunk.tolist() == [0, 0, 0, 1, 1]
