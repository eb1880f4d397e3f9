"""The sparsity schedule (`docs/semantics.md` section 3) and a cheap, exact estimate of the attended fraction.

A pretrained dense model is fine-tuned while `top_k` is annealed from dense to the target, as the paper does when it
"gradually sparsifies". The schedule is a pure function of the optimizer step, so a resumed run sets exactly the
`top_k` an uninterrupted run would have had.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..core.config import MoCConfig
from ..core.layout import ChunkLayout

__all__ = ["SparsitySchedule", "routed_density"]


@dataclass(frozen=True)
class SparsitySchedule:
    r"""
    `top_k` as a function of the optimizer step.

    Args:
        start_top_k (`int`): `top_k` for the first `warmup_steps` steps. A value of at least the number of chunks of
            the training layouts means dense (see `dense_top_k`).
        target_top_k (`int`): `top_k` after `warmup_steps + anneal_steps` steps.
        warmup_steps (`int`): steps held at `start_top_k`.
        anneal_steps (`int`): steps of the decrease.
        shape (`str`): `"linear"` or `"cosine"` (slow start and end).
        dense_top_k (`int`, *optional*): the number of chunks of the largest training layout. While the scheduled
            `top_k` is at least this, every chunk is selected and causal routing is switched off, so attention is
            exactly dense (`docs/semantics.md`: with `top_k` >= candidates and `causal=False`, MoC equals dense), and
            context drop-off / drop-in are off.
    """

    start_top_k: int
    target_top_k: int
    warmup_steps: int = 0
    anneal_steps: int = 0
    shape: str = "linear"
    dense_top_k: int | None = None

    def __post_init__(self):
        if self.start_top_k < self.target_top_k:
            raise ValueError(f"start_top_k ({self.start_top_k}) must be >= target_top_k ({self.target_top_k})")
        if self.shape not in ("linear", "cosine"):
            raise ValueError(f"shape must be 'linear' or 'cosine', got {self.shape!r}")

    def top_k(self, step: int) -> int:
        """`top_k` for optimizer step `step` (0-based: the step about to be taken)."""
        if step < self.warmup_steps:
            return self.start_top_k
        if self.anneal_steps == 0:
            return self.target_top_k
        t = min(1.0, (step - self.warmup_steps) / self.anneal_steps)
        if self.shape == "cosine":
            t = 0.5 - 0.5 * math.cos(math.pi * t)
        # Round so that the target is reached exactly at the end of the anneal, and never overshot.
        return max(self.target_top_k, round(self.start_top_k + t * (self.target_top_k - self.start_top_k)))

    def is_dense(self, step: int) -> bool:
        """Whether step `step` runs exactly dense attention."""
        return self.dense_top_k is not None and self.top_k(step) >= self.dense_top_k

    def moc_config(self, base: MoCConfig, step: int) -> MoCConfig:
        """
        `base` with the scheduled `top_k`. While dense, also `causal=False` and no drop-off / drop-in: there is no
        routing to regularise yet, and the model sees exactly the dense attention it was pretrained with.
        """
        if self.is_dense(step):
            return base.replace(top_k=self.top_k(step), causal=False, drop_off=0.0, drop_in=0.0)
        return base.replace(top_k=self.top_k(step))


def routed_density(layout: ChunkLayout, config: MoCConfig) -> float:
    r"""
    Attended fraction of the `L x L` query-key pairs for `layout` under `config`, computed from chunk masks only.

    Every query of chunk `a` attends its anchors plus `min(top_k, #candidates)` routed chunks. When the candidates of
    a chunk have equal sizes (one chunk per frame, the Wan default) this is exact whatever the router picks; otherwise
    routed chunks are counted at the mean candidate size. Training-time drop-off / drop-in are not counted (they
    change the expected count by `-top_k * drop_off / 2` and `+drop_in` chunks). Costs `O(C^2)`, independent of `L`.
    """
    anchors = layout.anchor_mask(config.local_window, config.anchor_own_shot, config.text_anchors)
    cands = layout.candidate_mask(config.local_window, config.anchor_own_shot, config.text_anchors, config.causal)
    sizes = layout.chunk_sizes().to(torch.float64)
    anchored = (anchors.to(torch.float64) * sizes).sum(-1)
    n_cand = cands.sum(-1).to(torch.float64)
    cand_tokens = (cands.to(torch.float64) * sizes).sum(-1)
    mean_cand = torch.where(n_cand > 0, cand_tokens / n_cand.clamp(min=1), torch.zeros_like(cand_tokens))
    routed = torch.minimum(n_cand, torch.tensor(float(config.top_k), dtype=torch.float64)) * mean_cand
    L = float(layout.num_tokens)
    return float(((anchored + routed) * sizes).sum() / (L * L))
