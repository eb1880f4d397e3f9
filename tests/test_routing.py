"""Routing against a literal, per-token transcription of docs/semantics.md section 2."""

import pytest
import torch
from conftest import random_layout

from diffusers_moc import ChunkLayout, MoCConfig, route
from diffusers_moc.core.routing import expand_routing


def spec_mask(q, k, layout: ChunkLayout, cfg: MoCConfig) -> torch.Tensor:
    """The attended token pairs, computed one query at a time straight from the spec's wording."""
    B, L, H, _ = q.shape
    C = layout.num_chunks
    off = layout.offsets
    chunk_of = [c for c in range(C) for _ in range(layout.sizes[c])]
    phi = torch.stack([k[:, off[c] : off[c + 1]].mean(1) for c in range(C)], 1)  # (B, C, H, D)
    out = torch.zeros(B, H, L, L, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for i in range(L):
                a = chunk_of[i]
                shot = layout.shots[a]
                anchors = {a}
                if shot >= 0:
                    same_video = [c for c in range(C) if layout.shots[c] == shot and not layout.is_text[c]]
                    anchors |= set([c for c in same_video if c < a][::-1][: cfg.local_window])
                    anchors |= set([c for c in same_video if c > a][: cfg.local_window])
                    if cfg.anchor_own_shot:
                        anchors |= {c for c in range(C) if layout.shots[c] == shot}
                for c in range(C):
                    if layout.is_text[c] and (
                        cfg.text_anchors == "all" or layout.shots[c] == -1 or (shot >= 0 and layout.shots[c] == shot)
                    ):
                        anchors.add(c)
                cands = [c for c in range(C) if c not in anchors and (not cfg.causal or c < a)]
                scores = {c: float(q[b, i, h] @ phi[b, c, h]) for c in cands}
                chosen = sorted(cands, key=lambda c: (-scores[c], c))[: cfg.top_k]
                for c in anchors | set(chosen):
                    out[b, h, i, off[c] : off[c + 1]] = True
    return out


CONFIGS = [
    MoCConfig(top_k=2),
    MoCConfig(top_k=1, local_window=0, causal=False),
    MoCConfig(top_k=3, local_window=2, anchor_own_shot=True, text_anchors="shot"),
    MoCConfig(top_k=0, local_window=1),
    MoCConfig(top_k=50, causal=True),
    MoCConfig(top_k=2, text_anchors="shot", causal=False),
]


def _id(c: MoCConfig) -> str:
    return f"k{c.top_k}-w{c.local_window}-{c.text_anchors}-causal{c.causal}"


@pytest.mark.parametrize("cfg", CONFIGS, ids=_id)
def test_route_matches_the_spec_on_random_layouts(rng, cfg):
    for _ in range(6):
        layout = random_layout(rng)
        q = torch.randn(2, layout.num_tokens, 2, 4, dtype=torch.float64)
        k = torch.randn(2, layout.num_tokens, 2, 4, dtype=torch.float64)
        assert torch.equal(dense_mask(q, k, layout, cfg), spec_mask(q, k, layout, cfg)), layout


def test_ties_go_to_the_earlier_chunk():
    layout = ChunkLayout.for_video(5, 2)
    q = torch.ones(1, 10, 1, 2)
    k = torch.ones(1, 10, 1, 2)  # every chunk scores the same
    routing = route(q, k, layout, MoCConfig(top_k=2, local_window=0, causal=False))
    assert routing.selected[0, 0, 9].tolist() == [0, 1]
    assert routing.selected[0, 0, 0].tolist() == [1, 2]


def test_causal_routing_is_a_dag():
    layout = ChunkLayout.for_video(6, 3, shot_frames=[2, 4])
    q, k = torch.randn(1, 18, 2, 8), torch.randn(1, 18, 2, 8)
    routing = route(q, k, layout, MoCConfig(top_k=3, local_window=0, causal=True))
    sel = routing.selected
    own = layout.token_chunks()[None, None, :, None]
    assert bool(((sel < own) | (sel == -1)).all())


def test_full_top_k_without_causality_is_dense():
    layout = ChunkLayout.for_video(4, 3, shot_frames=[1, 3])
    q, k = torch.randn(1, 12, 2, 4), torch.randn(1, 12, 2, 4)
    routing = route(q, k, layout, MoCConfig(top_k=4, causal=False))
    assert routing.density() == 1.0
    assert bool(dense_mask(q, k, layout, MoCConfig(top_k=4, causal=False)).all())
    assert route(q, k, layout, MoCConfig(top_k=1, local_window=0)).density() < 1.0


def test_routing_is_compact():
    layout = ChunkLayout.for_video(8, 16)
    q, k = torch.randn(2, 128, 3, 4), torch.randn(2, 128, 3, 4)
    routing = route(q, k, layout, MoCConfig(top_k=2))
    assert routing.selected.shape == (2, 3, 128, 2)
    assert routing.anchors.shape == (8, 8)


def test_block_routing_shares_one_selection_per_tile():
    layout = ChunkLayout.for_video(4, 6)
    q, k = torch.randn(1, 24, 2, 4), torch.randn(1, 24, 2, 4)
    sel = route(q, k, layout, MoCConfig(top_k=1, local_window=0, causal=False, route_by="block", block_size=3)).selected
    tiles = sel[0, :, :, 0].reshape(2, 8, 3)
    assert bool((tiles == tiles[..., :1]).all())
    # the tile's choice is the one its mean query makes
    qm = q[0, 0:3, 0].mean(0)
    phi = k[0].reshape(4, 6, 2, 4).mean(1)[:, 0]
    scores = phi @ qm
    scores[0] = float("-inf")  # own chunk is an anchor
    assert sel[0, 0, 0, 0].item() == int(scores.argmax())


def test_bad_inputs():
    layout = ChunkLayout.for_video(2, 3)
    with pytest.raises(ValueError, match="covers 6 tokens but the sequence has 7"):
        route(torch.randn(1, 7, 1, 4), torch.randn(1, 7, 1, 4), layout, MoCConfig())
    with pytest.raises(ValueError, match=r"shaped \(B, L, H, D\)"):
        route(torch.randn(6, 1, 4), torch.randn(6, 1, 4), layout, MoCConfig())


class TestTrainingRegularisers:
    layout = ChunkLayout.concat(ChunkLayout.for_captions([2], [-1]), ChunkLayout.for_video(12, 2, [6, 6]))

    def qk(self):
        g = torch.Generator().manual_seed(1)
        return torch.randn(2, self.layout.num_tokens, 2, 4, generator=g), torch.randn(
            2, self.layout.num_tokens, 2, 4, generator=g
        )

    def test_off_outside_training(self):
        q, k = self.qk()
        cfg = MoCConfig(top_k=3, drop_off=1.0, drop_in=3.0)
        plain = route(q, k, self.layout, cfg.replace(drop_off=0.0, drop_in=0.0))
        assert torch.equal(route(q, k, self.layout, cfg).selected, plain.selected)

    def test_anchors_untouched_and_causality_kept(self):
        q, k = self.qk()
        cfg = MoCConfig(top_k=3, drop_off=1.0, drop_in=3.0)
        routing = route(q, k, self.layout, cfg, training=True, generator=torch.Generator().manual_seed(0))
        mask = routing.chunk_mask()
        tok_chunk = self.layout.token_chunks()
        anchors = routing.anchors[tok_chunk]
        assert bool(mask[:, :, anchors].all())
        sel = routing.selected
        assert bool(((sel < tok_chunk[None, None, :, None]) | (sel == -1)).all())
        # routed slots never hold an anchor (anchors are never counted against top_k)
        own = tok_chunk[None, None, :, None].expand_as(sel)
        assert not bool(routing.anchors[own[sel >= 0], sel[sel >= 0]].any())

    def test_drop_off_removes_at_most_floor_p_k(self):
        q, k = self.qk()
        cfg = MoCConfig(top_k=4, drop_off=1.0, drop_in=0.0)
        plain = route(q, k, self.layout, cfg.replace(drop_off=0.0))
        dropped = route(q, k, self.layout, cfg, training=True, generator=torch.Generator().manual_seed(0))
        n_plain = (plain.selected >= 0).sum(-1)
        n_drop = (dropped.selected >= 0).sum(-1)
        assert bool((n_drop <= n_plain).all()) and bool((n_plain - n_drop <= 4).all())
        assert bool((n_drop < n_plain).any())
        kept = dropped.selected[dropped.selected >= 0]
        assert bool(torch.isin(kept, plain.selected[plain.selected >= 0]).all())

    @pytest.mark.parametrize("top_k", [3, 5])
    def test_default_drop_off_drops_at_the_papers_top_k(self, top_k):
        q, k = self.qk()
        cfg = MoCConfig(top_k=top_k, drop_in=0.0)  # default drop_off
        plain = route(q, k, self.layout, cfg)
        dropped = route(q, k, self.layout, cfg, training=True, generator=torch.Generator().manual_seed(0))
        assert (dropped.selected >= 0).sum() < (plain.selected >= 0).sum()

    def test_drop_in_adds_distinct_candidates(self):
        q, k = self.qk()
        cfg = MoCConfig(top_k=1, drop_off=0.0, drop_in=2.0)
        routing = route(q, k, self.layout, cfg, training=True, generator=torch.Generator().manual_seed(0))
        sel = routing.selected
        assert sel.shape[-1] > 1
        valid = sel >= 0
        for row, ok in zip(sel.reshape(-1, sel.shape[-1]), valid.reshape(-1, sel.shape[-1])):
            picked = row[ok].tolist()
            assert len(picked) == len(set(picked))

    def test_seeded_generator_is_reproducible(self):
        q, k = self.qk()
        cfg = MoCConfig(top_k=3, drop_off=0.5, drop_in=1.0)
        a = route(q, k, self.layout, cfg, training=True, generator=torch.Generator().manual_seed(3)).selected
        b = route(q, k, self.layout, cfg, training=True, generator=torch.Generator().manual_seed(3)).selected
        c = route(q, k, self.layout, cfg, training=True, generator=torch.Generator().manual_seed(4)).selected
        assert torch.equal(a, b) and not torch.equal(a, c)


# ------------------------------------------------------------------------------------------------ ties
def _constant_keys_case(seed: int, dtype: torch.dtype, top_k: int):
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 6, (int(torch.randint(3, 13, (1,), generator=g)),), generator=g).tolist()
    layout = ChunkLayout.from_chunks(sizes)
    H, D = 2, 16
    k = torch.randn(1, 1, H, D, generator=g).to(dtype).expand(1, layout.num_tokens, H, D)
    q = torch.randn(1, layout.num_tokens, H, D, generator=g).to(dtype)
    return layout, q, k


def _earliest(layout: ChunkLayout, top_k: int) -> torch.Tensor:
    """Causal, no local window: with every chunk scoring the same, query chunk a routes to chunks 0..top_k-1 < a."""
    own = layout.token_chunks()[:, None]
    slots = torch.arange(min(top_k, layout.num_chunks))[None, :]
    return torch.where(slots < own, slots, -1)


def test_ties_the_issue_example():
    # fp32 means of identical keys used to differ by one ulp: the last query routed to chunk 1, not 0.
    layout = ChunkLayout.from_chunks([1, 3, 1])
    k = torch.full((1, 5, 1, 4), -1.6052763462)
    q = torch.randn(1, 5, 1, 4)
    routing = route(q, k, layout, MoCConfig(top_k=1, local_window=0, causal=True))
    assert routing.selected[0, 0, :, 0].tolist() == [-1, 0, 0, 0, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("top_k", [1, 3])
def test_constant_keys_of_chunks_of_any_size_tie_to_the_earlier_chunk(dtype, top_k):
    for seed in range(25):
        layout, q, k = _constant_keys_case(seed, dtype, top_k)
        sel = route(q, k, layout, MoCConfig(top_k=top_k, local_window=0)).selected
        assert torch.equal(sel[0], _earliest(layout, top_k).expand_as(sel[0])), (seed, layout.sizes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_a_duplicated_chunk_ties_to_its_earlier_copy(dtype):
    for seed in range(25):
        g = torch.Generator().manual_seed(seed)
        frame = torch.randn(1, 3, 2, 8, generator=g).to(dtype)
        other = torch.randn(1, 3, 2, 8, generator=g).to(dtype)
        layout = ChunkLayout.for_video(5, 3)
        # chunks: A, B, A (a copy), B (a copy), query chunk; q = mean(A) - mean(B) scores A above B.
        k = torch.cat([frame, other, frame, other, torch.randn(1, 3, 2, 8, generator=g).to(dtype)], 1)
        q = (frame.float().mean(1, keepdim=True) - other.float().mean(1, keepdim=True)).to(dtype).expand(1, 15, 2, 8)
        one = route(q, k, layout, MoCConfig(top_k=1, local_window=0)).selected
        two = route(q, k, layout, MoCConfig(top_k=2, local_window=0)).selected
        assert one[0, :, 12:].tolist() == [[[0]] * 3] * 2, seed  # the earlier copy of A
        assert two[0, :, 12:].tolist() == [[[0, 2]] * 3] * 2, seed  # both copies, the earlier first


def test_equal_descriptors_get_equal_scores_whatever_the_matmul_rounds(monkeypatch):
    """Simulate a score matmul that rounds each column differently (as blocked GEMMs do in their tails): the
    canonicalisation must still give equal descriptors equal scores, so the tie rule decides."""
    real_einsum = torch.einsum

    def column_dependent(equation, a, b):
        out = real_einsum(equation, a, b)
        return out + torch.arange(out.shape[-1], dtype=out.dtype) * 1e-6 * out.abs().clamp(min=1)

    layout = ChunkLayout.for_video(6, 2)
    k = torch.randn(1, 1, 2, 4).expand(1, 12, 2, 4)
    q = torch.randn(1, 12, 2, 4)
    monkeypatch.setattr(torch, "einsum", column_dependent)
    sel = route(q, k, layout, MoCConfig(top_k=2, local_window=0)).selected
    assert torch.equal(sel[0], _earliest(layout, 2).expand_as(sel[0]))


# ------------------------------------------------------------------------------------------------ NaN
@pytest.mark.parametrize("causal", [True, False])
def test_nan_queries_and_keys_never_give_invalid_or_duplicate_slots(rng, causal):
    cfg = MoCConfig(top_k=3, local_window=1, causal=causal)
    for _ in range(6):
        layout = random_layout(rng)
        q, k = torch.randn(2, layout.num_tokens, 2, 4), torch.randn(2, layout.num_tokens, 2, 4)
        q[0, :: max(1, layout.num_tokens // 3)] = float("nan")
        k[1, : layout.sizes[0]] = float("nan")  # one chunk's descriptor is NaN
        k[0, -1, 0, 0] = float("inf")
        routing = route(q, k, layout, cfg)
        sel = routing.selected
        assert bool(((sel >= -1) & (sel < layout.num_chunks)).all())
        tok_chunk = layout.token_chunks()
        cands = layout.candidate_mask(cfg.local_window, cfg.anchor_own_shot, cfg.text_anchors, cfg.causal)[tok_chunk]
        n_cands = cands.sum(-1)
        # Exactly min(top_k, candidates) slots filled, all distinct candidates.
        assert torch.equal((sel >= 0).sum(-1), n_cands.clamp(max=cfg.top_k).expand(2, 2, -1))
        for row, allowed in zip(sel.reshape(-1, sel.shape[-1]), cands.repeat(4, 1)):
            picked = row[row >= 0]
            assert picked.unique().numel() == picked.numel() and bool(allowed[picked].all())


# ---------------------------------------------------------------------------------------------- regularisers
def test_drop_off_counts_what_the_query_routed_to_not_top_k():
    # top_k far beyond the candidates (dense): each query drops floor(p * k) of its k routed chunks, never all.
    layout = ChunkLayout.for_video(6, 2)
    q, k = torch.randn(2, 12, 2, 4), torch.randn(2, 12, 2, 4)
    cfg = MoCConfig(top_k=50, local_window=0, drop_off=1.0, drop_in=0.0)
    plain = (route(q, k, layout, cfg).selected >= 0).sum(-1)
    kept = (route(q, k, layout, cfg, training=True, generator=torch.Generator().manual_seed(0)).selected >= 0).sum(-1)
    routed = plain > 0
    assert bool((kept[routed] >= 1).all())  # floor(p * k) < k for p < 1
    assert bool((kept < plain).any())  # and it does drop


def test_drop_in_slots_is_a_poisson_tail_bound():
    import math

    from diffusers_moc.core.routing import drop_in_slots

    assert drop_in_slots(0.0, 10) == 0
    for rate in (0.1, 1.0, 3.0):
        m = drop_in_slots(rate, 1000)
        tail = 1 - sum(math.exp(-rate) * rate**i / math.factorial(i) for i in range(m + 1))
        below = 1 - sum(math.exp(-rate) * rate**i / math.factorial(i) for i in range(m))
        assert tail <= 1e-12 < below  # the smallest such bound
    assert drop_in_slots(3.0, 4) == 4  # never more than the chunks


def test_drop_in_draws_beyond_the_slot_bound_are_capped(monkeypatch):
    import diffusers_moc.core.routing as routing_module

    monkeypatch.setattr(routing_module, "_DROP_IN_TAIL", 1 - 1e-8)  # M = 1: Poisson(20) is at most 1 once in 2e7 draws
    layout = ChunkLayout.for_video(12, 2)
    q, k = torch.randn(1, 24, 2, 4), torch.randn(1, 24, 2, 4)
    cfg = MoCConfig(top_k=1, local_window=0, drop_off=0.0, drop_in=20.0, causal=False)
    bound = routing_module.drop_in_slots(20.0, layout.num_chunks)
    assert 0 < bound < 4
    sel = route(q, k, layout, cfg, training=True, generator=torch.Generator().manual_seed(0)).selected
    assert sel.shape[-1] == 1 + bound  # static: top_k slots plus the bound
    assert bool(((sel[..., 1:] >= 0).sum(-1) == bound).all())  # every query drew more, capped at the bound


def dense_mask(q, k, layout, config, **route_kwargs) -> torch.Tensor:
    """The boolean `(B, H, L, L)` set of attended query-key pairs (materialises `L x L`; small inputs only)."""
    return expand_routing(route(q, k, layout, config, **route_kwargs))
