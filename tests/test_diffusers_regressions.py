"""What diffusers' own model tests do, with MoC installed: autocast, layerwise casting and QKV fusion.

diffusers' `LayerwiseCastingTesterMixin.test_layerwise_casting_training` runs a training step under
`torch.autocast`; its `fuse_qkv_projections()` fuses the projections of a model's attention layers. Both must leave
MoC working as stock attention works (AOTInductor, the third of these checks, is in `test_compile.py`).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _tiny_models import MODELS

from diffusers_moc import ChunkLayout, MoCConfig, apply_moc, moc_attention, remove_moc
from diffusers_moc.core.attention_processors.base import MoCAttnProcessorBase

DENSE = MoCConfig(top_k=1000, causal=False, backend="torch")
SPARSE = MoCConfig(top_k=1, local_window=0, backend="torch")
# Under bfloat16 autocast the attention output is rounded to bfloat16: MoC's kernels and SDPA may round one element
# a unit in the last place apart, which the layers after it carry on.
BF16_TOLERANCE = dict(atol=2e-2, rtol=2e-2)


def _out(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


# ---------------------------------------------------------------------------------------------- autocast
def test_moc_attention_under_autocast_casts_its_inputs_as_sdpa_does():
    """SDPA is on autocast's lower-precision list: query, key and value of mixed dtypes (HunyuanVideo's QK-norms give
    float32 next to a bfloat16 value) are cast to the autocast dtype. MoC routes and attends on those casts."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 48, 2, 16, generator=g) for _ in range(3))
    layout = ChunkLayout.for_video(3, 16)
    config = MoCConfig(top_k=1, local_window=0, causal=False, backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = moc_attention(q, k, v.bfloat16(), layout, config)
        sdpa = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.bfloat16().transpose(1, 2))
    assert out.dtype == sdpa.dtype == torch.bfloat16
    torch.testing.assert_close(out, moc_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), layout, config))
    # float64 is not cast (by SDPA either); without autocast mixed dtypes stay an error.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert moc_attention(q.double(), k.double(), v.double(), layout, config).dtype == torch.float64
    with pytest.raises(ValueError, match="one dtype"):
        moc_attention(q, k, v.bfloat16(), layout, config)


@pytest.mark.parametrize("name", list(MODELS))
def test_full_density_under_autocast_equals_stock_under_autocast(name):
    model, inputs = MODELS[name]()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stock = _out(model, inputs)
        apply_moc(model, DENSE)
        moc = _out(model, inputs)
    assert moc.dtype == stock.dtype
    torch.testing.assert_close(moc, stock, **BF16_TOLERANCE)


@pytest.mark.parametrize("name", list(MODELS))
def test_layerwise_casting_training(name):
    """diffusers' `test_layerwise_casting_training` on CPU (where it skips bfloat16 compute), with MoC applied."""
    for storage_dtype in (torch.float16, torch.float8_e4m3fn, torch.float8_e5m2):
        model, inputs = MODELS[name]()
        apply_moc(model, DENSE)
        model.enable_layerwise_casting(storage_dtype=storage_dtype, compute_dtype=torch.float32)
        model.train()
        with torch.amp.autocast(device_type="cpu"):
            output = model(**inputs, return_dict=False)[0]
            loss = F.mse_loss(output, torch.randn(output.shape, generator=torch.Generator().manual_seed(0)))
        loss.backward()
        assert torch.isfinite(loss)
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


# ---------------------------------------------------------------------------------------------- QKV fusion
FUSABLE = [n for n, build in MODELS.items() if hasattr(build()[0], "fuse_qkv_projections")]


@pytest.mark.parametrize("name", [n for n in FUSABLE if n != "cogvideox"])
def test_fuse_qkv_projections_keeps_moc(name):
    """diffusers fuses the projections under the processors set (Wan's read the fused ones): MoC keeps running,
    sparse, with the output of the unfused model."""
    model, inputs = MODELS[name]()
    dense = _out(model, inputs)
    apply_moc(model, SPARSE)
    moc = _out(model, inputs)
    assert (moc - dense).abs().max() > 1e-3  # sparse routing: dense attention would show
    model.fuse_qkv_projections()
    # HunyuanVideo's attention modules are diffusers' older `Attention`, which its model-level fusion skips.
    assert any(getattr(m, "fused_projections", False) for m in model.modules()) or name.startswith("hunyuan")
    assert any(isinstance(p, MoCAttnProcessorBase) for p in model.attn_processors.values())
    torch.testing.assert_close(_out(model, inputs), moc, atol=1e-5, rtol=1e-5)
    model.unfuse_qkv_projections()
    torch.testing.assert_close(_out(model, inputs), moc, atol=1e-5, rtol=1e-5)


def test_cogvideox_fuse_qkv_projections_is_refused_not_run_dense():
    """CogVideoX's `fuse_qkv_projections()` swaps every processor for diffusers' dense fused one: the next forward
    raises (naming the way back) instead of running dense; `unfuse_qkv_projections()` brings MoC back."""
    model, inputs = MODELS["cogvideox"]()
    dense = _out(model, inputs)
    apply_moc(model, SPARSE)
    moc = _out(model, inputs)
    assert (moc - dense).abs().max() > 1e-3
    model.fuse_qkv_projections()
    with pytest.raises(RuntimeError, match=r"FusedCogVideoXAttnProcessor2_0.*unfuse_qkv_projections"):
        _out(model, inputs)
    model.unfuse_qkv_projections()
    torch.testing.assert_close(_out(model, inputs), moc)
    # MoC applied to a fused model runs (on the separate projections fusing leaves in place) ...
    model.fuse_qkv_projections()
    apply_moc(model, SPARSE)
    torch.testing.assert_close(_out(model, inputs), moc)
    remove_moc(model)
    torch.testing.assert_close(_out(model, inputs), dense, atol=1e-5, rtol=1e-5)


def test_cogvideox_unfuse_restoring_stock_processors_is_refused():
    """Fused first, then MoC: `unfuse_qkv_projections()` puts back the stock processors from before fusing."""
    model, inputs = MODELS["cogvideox"]()
    model.fuse_qkv_projections()
    apply_moc(model, SPARSE)
    _out(model, inputs)
    model.unfuse_qkv_projections()
    with pytest.raises(RuntimeError, match=r"run CogVideoXAttnProcessor2_0, not MoC"):
        _out(model, inputs)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with pytest.raises(Exception, match=r"CogVideoXAttnProcessor2_0, not MoC"):
        _out(compiled, inputs)
