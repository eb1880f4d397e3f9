"""Routing against a literal, per-token transcription of docs/semantics.md section 2."""

import pytest
import torch
from conftest import random_layout

from diffusers_moc import ChunkLayout, MoCConfig, dense_mask, route


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
