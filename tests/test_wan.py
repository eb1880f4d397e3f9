"""MoC inside diffusers' Wan-family transformers and WanPipeline."""

import pytest
import torch
from diffusers import SkyReelsV2Transformer3DModel, WanPipeline, WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanAttnProcessor, WanRotaryPosEmbed

from diffusers_moc import (
    MoCConfig,
    MoCWanAttnProcessor,
    apply_moc,
    get_moc_config,
    moc_context,
    remove_moc,
    supported_models,
    update_moc_config,
)
from diffusers_moc.core.attention_processors import video_grid_from_rotary
from diffusers_moc.tiny import tiny_wan_components

DENSE = MoCConfig(top_k=1000, causal=False)
SPARSE = MoCConfig(top_k=1, local_window=0)


def tiny_transformer(**overrides):
    kwargs = dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=32,
        ffn_dim=16,
        num_layers=2,
        rope_max_seq_len=32,
    )
    kwargs.update(overrides)
    torch.manual_seed(0)
    return WanTransformer3DModel(**kwargs).eval()


def inputs(frames=4, height=6, width=4, text_len=5, text_dim=16, channels=4):
    g = torch.Generator().manual_seed(1)
    return dict(
        hidden_states=torch.randn(1, channels, frames, height, width, generator=g),
        timestep=torch.tensor([500]),
        encoder_hidden_states=torch.randn(1, text_len, text_dim, generator=g),
    )


def run(model, **kw):
    with torch.no_grad():
        return model(**kw).sample


def test_full_density_equals_stock_transformer():
    model, x = tiny_transformer(), inputs()
    stock = run(model, **x)
    apply_moc(model, DENSE)
    torch.testing.assert_close(run(model, **x), stock, atol=1e-6, rtol=1e-6)


def test_sparse_torch_backend_equals_reference_inside_the_model():
    model, x = tiny_transformer(), inputs()
    stock = run(model, **x)
    apply_moc(model, SPARSE.replace(backend="torch"))
    fast = run(model, **x)
    apply_moc(model, SPARSE.replace(backend="reference"))
    torch.testing.assert_close(fast, run(model, **x), atol=1e-5, rtol=1e-5)
    assert (fast - stock).abs().max() > 1e-4  # sparse routing really changes the output


def test_apply_routes_self_attention_and_remove_restores_stock():
    model, x = tiny_transformer(), inputs()
    stock = run(model, **x)
    apply_moc(model, SPARSE)
    procs = model.attn_processors
    # Self-attention is routed; cross-attention gets the MoC processor too (per-shot caption anchors when the
    # context has caption spans), which runs the stock cross-attention otherwise (apply_moc installs
    # everything a model needs).
    assert all(isinstance(p, MoCWanAttnProcessor) for p in procs.values())
    attn2 = model.blocks[0].attn2
    h, e = torch.randn(1, 24, 24), torch.randn(1, 5, 24)
    torch.testing.assert_close(attn2.processor(attn2, h, e), WanAttnProcessor()(attn2, h, e), atol=0, rtol=0)
    assert get_moc_config(model) == SPARSE
    remove_moc(model)
    assert get_moc_config(model) is None
    assert all(type(p) is WanAttnProcessor for p in model.attn_processors.values())
    torch.testing.assert_close(run(model, **x), stock, atol=0, rtol=0)


def test_set_attn_processor_after_from_pretrained(tmp_path):
    tiny_transformer().save_pretrained(tmp_path / "wan")
    x = inputs()
    model = WanTransformer3DModel.from_pretrained(tmp_path / "wan")
    stock = run(model, **x)
    model.set_attn_processor(MoCWanAttnProcessor(SPARSE))  # also lands on the cross-attention layers
    via_set = run(model, **x)
    applied = apply_moc(WanTransformer3DModel.from_pretrained(tmp_path / "wan"), SPARSE)
    torch.testing.assert_close(via_set, run(applied, **x), atol=0, rtol=0)
    model.set_attn_processor(MoCWanAttnProcessor(DENSE))
    torch.testing.assert_close(run(model, **x), stock, atol=1e-6, rtol=1e-6)


def test_update_moc_config_changes_every_layer():
    model = apply_moc(tiny_transformer(), SPARSE)
    new = update_moc_config(model, top_k=3)
    assert new.top_k == 3 and get_moc_config(model).top_k == 3
    with pytest.raises(ValueError, match="top_k"):
        update_moc_config(model, top_k=-1)
    with pytest.raises(ValueError, match="MoC is not applied"):
        update_moc_config(tiny_transformer(), top_k=3)


def test_apply_moc_on_a_pipeline_treats_every_transformer():
    """Wan 2.2 A14B: `transformer_2` (the low-noise expert) gets MoC too; get/update/remove cover both."""
    from diffusers.models.transformers.transformer_wan import WanAttention

    pipe = WanPipeline(**tiny_wan_components(model="wan2.2-t2v-a14b", num_layers=1))
    assert get_moc_config(pipe) == {}
    assert apply_moc(pipe, SPARSE) is pipe
    assert get_moc_config(pipe) == {"transformer": SPARSE, "transformer_2": SPARSE}
    assert get_moc_config(pipe.transformer) == SPARSE  # a transformer still gives its config
    high, low = (t.blocks[0].attn1.processor for t in (pipe.transformer, pipe.transformer_2))
    assert isinstance(high, MoCWanAttnProcessor) and isinstance(low, MoCWanAttnProcessor) and high is not low
    assert (high.hook.label, low.hook.label) == ("transformer", "transformer_2")
    assert update_moc_config(pipe, top_k=2) == {"transformer": SPARSE.replace(top_k=2)} | {
        "transformer_2": SPARSE.replace(top_k=2)
    }
    assert remove_moc(pipe) is pipe and get_moc_config(pipe) == {}
    for t in (pipe.transformer, pipe.transformer_2):
        assert all(type(m.processor) is WanAttnProcessor for m in t.modules() if isinstance(m, WanAttention))
    with pytest.raises(ValueError, match="not applied to any transformer"):
        update_moc_config(pipe, top_k=2)
    # A component set to None is skipped (diffusers' Wan 2.2 pipelines allow either expert alone).
    pipe.transformer = None
    apply_moc(pipe, SPARSE)
    assert get_moc_config(pipe) == {"transformer_2": SPARSE}


def test_apply_moc_on_a_pipeline_checks_every_transformer_first():
    pipe = WanPipeline(**tiny_wan_components(model="wan2.2-t2v-a14b", num_layers=1))
    pipe.register_modules(transformer_2=pipe.vae)  # any model MoC does not support
    with pytest.raises(TypeError, match="does not support AutoencoderKLWan"):
        apply_moc(pipe, SPARSE)
    assert get_moc_config(pipe.transformer) is None  # nothing was changed
    with pytest.raises(TypeError, match="holds no transformer"):
        apply_moc(WanPipeline(**{**tiny_wan_components(num_layers=1), "transformer": None}), SPARSE)


@pytest.mark.parametrize("grid", [(3, 5, 4), (1, 2, 3), (4, 1, 1), (2, 1, 5), (5, 3, 1)])
def test_grid_is_read_off_the_rotary_embeddings(grid):
    f, h, w = grid
    rope = WanRotaryPosEmbed(attention_head_dim=24, patch_size=(1, 2, 2), max_seq_len=32)
    rotary = rope(torch.zeros(1, 4, f, 2 * h, 2 * w))
    assert video_grid_from_rotary(rotary) == grid


def test_shots_from_the_context_change_the_layout():
    model, x = tiny_transformer(), inputs(frames=4)
    cfg = MoCConfig(top_k=0, local_window=1)
    apply_moc(model, cfg)
    one_shot = run(model, **x)
    with moc_context(shot_frames=[4]):
        torch.testing.assert_close(run(model, **x), one_shot, atol=0, rtol=0)
    with moc_context(shot_frames=[2, 2]):
        two_shots = run(model, **x)
    assert (two_shots - one_shot).abs().max() > 1e-4  # frame 2 no longer sees frame 1 across the cut
    with moc_context(shot_frames=[2, 3]), pytest.raises(ValueError, match="transformer input has 4 latent frames"):
        run(model, **x)
    with pytest.raises(ValueError, match="positive latent-frame counts"):
        with moc_context(shot_frames=[2, 0]):
            pass


def test_training_mode_drops_and_is_seeded_and_differentiable():
    model, x = tiny_transformer(), inputs()
    cfg = MoCConfig(top_k=1, drop_off=1.0, drop_in=2.0)
    apply_moc(model, cfg)
    eval_out = run(model, **x)
    model.train()
    # Regularisers run in training mode with gradients enabled (not under torch.no_grad()).
    torch.manual_seed(5)
    a = model(**x).sample.detach()
    torch.manual_seed(5)  # drop-off / drop-in follow the global RNG
    b = model(**x).sample.detach()
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert (a - eval_out).abs().max() > 1e-5
    torch.testing.assert_close(run(model, **x), eval_out, atol=0, rtol=0)  # train mode, no_grad: deterministic
    with moc_context(regularise=True):  # ... unless asked for explicitly
        torch.manual_seed(5)
        torch.testing.assert_close(run(model, **x), a, atol=0, rtol=0)
    out = model(**x).sample
    out.square().mean().backward()
    grad = model.blocks[0].attn1.to_q.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_explicit_self_attention_mask_is_refused():
    model = apply_moc(tiny_transformer(), SPARSE)
    attn = model.blocks[0].attn1
    with pytest.raises(NotImplementedError, match="explicit attention mask"):
        attn.processor(attn, torch.randn(1, 4, 24), None, torch.ones(1, 1, 4, 4, dtype=torch.bool), None)


def test_unsupported_model_error_names_supported_ones():
    with pytest.raises(TypeError, match="supported transformers: WanTransformer3DModel"):
        apply_moc(torch.nn.Linear(2, 2))
    assert "WanTransformer3DModel" in supported_models()


def test_wan_i2v_with_image_keys_full_density_equals_stock():
    model = tiny_transformer(image_dim=8, added_kv_proj_dim=24)  # = inner dim, as in Wan I2V
    x = inputs(text_len=512)  # Wan I2V splits image and text context at 512 text tokens
    x["encoder_hidden_states_image"] = torch.randn(1, 3, 8)
    stock = run(model, **x)
    apply_moc(model, DENSE)
    torch.testing.assert_close(run(model, **x), stock, atol=1e-6, rtol=1e-6)
    apply_moc(model, SPARSE)
    assert (run(model, **x) - stock).abs().max() > 1e-4


def test_skyreels_v2_full_density_equals_stock():
    torch.manual_seed(0)
    model = SkyReelsV2Transformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=32,
        ffn_dim=16,
        num_layers=1,
        rope_max_seq_len=32,
    ).eval()
    x = inputs()
    stock = run(model, **x)
    apply_moc(model, DENSE)
    torch.testing.assert_close(run(model, **x), stock, atol=1e-6, rtol=1e-6)


def _pipe_call(pipe):
    return pipe(
        prompt="a cat walks",
        negative_prompt="",
        height=32,
        width=32,
        num_frames=9,
        num_inference_steps=2,
        guidance_scale=5.0,
        max_sequence_length=16,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).frames


def test_wan_pipeline_runs_unchanged_with_moc():
    pipe = WanPipeline(**tiny_wan_components())
    pipe.set_progress_bar_config(disable=True)
    stock = _pipe_call(pipe)
    apply_moc(pipe.transformer, DENSE)
    torch.testing.assert_close(_pipe_call(pipe), stock, atol=1e-5, rtol=1e-5)
    apply_moc(pipe.transformer, MoCConfig(top_k=0, local_window=0))
    sparse = _pipe_call(pipe)
    assert sparse.shape == stock.shape == (1, 9, 3, 32, 32)
    assert torch.isfinite(sparse).all() and (sparse - stock).abs().max() > 1e-4


def test_grid_follows_the_input_size_between_calls():
    model = apply_moc(tiny_transformer(), SPARSE)
    for frames, height in [(4, 6), (2, 4), (4, 6)]:
        x = inputs(frames=frames, height=height)
        fresh = apply_moc(tiny_transformer(), SPARSE)
        torch.testing.assert_close(run(model, **x), run(fresh, **x), atol=0, rtol=0)


def test_wan_vace_full_density_equals_stock_and_sparse_matches_reference():
    from diffusers import WanVACETransformer3DModel

    torch.manual_seed(0)
    model = WanVACETransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=32,
        ffn_dim=16,
        num_layers=2,
        rope_max_seq_len=32,
        vace_layers=[0],
        vace_in_channels=4,
    ).eval()
    x = inputs()
    x["control_hidden_states"] = torch.randn(1, 4, 4, 6, 4)
    stock = run(model, **x)
    apply_moc(model, DENSE)
    torch.testing.assert_close(run(model, **x), stock, atol=1e-6, rtol=1e-6)
    apply_moc(model, SPARSE.replace(backend="torch"))
    fast = run(model, **x)
    apply_moc(model, SPARSE.replace(backend="reference"))
    torch.testing.assert_close(fast, run(model, **x), atol=1e-5, rtol=1e-5)


def test_pipeline_left_in_train_mode_equals_dense_at_full_density():
    """A transformer built from config is in train mode; pipelines run under torch.no_grad(), so MoC's
    drop-off / drop-in (on by default in the config) must stay off without anyone calling `.eval()`."""
    components = tiny_wan_components()
    components["transformer"].train()
    pipe = WanPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    stock = _pipe_call(pipe)
    apply_moc(pipe.transformer, DENSE)
    assert pipe.transformer.training and DENSE.drop_off > 0 and DENSE.drop_in > 0
    torch.testing.assert_close(_pipe_call(pipe), stock, atol=1e-5, rtol=1e-5)
