"""Stand-ins for flash kernels on the CPU: the var-len semantics in float64, behind the real call signatures, and
strict about flash-attn's argument contract (so the flash executors run end to end here and their first GPU call gets
valid arguments)."""

from __future__ import annotations

import torch
from varlen_contract import varlen_contract_violations


class ContractError(AssertionError):
    pass


def _check(q, k, v, cu_q, cu_k, max_q, max_k, **extra):
    bad = varlen_contract_violations(q, k, v, cu_q, cu_k, max_q, max_k, **extra)
    if q.shape[-1] % 8 or v.shape[-1] % 8:
        bad.append(f"flash kernels take head sizes that are multiples of 8, got {q.shape[-1]}, {v.shape[-1]}")
    if bad:
        raise ContractError("; ".join(bad))


def _segments(cu_q, cu_k):
    cq, ck = cu_q.tolist(), cu_k.tolist()
    return [(cq[i], cq[i + 1], ck[i], ck[i + 1]) for i in range(len(cq) - 1)]


def varlen_forward(q, k, v, cu_q, cu_k, scale):
    """`(out (total_q, H, Dv) in q.dtype, lse (H, total_q) float32)`, by definition in float64."""
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[-1], dtype=torch.float64)
    lse = torch.zeros(q.shape[1], q.shape[0], dtype=torch.float64)
    for a, b, c0, c1 in _segments(cu_q, cu_k):
        s = torch.einsum("qhd,khd->hqk", q[a:b].double(), k[c0:c1].double()) * scale
        lse[:, a:b] = torch.logsumexp(s, -1)
        out[a:b] = torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), v[c0:c1].double())
    return out.to(q.dtype), lse.float()


def varlen_backward(do, q, k, v, o, lse, cu_q, cu_k, scale):
    dq, dk, dv = (torch.zeros(x.shape, dtype=torch.float64) for x in (q, k, v))
    for a, b, c0, c1 in _segments(cu_q, cu_k):
        qs, ks, vs, dos, os_ = (x.double() for x in (q[a:b], k[c0:c1], v[c0:c1], do[a:b], o[a:b]))
        p = torch.exp(torch.einsum("qhd,khd->hqk", qs, ks) * scale - lse[:, a:b, None].double())
        dv[c0:c1] = torch.einsum("hqk,qhd->khd", p, dos)
        ds = p * (torch.einsum("qhd,khd->hqk", dos, vs) - (dos * os_).sum(-1).T[:, :, None])
        dq[a:b] = torch.einsum("hqk,khd->qhd", ds, ks) * scale
        dk[c0:c1] = torch.einsum("hqk,qhd->khd", ds, qs) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# ------------------------------------------------------------------ PyTorch's aten ops (schema of torch 2.13)
def aten_flash_forward(
    query,
    key,
    value,
    cum_seq_q,
    cum_seq_k,
    max_q,
    max_k,
    dropout_p,
    is_causal,
    return_debug_mask,
    *,
    scale=None,
    window_size_left=None,
    window_size_right=None,
    seqused_k=None,
    alibi_slopes=None,
    block_table=None,
    num_splits=None,
):
    _check(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k)
    assert dropout_p == 0.0 and not is_causal and not return_debug_mask and scale is not None
    assert num_splits == 1, "split-KV must be off (row independence)"
    out, lse = varlen_forward(query, key, value, cum_seq_q, cum_seq_k, scale)
    return out, lse, torch.zeros(2, dtype=torch.uint64), torch.empty(0), torch.empty(0)


def aten_flash_backward(
    grad_out,
    query,
    key,
    value,
    out,
    logsumexp,
    cum_seq_q,
    cum_seq_k,
    max_q,
    max_k,
    dropout_p,
    is_causal,
    rng_state,
    unused,
    *,
    scale=None,
    window_size_left=None,
    window_size_right=None,
):
    _check(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, out=out, grad_out=grad_out, lse=logsumexp)
    assert dropout_p == 0.0 and not is_causal and scale is not None
    assert rng_state.dtype == torch.uint64 and rng_state.shape == (2,)
    return varlen_backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, scale)


# ------------------------------------------------------------------ flash-attn 2.7 / 2.8 internals (their signatures)
def fa28_varlen_forward(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p,
    softmax_scale,
    causal,
    window_size_left=-1,
    window_size_right=-1,
    softcap=0.0,
    alibi_slopes=None,
    return_softmax=False,
    block_table=None,
    leftpad_k=None,
    seqused_k=None,
    zero_tensors=False,
    num_splits=0,
):
    _check(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    assert dropout_p == 0.0 and not causal and (window_size_left, window_size_right) == (-1, -1) and softcap == 0.0
    out, lse = varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale)
    return out, lse, torch.empty(0), torch.zeros(2, dtype=torch.int64)


def fa28_varlen_backward(
    dout,
    q,
    k,
    v,
    out,
    softmax_lse,
    dq,
    dk,
    dv,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p,
    softmax_scale,
    causal,
    window_size_left,
    window_size_right,
    softcap,
    alibi_slopes,
    deterministic,
    rng_state=None,
    zero_tensors=False,
):
    _check(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, out=out, grad_out=dout, lse=softmax_lse)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    for dst, src in zip(
        (dq, dk, dv), varlen_backward(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, softmax_scale)
    ):
        dst.copy_(src)
    return torch.empty(0)


# ------------------------------------------------------------------ flash-attn 2.6 (window_size tuple, 8 outputs)
def fa26_varlen_forward(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p,
    softmax_scale,
    causal,
    window_size=(-1, -1),
    softcap=0.0,
    alibi_slopes=None,
    return_softmax=False,
    block_table=None,
):
    out, lse, s, rng = fa28_varlen_forward(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        dropout_p,
        softmax_scale,
        causal,
        *window_size,
        softcap,
    )
    return out, q, k, v, out, lse, s, rng


def fa26_varlen_backward(
    dout,
    q,
    k,
    v,
    out,
    softmax_lse,
    dq,
    dk,
    dv,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q,
    max_seqlen_k,
    dropout_p,
    softmax_scale,
    causal,
    window_size,
    softcap,
    alibi_slopes,
    deterministic,
    rng_state=None,
):
    return fa28_varlen_backward(
        dout,
        q,
        k,
        v,
        out,
        softmax_lse,
        dq,
        dk,
        dv,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        dropout_p,
        softmax_scale,
        causal,
        *window_size,
        softcap,
        alibi_slopes,
        deterministic,
        rng_state,
    )


# ------------------------------------------------------------------ flash-attn 4 (cute) interface
def fa4_fwd(
    q,
    k,
    v,
    qv=None,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    seqused_q=None,
    seqused_k=None,
    max_seqlen_q=None,
    max_seqlen_k=None,
    min_seqlen_k=None,
    page_table=None,
    softmax_scale=None,
    causal=False,
    softcap=None,
    window_size_left=None,
    window_size_right=None,
    learnable_sink=None,
    return_lse=False,
    out=None,
    lse=None,
):
    _check(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    assert not causal and return_lse and softmax_scale is not None
    o, l_ = varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale)
    return o, l_, None, None


def fa4_bwd(
    q,
    k,
    v,
    out,
    dout,
    lse,
    softmax_scale=None,
    causal=False,
    softcap=0.0,
    window_size_left=None,
    window_size_right=None,
    cu_seqlens_q=None,
    cu_seqlens_k=None,
    seqused_q=None,
    seqused_k=None,
    max_seqlen_q=None,
    max_seqlen_k=None,
    deterministic=False,
    dq=None,
    dk=None,
    dv=None,
):
    _check(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, out=out, grad_out=dout, lse=lse)
    assert not causal
    return varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, softmax_scale)
