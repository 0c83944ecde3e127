"""The element-wise math on one chunk of float32 logits: pure functions with fixed shapes and no
graph breaks, run as they are (the ``torch`` backend) or fused by :mod:`slm.head.compiled`."""

from __future__ import annotations

import torch
from torch import Tensor


def loss_chunk(raw: Tensor, t: Tensor, softcap: float | None, hits: bool, entropy: bool = False):
    """(loss, lse, hit or None, entropy or None) of each row of one chunk of float32 pre-cap logits."""
    z = softcap * torch.tanh(raw / softcap) if softcap else raw
    lse = torch.logsumexp(z, dim=-1)
    loss = lse - z.gather(1, t[:, None]).squeeze(1)
    ent = lse - (torch.softmax(z, dim=-1) * z).sum(-1) if entropy else None  # H = lse - E_p[z]
    return loss, lse, (z.argmax(-1) == t) if hits else None, ent


def grad_chunk(
    raw: Tensor,
    t: Tensor,
    lse: Tensor | None,
    row_scale: Tensor | None,
    softcap: float | None,
    scale: float,
    out_dtype: torch.dtype = torch.float32,
    bias_grad: bool = False,
):
    """(d(sum of row_scale * loss)/d(pre-scale logits) in ``out_dtype`` (the gradient matmuls'
    dtype: the cast is part of the fused math), loss (float32), and with ``bias_grad`` the
    gradient's float32 column sums) of one chunk."""
    z = softcap * torch.tanh(raw / softcap) if softcap else raw
    if lse is None:
        lse = torch.logsumexp(z, dim=-1)
    loss = lse - z.gather(1, t[:, None]).squeeze(1)
    # In place on g, its own buffer: one chunk-sized temporary in eager mode; compile fuses the lot.
    g = (z - lse[:, None]).exp_()  # softmax
    g.scatter_add_(1, t[:, None], torch.full_like(g[:, :1], -1.0))  # minus the one-hot target
    if softcap:
        g.mul_(1.0 - (z / softcap).square())
    if scale != 1.0:
        g.mul_(scale)
    if row_scale is not None:
        g.mul_(row_scale[:, None])
    return g.to(out_dtype), loss, g.sum(0) if bias_grad else None
