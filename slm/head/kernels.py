"""Triton kernels of the ``triton`` head backend (imported only where Triton is installed).

Two kernels, both recomputing logits tiles on chip from hidden rows ``h [N, H]`` and the output
layer's weight ``W [V, H]`` (``tl.dot`` accumulating in float32), with the architecture's bias,
logit scale and soft-cap applied in registers:

* :func:`loss_kernel` - one program per block of rows walks the vocabulary with an online max /
  sum-exp and writes only each row's loss and log-sum-exp (and, when asked, whether its target is
  the arg-max, and the entropy of its distribution). No logits reach global memory.
* :func:`grad_kernel` - one program per (rows x vocabulary) tile of a vocabulary slice: the
  gradient of ``sum_i w_i * loss_i`` with respect to the pre-scale logits, from the stored
  log-sum-exp, ``w_i * (softmax - onehot) * d(cap)/d(raw)``, written in the compute dtype for the
  two gradient matmuls (see :mod:`slm.head.fused`).

Kept to what the GPU compiler takes: power-of-two blocks, ``tl.dot`` blocks of at least 16 in every
dimension, masks for ragged edges, no data-dependent Python. Two constexpr switches exist for
Triton's CPU interpreter (``TRITON_INTERPRET=1``, the tests): ``UPCAST`` feeds ``tl.dot`` float32
(it multiplies bf16 wrongly), and ``BF16_OUT`` rounds bf16 stores to nearest-even by hand (it
truncates); on a GPU both are off, so they cost nothing there (the compile check compiles them out).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _logits_tile(
    h_ptr,
    w_ptr,
    b_ptr,
    rows,
    cols,
    N,
    V,
    H,
    stride_h,
    stride_w,
    scale,
    softcap,
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """``[BLOCK_N, BLOCK_V]`` float32 logits of rows x vocabulary ids (capped when SOFTCAP)."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    rmask, cmask = rows < N, cols < V
    for h0 in range(0, H, BLOCK_H):
        ks = h0 + tl.arange(0, BLOCK_H)
        kmask = ks < H
        a = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(w_ptr + cols[None, :] * stride_w + ks[:, None], mask=kmask[:, None] & cmask[None, :], other=0.0)
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        if IEEE:
            acc += tl.dot(a, b, input_precision="ieee")
        else:
            acc += tl.dot(a, b)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    acc = acc * scale
    if SOFTCAP:  # softcap * tanh(acc / softcap), tanh from exp (no libdevice: the interpreter has none)
        e = tl.exp(-2.0 * tl.abs(acc / softcap))
        t = (1.0 - e) / (1.0 + e)
        acc = softcap * tl.where(acc < 0, -t, t)
    return acc


@triton.jit
def loss_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    t_ptr,
    loss_ptr,
    lse_ptr,
    hit_ptr,
    ent_ptr,
    N,
    V,
    H,
    stride_h,
    stride_w,
    scale,
    softcap,
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    HITS: tl.constexpr,
    ENTROPY: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    target = tl.load(t_ptr + rows, mask=rmask, other=0)
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)  # sum of exp(z - m)
    sz = tl.zeros([BLOCK_N], dtype=tl.float32)  # sum of exp(z - m) * z (entropy)
    zt = tl.zeros([BLOCK_N], dtype=tl.float32)  # the target's logit
    best = tl.full([BLOCK_N], float("-inf"), tl.float32)
    best_at = tl.zeros([BLOCK_N], dtype=tl.int32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        cmask = cols < V
        z = _logits_tile(
            h_ptr,
            w_ptr,
            b_ptr,
            rows,
            cols,
            N,
            V,
            H,
            stride_h,
            stride_w,
            scale,
            softcap,
            HAS_BIAS,
            SOFTCAP,
            UPCAST,
            IEEE,
            BLOCK_N,
            BLOCK_V,
            BLOCK_H,
        )
        z = tl.where(cmask[None, :], z, float("-inf"))
        block_max = tl.max(z, 1)
        m_new = tl.maximum(m, block_max)
        alpha = tl.exp(m - m_new)
        p = tl.exp(z - m_new[:, None])
        s = s * alpha + tl.sum(p, 1)
        if ENTROPY:
            sz = sz * alpha + tl.sum(p * tl.where(cmask[None, :], z, 0.0), 1)  # p is 0 off the vocabulary
        zt += tl.sum(tl.where(cols[None, :] == target[:, None], z, 0.0), 1)
        if HITS:  # the first arg-max, as torch.argmax
            at = tl.argmax(z, 1).to(tl.int32) + v0
            better = block_max > best
            best_at = tl.where(better, at, best_at)
            best = tl.where(better, block_max, best)
        m = m_new
    lse = m + tl.log(s)
    tl.store(loss_ptr + rows, lse - zt, mask=rmask)
    tl.store(lse_ptr + rows, lse, mask=rmask)
    if HITS:
        tl.store(hit_ptr + rows, (best_at == target).to(tl.int8), mask=rmask)
    if ENTROPY:
        tl.store(ent_ptr + rows, lse - sz / s, mask=rmask)


@triton.jit
def grad_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    t_ptr,
    lse_ptr,
    rs_ptr,
    g_ptr,
    N,
    V,
    H,
    stride_h,
    stride_w,
    stride_g,
    v_start,
    v_end,
    scale,
    softcap,
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    BF16_OUT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """``g[:, v - v_start] = rs * (softmax(z) - onehot(t)) * dz/draw`` for vocabulary ids ``v`` in
    ``[v_start, v_end)``: the gradient with respect to the logits before scale and cap."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = v_start + tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    rmask, cmask = rows < N, cols < v_end
    z = _logits_tile(
        h_ptr,
        w_ptr,
        b_ptr,
        rows,
        cols,
        N,
        V,
        H,
        stride_h,
        stride_w,
        scale,
        softcap,
        HAS_BIAS,
        SOFTCAP,
        UPCAST,
        IEEE,
        BLOCK_N,
        BLOCK_V,
        BLOCK_H,
    )
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    target = tl.load(t_ptr + rows, mask=rmask, other=-1)
    row_scale = tl.load(rs_ptr + rows, mask=rmask, other=0.0)
    g = tl.exp(z - lse[:, None]) - tl.where(cols[None, :] == target[:, None], 1.0, 0.0)
    if SOFTCAP:
        capped = z / softcap
        g = g * (1.0 - capped * capped)
    g = g * (row_scale * scale)[:, None]
    g = tl.where(rmask[:, None] & cmask[None, :], g, 0.0)
    if BF16_OUT:  # the interpreter only: its float32 -> bfloat16 truncates; a GPU's conversion rounds to even
        bits = g.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        g = bits.to(tl.float32, bitcast=True)
    ptrs = g_ptr + rows[:, None] * stride_g + (cols - v_start)[None, :]
    tl.store(ptrs, g.to(g_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])
