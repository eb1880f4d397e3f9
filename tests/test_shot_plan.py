"""The shot plan `LongVideoPipeline` and `diffusers-moc train` both build: shots in pixel and latent frames, the
caption layout, and the `moc_context` arguments of the conditional and unconditional forwards."""

import pytest

from diffusers_moc.captions import CaptionLayout
from diffusers_moc.core.context import MoCContext
from diffusers_moc.shot_plan import ShotPlan, plan_shots


def test_separate_shots_are_each_their_own_vae_clip():
    plan = plan_shots([9, 5, 13], "a city", ["a man", "a dog", "a man"], 8)
    assert plan.pixel_frames == (9, 5, 13) and plan.latent_frames == (3, 2, 4)
    assert plan.shot_starts == [0, 9, 14] and plan.latent_starts == [0, 3, 5]
    assert plan.captions.segments == ("a city", "a man", "a dog")
    assert plan.shot_context == {"shot_frames": (3, 2, 4)}
    assert plan.caption_context == {
        "shot_frames": (3, 2, 4),
        "caption_spans": ((8, 16), (16, 24), (8, 16)),
        "global_caption_span": (0, 8),
    }
    MoCContext(**plan.caption_context)  # what moc_context accepts


def test_shots_cut_from_one_clip_split_its_latent_frames():
    # A training sample of 17 pixel frames, shots starting at pixel 0 and 8: latent frame 2 (pixels 5-8) is shot 0's.
    plan = plan_shots([8, 9], None, ["a", "b"], 4, one_clip=True)
    assert plan.latent_frames == (3, 2) and sum(plan.latent_frames) == (17 - 1) // 4 + 1
    with pytest.raises(ValueError, match="num_frames must be 4n \\+ 1"):
        plan_shots([8, 8], None, ["a", "b"], 4, one_clip=True)


def test_one_shot_is_the_whole_video_unless_captions_name_it():
    alone = plan_shots([17], None, ["a dog"], 4, one_clip=True)
    assert alone.shot_context == alone.caption_context == {"shot_frames": None}
    # Caption spans belong to shots, so a global and a shot caption name the single shot.
    named = plan_shots([17], "a park", ["a dog"], 4, one_clip=True)
    assert named.shot_context == {"shot_frames": None}
    assert named.caption_context == {"shot_frames": (5,), "caption_spans": ((4, 8),), "global_caption_span": (0, 4)}


def test_a_dropped_caption_keeps_the_shots():
    plan = plan_shots([9, 9], "g", ["a", "b"], 4)
    dropped = plan.with_captions(CaptionLayout(("",), 4))
    assert isinstance(dropped, ShotPlan) and dropped.latent_frames == plan.latent_frames
    assert dropped.caption_context == dropped.shot_context == {"shot_frames": (3, 3)}
    with pytest.raises(AttributeError):
        plan.latent_frames = (6,)  # frozen: built once
