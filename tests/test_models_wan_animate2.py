"""MoC on Wan-Animate-2 (`WanAnimate2Transformer3DModel`): a tiny transformer built from config, checked against its
stock self (the pattern of test_generic_models.py), and its modular pipeline run with `apply_moc` on tiny components.

Each model input here is a generation pass (`kv_cache_mode="cached"`) whose key/value cache the stock reference pass
filled while the model was built."""

from __future__ import annotations

import copy
import pickle
from types import SimpleNamespace

import _model_contract as contract
import PIL.Image
import pytest
import torch
from _model_contract import DENSE, SPARSE, run
from diffusers import WanAnimate2Transformer3DModel
from diffusers.models.transformers.transformer_wan_animate_2 import WanAnimate2KVCache

from diffusers_moc import MoCConfig, apply_moc, moc_context, moc_routing_map

# (generation latent frames, latent height, width; reference latent frames, height, width; pixel `origin_len` and
# `origin_area` of the block mask). "segment" fills the mask as the pipeline's segments do: a reference frame slot,
# then one generation frame per reference frame, all of the mask's frame size. "short" leaves slots of the mask
# empty (zero keys that the stock mask attends): one generation frame, one reference frame and two rows of the
# frames too few, the reference frame narrower still.
GEOMETRIES = {
    "segment": ((3, 8, 8), (2, 8, 8), 5, [64, 64]),
    "short": ((2, 8, 8), (1, 8, 6), 5, [80, 64]),
}
LAYERS = 2


def _model(**config) -> WanAnimate2Transformer3DModel:
    torch.manual_seed(0)
    defaults = {"in_dim": 12, "out_dim": 4, "text_dim": 16, "use_img_emb": False}  # 12: 2 * 4 latent + 4 mask channels
    return WanAnimate2Transformer3DModel(
        patch_size=(1, 2, 2), text_len=8, dim=24, ffn_dim=32, freq_dim=16, num_heads=2, num_layers=LAYERS,
        **{**defaults, **config},
    ).eval()  # fmt: skip


def _reference_pass(model, generator: torch.Generator, frames: int, height: int, width: int, batch: int = 1) -> dict:
    """The inputs of a reference pass (`kv_cache_mode="extract"`) over `batch` driving clips, with an empty cache."""

    def draw(*shape: int) -> list[torch.Tensor]:
        return [torch.randn(*shape, generator=generator) for _ in range(batch)]

    return {
        "hidden_states": draw(4, frames, height, width),
        "timestep": torch.tensor([500] * batch),
        "encoder_hidden_states": draw(5, 16),
        "condition_latents": draw(8, frames, height, width),
        "kv_cache": WanAnimate2KVCache(LAYERS),
        "kv_cache_mode": "extract",
        "seq_len": frames * height * width // 4,
        "offset_grid_sizes": torch.tensor([[frames, height // 2, width // 2]] * batch),
    }


def _wan_animate2(geometry: str = "segment", batch: int = 1):
    """A tiny model and the inputs of a generation pass of `batch` videos, the cache filled by the stock reference
    pass."""
    (frames, height, width), (ref_frames, ref_height, ref_width), origin_len, origin_area = GEOMETRIES[geometry]
    model = _model()
    g = torch.Generator().manual_seed(1)
    reference = _reference_pass(model, g, ref_frames, ref_height, ref_width, batch)
    with torch.no_grad():
        model(**reference)
    inputs = {
        "hidden_states": [torch.randn(4, frames, height, width, generator=g) for _ in range(batch)],
        "timestep": torch.tensor([700] * batch),
        "encoder_hidden_states": [torch.randn(6, 16, generator=g) for _ in range(batch)],
        "condition_latents": [torch.randn(8, frames, height, width, generator=g) for _ in range(batch)],
        "kv_cache": reference["kv_cache"],
        "kv_cache_mode": "cached",
        "seq_len": frames * height * width // 4,
        "reference_grid_sizes": reference["offset_grid_sizes"],
        "origin_len": origin_len,
        "origin_area": origin_area,
    }
    return model, inputs


BUILDERS = {name: (lambda name=name: _wan_animate2(name)) for name in GEOMETRIES}
TARGETS = {f"blocks.{i}.self_attn" for i in range(LAYERS)}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_full_density_equals_stock_bit_for_bit(name):
    contract.full_density_equals_stock(BUILDERS[name])


@pytest.mark.parametrize("name", list(BUILDERS))
def test_sparse_moc_changes_the_output_and_backends_agree(name):
    contract.sparse_changes_output_and_backends_agree(BUILDERS[name])


def test_apply_takes_the_self_attention_and_remove_restores_stock():
    contract.apply_and_remove(BUILDERS["segment"], TARGETS)


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("chunk_tokens", [None, 8, 6], ids=["frames", "half_frames", "uneven"])
def test_routed_full_density_attends_what_the_stock_block_mask_attends(name, backend, chunk_tokens):
    """Recording a routing map makes MoC route even when nothing is left out: over every generation chunk (frames,
    or pieces of one, each anchoring its frame's reference frame), the aligned reference frame and the mask's zero
    slots, it computes the stock block-masked attention (to rounding)."""
    model, inputs = BUILDERS[name]()
    stock = run(model, inputs)
    apply_moc(model, DENSE.replace(backend=backend, chunk_tokens=chunk_tokens))
    with moc_routing_map() as routing_map:
        routed = run(model, inputs)
    torch.testing.assert_close(routed, stock, atol=1e-5, rtol=1e-5)
    frames = GEOMETRIES[name][0][0]
    assert routing_map.to_dict()["frames"] == frames


def _frame_outputs(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).sample[0].transpose(0, 1)  # (frames, C, H, W)


@pytest.mark.parametrize("config", [None, SPARSE], ids=["stock", "sparse"])
def test_each_generation_frame_sees_only_its_aligned_reference_frame(config):
    """A change to the last layer's cached values of reference frame 0 reaches generation frame 1 only: frame 0 (the
    reference image's slot) sees no reference frame, frame 2 sees reference frame 1. Routing reads keys, not values,
    so the other frames are computed exactly as before."""
    model, inputs = _wan_animate2("segment")
    if config is not None:
        apply_moc(model, config)
    before = _frame_outputs(model, inputs)
    cache = inputs["kv_cache"].get(LAYERS - 1)
    key, value = cache.get()
    changed = value.clone()
    changed[:, :16] += 1.0  # reference frame 0: 4x4 tokens
    cache.store(key, changed)
    after = _frame_outputs(model, inputs)
    assert torch.equal(after[0], before[0]) and torch.equal(after[2], before[2])
    assert not torch.allclose(after[1], before[1], atol=1e-4)


def test_reference_pass_stays_stock():
    model = _model()
    reference = _reference_pass(model, torch.Generator().manual_seed(1), 2, 8, 8)
    stock_cache, moc_cache = WanAnimate2KVCache(LAYERS), WanAnimate2KVCache(LAYERS)
    stock = run(model, {**reference, "kv_cache": stock_cache})
    apply_moc(model, SPARSE)
    # Shots describe the generated video (3 latent frames here), not the driving clip of the reference pass.
    with moc_context(shot_frames=[1, 2]):
        assert torch.equal(run(model, {**reference, "kv_cache": moc_cache}), stock)
    for i in range(LAYERS):
        assert all(torch.equal(a, b) for a, b in zip(moc_cache.get(i).get(), stock_cache.get(i).get()))


def test_shots_cut_the_generated_video():
    model, inputs = _wan_animate2("segment")
    # Each frame attends its neighbours of the same shot: frame 1 loses frame 0 once the shots part them.
    apply_moc(model, SPARSE.replace(top_k=0, local_window=1))
    with moc_context(shot_frames=[1, 2]):
        out = run(model, inputs)
    facts = model.blocks[0].self_attn.processor.hook.last_facts
    assert facts.grid == (3, 4, 4) and facts.reference == (2, 4, 4)
    assert facts.layout.sizes == (16, 16, 16) and facts.layout.shots == (0, 1, 1)
    assert not torch.equal(out, run(model, inputs))


def test_chunks_within_a_frame_run_and_chunks_across_frames_are_refused():
    model, inputs = _wan_animate2("segment")
    apply_moc(model, SPARSE.replace(chunk_tokens=8))  # two chunks per latent frame
    run(model, inputs)
    apply_moc(model, SPARSE.replace(chunk_tokens=32))  # two latent frames per chunk
    with pytest.raises(NotImplementedError, match="spans latent frames 0 to 1"):
        run(model, inputs)


@pytest.mark.parametrize("config", [DENSE, SPARSE], ids=["dense", "sparse"])
def test_a_call_beyond_the_block_mask_is_refused(config):
    model, inputs = _wan_animate2("segment")
    apply_moc(model, config)
    inputs["origin_len"] = 1  # a mask of one reference frame: two generation frames
    with pytest.raises(ValueError, match="holds 2 generation latent frames, but this call has 3"):
        run(model, inputs)


def test_sparse_gradients_agree_across_backends():
    grads = {}
    for backend in ("torch", "reference"):
        model, inputs = _wan_animate2("segment")
        apply_moc(model, SPARSE.replace(backend=backend))
        model(**inputs).sample[0].square().mean().backward()
        grads[backend] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert grads["torch"].abs().sum() > 0
    torch.testing.assert_close(grads["torch"], grads["reference"], atol=1e-5, rtol=1e-4)


def test_training_with_drop_off_and_drop_in_gives_finite_gradients():
    """In training mode the regularisers draw (the output differs from eval's routing); gradients stay finite."""
    model, inputs = _wan_animate2("segment")
    apply_moc(model, SPARSE.replace(top_k=2, drop_off=0.9, drop_in=2.0))
    with torch.no_grad():
        evaluated = model(**inputs).sample[0]
    model.train()
    out = model(**inputs).sample[0]
    assert out.shape == evaluated.shape and not torch.allclose(out.detach(), evaluated, atol=1e-4)
    out.square().mean().backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert grads.abs().sum() > 0 and torch.isfinite(grads).all()


def test_a_batch_routes_each_video_as_alone():
    """Two videos in one generation pass (as classifier-free guidance batches them) give each video's output alone."""
    model, inputs = _wan_animate2("segment", batch=2)
    apply_moc(model, SPARSE)
    with torch.no_grad():
        both = model(**inputs).sample
    for i in range(2):
        cache = WanAnimate2KVCache(LAYERS)
        for layer in range(LAYERS):
            key, value = inputs["kv_cache"].get(layer).get()
            cache.get(layer).store(key[i : i + 1], value[i : i + 1])
        lists = {k: [inputs[k][i]] for k in ("hidden_states", "encoder_hidden_states", "condition_latents")}
        one = {**inputs, **lists, "timestep": inputs["timestep"][i : i + 1], "kv_cache": cache}
        one["reference_grid_sizes"] = inputs["reference_grid_sizes"][i : i + 1]
        with torch.no_grad():
            alone = model(**one).sample[0]
        torch.testing.assert_close(alone, both[i], atol=1e-5, rtol=1e-5)


def test_per_shot_captions_and_mixed_reference_grids_are_refused():
    model, inputs = _wan_animate2("segment", batch=2)
    apply_moc(model, SPARSE)
    with moc_context(caption_shots=(0,), caption_tokens=((4,), (0,))), pytest.raises(ValueError, match="caption_shots"):
        run(model, inputs)
    inputs["reference_grid_sizes"] = torch.tensor([[2, 4, 4], [1, 4, 4]])
    with pytest.raises(ValueError, match=r"reference grids \[\(1, 4, 4\), \(2, 4, 4\)\]"):
        run(model, inputs)


def test_fused_projections_keep_moc():
    model, inputs = _wan_animate2("segment")
    apply_moc(model, SPARSE)
    sparse = run(model, inputs)
    model.fuse_qkv_projections()
    assert model.blocks[0].self_attn.fused_projections
    torch.testing.assert_close(run(model, inputs), sparse, atol=1e-5, rtol=1e-5)


def test_copies_run_their_own_weights():
    model, inputs = _wan_animate2("segment")
    apply_moc(model, SPARSE)
    # Before a generation pass: diffusers keeps the flex block masks it builds on the model, and those hold local
    # functions, which pickle cannot store (with or without MoC).
    restored = pickle.loads(pickle.dumps(model))
    sparse = run(model, inputs)
    for clone in (copy.deepcopy(model), restored):
        assert torch.equal(run(clone, inputs), sparse)
        with torch.no_grad():
            clone.blocks[0].self_attn.to_q.weight.mul_(2)
        assert not torch.equal(run(clone, inputs), sparse)
    assert torch.equal(run(model, inputs), sparse)


def test_regional_compile_equals_eager_in_one_graph():
    contract.regional_compile_equals_eager(BUILDERS["segment"], backend="aot_eager")


def test_context_parallelism_is_refused_by_name():
    """diffusers has no `_cp_plan` for Wan-Animate-2; under a plan of the user's own, MoC refuses."""
    model, inputs = _wan_animate2("segment")
    assert getattr(WanAnimate2Transformer3DModel, "_cp_plan", None) is None
    apply_moc(model, SPARSE)
    cp = SimpleNamespace(ring_degree=1, ulysses_degree=2, ulysses_anything=False)
    model.blocks[0].self_attn.processor._parallel_config = SimpleNamespace(context_parallel_config=cp)
    with pytest.raises(NotImplementedError, match="WanAnimate2Transformer3DModel has no context-parallel plan"):
        run(model, inputs)


# ---------------------------------------------------------------------------------------------- pipeline
def _pipeline():
    """`WanAnimate2Blocks` (text, image and video encoders, segment loop, decode) of tiny components: the UMT5 encoder,
    word-level tokenizer and Wan VAE of `diffusers_moc.tiny`, a CLIP vision encoder of the 1280 features the
    transformer's image projection takes, classifier-free guidance (the default guider)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.modular_pipelines import WanAnimate2Blocks
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from diffusers_moc.tiny import TINY_TEXT_DIM, tiny_wan_components

    wan = tiny_wan_components()
    transformer = _model(in_dim=36, out_dim=16, text_dim=TINY_TEXT_DIM, use_img_emb=True)
    torch.manual_seed(0)
    # 224 pixels (the pipeline resizes to them) in 56-pixel patches: 17 image tokens.
    clip = CLIPVisionConfig(
        hidden_size=1280, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, patch_size=56
    )
    pipe = WanAnimate2Blocks().init_pipeline()
    pipe.update_components(
        transformer=transformer,
        image_encoder=CLIPVisionModel(clip).eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
        **{name: wan[name] for name in ("vae", "text_encoder", "tokenizer")},
    )
    return pipe, transformer


def test_modular_pipeline_runs_with_moc():
    """Two segments of 5 frames (9 driving frames, one carried over): 32x32 pixels are 2x2 tokens per latent frame,
    each segment 3 generation latent frames (the reference image's slot first) over 2 reference frames."""
    pipe, transformer = _pipeline()
    frames = [PIL.Image.new("RGB", (32, 32), (25 * i, 90, 160)) for i in range(9)]
    call = {
        "prompt": "a dancer",
        "image": PIL.Image.new("RGB", (32, 32), (200, 30, 60)),
        "driving_video": frames,
        "height": 32,
        "width": 32,
        "segment_frame_length": 5,
        "num_inference_steps": 2,
        "max_sequence_length": 8,
        "output_type": "pt",
    }

    def generate(config: MoCConfig | None) -> torch.Tensor:
        if config is not None:
            apply_moc(pipe, config)
        return pipe(**call, generator=torch.Generator().manual_seed(0), output="videos")

    stock = generate(None)
    assert stock.shape[1] == 9
    assert torch.equal(generate(DENSE), stock)
    assert not torch.allclose(generate(SPARSE), stock, atol=1e-3)
    facts = transformer.blocks[0].self_attn.processor.hook.last_facts  # the last forward: a generation pass
    assert facts.grid == (3, 2, 2) and facts.reference == (2, 2, 2)
