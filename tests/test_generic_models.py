"""Models MoC supports through the generic processor (`MoCDispatchAttnProcessor`, one registry entry each): tiny
transformers built from config, checked against their stock selves."""

from __future__ import annotations

import copy
import pickle

import _model_contract as contract
import pytest
import torch
from _model_contract import SPARSE, run
from diffusers import HeliosTransformer3DModel, WanAnimateTransformer3DModel
from diffusers.models.attention_dispatch import dispatch_attention_fn

from diffusers_moc import apply_moc
from diffusers_moc.core.attention_processors import dispatch_calls
from diffusers_moc.core.streams import helios_history


def _helios(history: bool = True):
    torch.manual_seed(0)
    model = HeliosTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=16,
        ffn_dim=32,
        num_layers=2,
        rope_dim=(4, 4, 4),
    ).eval()
    g = torch.Generator().manual_seed(1)
    inputs = {
        "hidden_states": torch.randn(1, 4, 3, 8, 8, generator=g),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 5, 16, generator=g),
        "indices_hidden_states": torch.tensor([[9, 10, 11]]),
    }
    if history:
        # Odd sizes on purpose: mid and long history are padded to whole coarse patches.
        inputs.update(
            indices_latents_history_short=torch.tensor([[7, 8]]),
            latents_history_short=torch.randn(1, 4, 2, 8, 8, generator=g),
            indices_latents_history_mid=torch.tensor([[4, 5, 6]]),
            latents_history_mid=torch.randn(1, 4, 3, 8, 8, generator=g),
            indices_latents_history_long=torch.tensor([[1, 2, 3]]),
            latents_history_long=torch.randn(1, 4, 3, 8, 8, generator=g),
        )
    return model, inputs


def _wan_animate():
    torch.manual_seed(0)
    model = WanAnimateTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=12,  # 2 * 4 latent channels + 4
        latent_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=32,
        ffn_dim=32,
        num_layers=2,
        image_dim=16,
        rope_max_seq_len=32,
        motion_encoder_channel_sizes={"4": 16, "8": 16, "16": 16},
        motion_encoder_size=16,
        motion_style_dim=8,
        motion_dim=4,
        motion_encoder_dim=16,
        face_encoder_hidden_dim=16,
        face_encoder_num_heads=2,
        inject_face_latents_blocks=2,
    ).eval()
    g = torch.Generator().manual_seed(1)
    frames = 3  # the reference frame, then 3 generated latent frames
    inputs = {
        "hidden_states": torch.randn(1, 12, frames + 1, 8, 8, generator=g),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 6, 16, generator=g),
        "encoder_hidden_states_image": torch.randn(1, 4, 16, generator=g),
        "pose_hidden_states": torch.randn(1, 4, frames, 8, 8, generator=g),
        "face_pixel_values": torch.randn(1, 3, 4 * frames - 3, 16, 16, generator=g),
    }
    return model, inputs


BUILDERS = {
    "wan_animate": _wan_animate,
    "helios": _helios,
    "helios_no_history": lambda: _helios(history=False),
}
# The attention modules MoC must take over in each tiny model (everything else keeps its stock processor).
TARGETS = {
    "wan_animate": {"blocks.0.attn1", "blocks.1.attn1"},
    "helios": {"blocks.0.attn1", "blocks.1.attn1"},
    "helios_no_history": {"blocks.0.attn1", "blocks.1.attn1"},
}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_full_density_equals_stock_bit_for_bit(name):
    contract.full_density_equals_stock(BUILDERS[name])


@pytest.mark.parametrize("name", list(BUILDERS))
def test_sparse_moc_changes_the_output_and_backends_agree(name):
    contract.sparse_changes_output_and_backends_agree(BUILDERS[name])


@pytest.mark.parametrize("name", list(BUILDERS))
def test_apply_takes_the_video_self_attention_and_remove_restores_stock(name):
    contract.apply_and_remove(BUILDERS[name], TARGETS[name])


@pytest.mark.parametrize("name", ["helios"])
def test_copies_run_their_own_weights(name):
    model, inputs = BUILDERS[name]()
    apply_moc(model, SPARSE)
    sparse = run(model, inputs)
    twin, restored = copy.deepcopy(model), pickle.loads(pickle.dumps(model))
    for clone in (twin, restored):
        assert torch.equal(run(clone, inputs), sparse)
        with torch.no_grad():
            clone.blocks[0].attn1.to_q.weight.mul_(2)
        assert not torch.equal(run(clone, inputs), sparse)
    assert torch.equal(run(model, inputs), sparse)


def test_helios_history_chunks_follow_the_coarse_patches():
    model, inputs = _helios()
    # long: 3x8x8 padded to 4x8x8, patch 4x8x8 -> 1 frame of 1x1; mid: 3x8x8 padded to 4x8x8, patch 2x4x4 -> 2
    # frames of 2x2; short: patch 1x2x2 -> 2 frames of 4x4. Oldest first, as the model concatenates them.
    assert helios_history(model, (), inputs) == (1, 4, 4, 16, 16)
    apply_moc(model, SPARSE)
    run(model, inputs)
    facts = model.blocks[0].attn1.processor.hook.last_facts
    assert facts.prefix_tokens == 41 and facts.layout.sizes == (1, 4, 4, 16, 16, 16, 16, 16)


class _TwoCalls:
    """A processor with a second attention call on the same layer (as an image branch would be)."""

    _attention_backend = None

    def __call__(self, attn, x, *args, **kwargs):
        q = attn.to_q(x).unflatten(2, (attn.heads, -1))
        first = dispatch_attention_fn(q, q, q, backend=self._attention_backend)
        return first + dispatch_attention_fn(q, q, q, backend=self._attention_backend)


def test_a_stock_processor_with_two_attention_calls_is_refused():
    assert dispatch_calls(_TwoCalls) == 2
    model, inputs = _helios()
    apply_moc(model, SPARSE)
    processor = model.blocks[0].attn1.processor
    processor.use_stock(_TwoCalls())
    with pytest.raises(TypeError, match="more than one `dispatch_attention_fn` call"):
        run(model, inputs)


def test_masked_attention_is_refused_by_name():
    model, inputs = _helios(history=False)
    apply_moc(model, SPARSE)
    processor = model.blocks[0].attn1.processor
    query = torch.randn(1, 48, 2, 12)
    processor._layer = model.blocks[0].attn1
    with pytest.raises(NotImplementedError, match="attn_mask"):
        processor.attend(query, query, query, torch.ones(1, 1, 48, 48, dtype=torch.bool), 0.0, False, None, None, None)


def test_regional_compile_equals_eager_in_one_graph():
    # Inductor on one model of the generic processor; the others capture with aot_eager (see _model_contract).
    contract.regional_compile_equals_eager(BUILDERS["helios"])
    contract.regional_compile_equals_eager(BUILDERS["wan_animate"], backend="aot_eager")
