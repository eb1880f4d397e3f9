"""Which transformers a run trains: one (Wan 2.1, TI2V-5B) or Wan 2.2 A14B's experts, each on its timesteps.

Wan 2.2 A14B denoises timesteps `t >= boundary_ratio * 1000` with `transformer` (high noise) and the others with
`transformer_2` (low noise), as diffusers' `WanPipeline` switches them. A LoRA of an expert is trained on its own
timesteps only: the training scheduler's timesteps are cut at the boundary and an expert draws timestep indices from
its part (with the `weighting_scheme` density rescaled to that part). With `model.expert: both` every optimizer step
trains one expert, drawn from a generator seeded by `(seed, step)` with the share of timesteps it covers: the whole
optimizer step, its gradient accumulation and DDP's gradient sync stay on one expert, and the draw is a pure function
of the step (exact resume).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Expert", "expert_for_step", "needed_components", "timestep_ranges", "trained_components"]

#: `model.expert` -> the pipeline component trained.
_EXPERT_COMPONENTS = {
    "high_noise": ["transformer"],
    "low_noise": ["transformer_2"],
    "both": ["transformer", "transformer_2"],
}


@dataclass(frozen=True)
class Expert:
    r"""
    A transformer being trained, as the optimizer and the loop see it.

    Attributes:
        name (`str`): its pipeline component, `"transformer"` or `"transformer_2"`.
        model (`torch.nn.Module`): the transformer (as the pipeline holds it).
        prepared (`torch.nn.Module`, *optional*): as `accelerator.prepare` returned it (DDP-wrapped with several
            processes).
        timesteps (`tuple[int, int]`): the half-open range of training-scheduler timestep indices it is trained on.
        share (`float`): the fraction of all timesteps it covers (how often `both` trains it).
    """

    name: str
    model: torch.nn.Module
    prepared: torch.nn.Module | None = None
    timesteps: tuple[int, int] = (0, 1000)
    share: float = 1.0


def trained_components(experts: bool, expert: str | None) -> list[str]:
    """The components that get a LoRA: `transformer`, or A14B's `model.expert` choice (default `both`)."""
    return _EXPERT_COMPONENTS[expert or "both"] if experts else ["transformer"]


def needed_components(experts: bool, expert: str | None, validating: bool) -> list[str]:
    """The transformers to load: the trained ones, and both of A14B's when validation videos run the pipeline."""
    if experts and validating:
        return ["transformer", "transformer_2"]
    return trained_components(experts, expert)


def timestep_ranges(timesteps: torch.Tensor, boundary_ratio: float | None) -> dict[str, tuple[int, int]]:
    r"""
    Timestep index ranges per component for descending training `timesteps` (`num_train_timesteps` of them):
    everything for `transformer` without a boundary; else `transformer` on `t >= boundary_ratio * 1000`,
    `transformer_2` below.
    """
    total = len(timesteps)
    if boundary_ratio is None:
        return {"transformer": (0, total)}
    high = int((timesteps >= boundary_ratio * 1000).sum())
    if not 0 < high < total:
        raise ValueError(f"boundary_ratio={boundary_ratio} leaves one expert without training timesteps")
    return {"transformer": (0, high), "transformer_2": (high, total)}


def expert_for_step(experts: list[Expert], seed: int, step: int) -> Expert:
    """The expert optimizer step `step` trains: the only one, or a draw seeded by `(seed, step)` by share."""
    if len(experts) == 1:
        return experts[0]
    generator = torch.Generator().manual_seed((seed * 1_000_003 + step) % 2**63)
    u = float(torch.rand((), generator=generator))
    return experts[0] if u < experts[0].share else experts[1]
