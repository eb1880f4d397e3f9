"""Tiny (1-2 layer) transformers of every supported model with matching inputs, for the compile and host-read tests.

Each builder returns `(model, inputs)`: a transformer built from config in eval mode and the keyword inputs of one
forward. Joint-attention models get a per-sample padded caption, so the padded path of MoC attention is exercised.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import test_video_transformers as _tv  # noqa: E402

WAN_KWARGS = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=12,
    in_channels=4,
    out_channels=4,
    text_dim=16,
    freq_dim=32,
    ffn_dim=16,
    num_layers=1,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    rope_max_seq_len=32,
)


def _wan_inputs(**extra):
    g = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(1, 4, 4, 4, 4, generator=g),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 5, 16, generator=g),
        **extra,
    }


def wan():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(**WAN_KWARGS).eval(), _wan_inputs()


def wan22_ti2v():
    """Wan 2.2 TI2V-5B's transformer takes per-token timesteps `(B, tokens)` (`expand_timesteps`), as WanPipeline passes
    them; the first frame's tokens at 0, as with a start image."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    timestep = torch.full((1, 4 * 2 * 2), 500)
    timestep[:, :4] = 0
    return WanTransformer3DModel(**WAN_KWARGS).eval(), _wan_inputs(timestep=timestep)


def wan_vace():
    from diffusers import WanVACETransformer3DModel

    torch.manual_seed(0)
    model = WanVACETransformer3DModel(**WAN_KWARGS, vace_layers=[0], vace_in_channels=4).eval()
    return model, _wan_inputs(control_hidden_states=torch.randn(1, 4, 4, 4, 4))


def skyreels_v2():
    from diffusers import SkyReelsV2Transformer3DModel

    torch.manual_seed(0)
    return SkyReelsV2Transformer3DModel(**WAN_KWARGS).eval(), _wan_inputs()


#: Model name -> builder, one per supported transformer class.
MODELS = {
    "wan": wan,
    "wan22_ti2v": wan22_ti2v,
    "wan_vace": wan_vace,
    "skyreels_v2": skyreels_v2,
    "hunyuan_video": _tv._hunyuan,
    "hunyuan_video15": _tv._hunyuan15,
    "cogvideox": _tv._cogvideox,
    "ltx": _tv._ltx,
    "mochi": _tv._mochi,
}


def repeated_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks `compile_repeated_blocks` compiles; CogVideoX and Mochi declare none in diffusers 0.42.1, so for
    them the transformer blocks (what `_repeated_blocks` would name)."""
    names = getattr(model, "_repeated_blocks", None) or ["CogVideoXBlock", "MochiTransformerBlock"]
    return [m for m in model.modules() if type(m).__name__ in names]


def compile_regionally(model: torch.nn.Module, **kwargs) -> None:
    """`model.compile_repeated_blocks(**kwargs)`, or its equivalent where diffusers declares no repeated blocks."""
    if getattr(model, "_repeated_blocks", None):
        model.compile_repeated_blocks(**kwargs)
    else:
        for block in repeated_blocks(model):
            block.compile(**kwargs)
