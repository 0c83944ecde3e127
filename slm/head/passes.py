"""The two passes over rows: the loss of every valid row (no grad) and the selected rows' loss with its
gradients, one chunk of logits at a time."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from slm.head import fused
from slm.head.backend import chunk_kernels, resolve_backend
from slm.head.matmul import addmm_f32_, mm_f32, no_autocast
from slm.head.output import OutputHead


@torch.no_grad()
def row_losses(head: OutputHead, hidden: Tensor, targets: Tensor, hits: bool = False, entropy: bool = False):
    """Per-row cross-entropy and log-sum-exp (float32), one chunk of logits at a time.

    With ``hits=True`` also returns whether each row's target is the arg-max prediction, and with
    ``entropy=True`` (after it) the entropy of each row's predictive distribution.
    """
    if resolve_backend(head) == "triton":
        loss, lse, hit, ent = fused.loss_pass(head, hidden, targets, hits, entropy)
        return (loss, lse) + ((hit,) if hits else ()) + ((ent,) if entropy else ())
    n = hidden.shape[0]
    loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
    lse = torch.empty_like(loss)
    hit = torch.empty(n, dtype=torch.bool, device=hidden.device) if hits else None
    ent = torch.empty_like(loss) if entropy else None
    dtype = head.compute_dtype()
    score, _ = chunk_kernels(head)
    with no_autocast(hidden.device.type):
        weight = head.weight.to(dtype)
        for i, j in spans(n, head.chunk_rows("score")):
            raw = head.raw_logits(hidden[i:j].to(dtype), weight, head.bias)
            loss[i:j], lse[i:j], h, e = score(raw, targets[i:j], head.softcap, hits, entropy)
            if hits:
                hit[i:j] = h
            if entropy:
                ent[i:j] = e
    return (loss, lse) + ((hit,) if hits else ()) + ((ent,) if entropy else ())


def spans(n: int, step: int):
    """``(start, end)`` chunks of ``n`` rows, ``step`` at a time, none of exactly one row when
    ``n > 1`` (a one-row tensor would make ``torch.compile`` specialise and compile again)."""
    bounds = list(range(0, n, step)) + [n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        bounds[-2] -= 1
    return list(zip(bounds, bounds[1:]))


class _SelectedRowsCE(torch.autograd.Function):
    """Weighted sum of the rows' cross-entropies, ``sum_i w_i * ce_i`` (the torch and compiled backends).

    Eager mode (the default): the gradient of a sum is the same for every row up to one scalar,
    so the forward computes it chunk by chunk while the logits are at hand (3 matmuls per chunk:
    logits, d hidden, d weight; the weight's only when it requires grad) and the backward scales
    it in place, in float32. Deferred mode (fp16): the backward recomputes each chunk's logits and
    computes the gradients with the incoming scale already applied, so a loss scaler's factor
    reaches them before the float16 matmuls and small gradients do not underflow.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, lse, row_weight, head, defer):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n = hidden.shape[0]
        dtype = head.compute_dtype()
        ctx.head, ctx.defer, ctx.dtype = head, defer, dtype
        ctx.hidden_dtype = hidden.dtype
        loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
        score, grad = chunk_kernels(head)
        with no_autocast(hidden.device.type):
            w = weight.to(dtype)
            if defer:
                row_lse = torch.empty_like(loss)
                for i, j in spans(n, head.chunk_rows("train")):
                    raw = head.raw_logits(hidden[i:j].to(dtype), w, bias)
                    loss[i:j], lse_i, _, _ = score(raw, targets[i:j], head.softcap, False, False)
                    row_lse[i:j] = lse_i if lse is None else lse[i:j]
                ctx.save_for_backward(hidden, weight, bias, targets, row_lse, row_weight)
            else:
                # float32 until the backward has scaled them: a bf16 buffer would round the loss scale too
                grad_h = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
                grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
                grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
                for i, j in spans(n, head.chunk_rows("train")):
                    h = hidden[i:j].to(dtype)
                    raw = head.raw_logits(h, w, bias)
                    rw = None if row_weight is None else row_weight[i:j]
                    row_lse = None if lse is None else lse[i:j]
                    g, loss[i:j], g_sum = grad(raw, targets[i:j], row_lse, rw, head.softcap, head.scale, dtype, need_b)
                    _accumulate(g, h, w, grad_h, grad_w, grad_b, g_sum, i)
                # The weight is saved only so that changing it in place before backward raises.
                ctx.save_for_backward(weight, grad_h, grad_w, grad_b)
        ctx.mark_non_differentiable(loss)
        total = loss.sum() if row_weight is None else (loss * row_weight).sum()
        return total, loss

    @staticmethod
    def backward(ctx, grad_sum, _grad_rows):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "slm's selective head does not support double backward (create_graph=True, e.g. a gradient "
                "penalty): its gradient is not differentiable. Compute such a loss with HF's full-logits forward."
            )
        if ctx.defer:
            return (*_deferred_grads(ctx, grad_sum), None, None, None, None, None)
        if getattr(ctx, "consumed", False):
            raise RuntimeError(
                "slm's selective head was backpropagated twice through one graph (retain_graph=True): its "
                "gradients were computed in the forward and are scaled in place by the first backward. Run the "
                "forward again for a second backward (or use head_backend=triton, which computes them in the "
                "backward)."
            )
        ctx.consumed = True
        _weight, grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = grad_sum.float()
        return (
            None if grad_h is None else grad_h.mul_(scale).to(ctx.hidden_dtype),
            None if grad_w is None else grad_w.mul_(scale),
            None if grad_b is None else grad_b.mul_(scale),
            None,
            None,
            None,
            None,
            None,
        )


def _accumulate(g: Tensor, h: Tensor, w: Tensor, grad_h, grad_w, grad_b, g_sum, i: int) -> None:
    """Add one chunk's contribution: d hidden rows, d weight (in place), d bias. ``g`` is already in
    the compute dtype (the gradient matmuls run in it, like the logits')."""
    if grad_h is not None:
        grad_h[i : i + g.shape[0]] = mm_f32(g, w)
    if grad_w is not None:
        addmm_f32_(grad_w, g.t(), h)
    if grad_b is not None:
        grad_b += g_sum


def _deferred_grads(ctx, grad_sum: Tensor):
    hidden, weight, bias, targets, row_lse, row_weight = ctx.saved_tensors
    head, dtype = ctx.head, ctx.dtype
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    grad_h = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
    scale = grad_sum.float().expand(hidden.shape[0])
    if row_weight is not None:
        scale = scale * row_weight
    _, grad = chunk_kernels(head)
    with no_autocast(hidden.device.type):
        w = weight.to(dtype)
        for i, j in spans(hidden.shape[0], head.chunk_rows("train")):
            h = hidden[i:j].to(dtype)
            raw = head.raw_logits(h, w, bias)
            g, _, g_sum = grad(raw, targets[i:j], row_lse[i:j], scale[i:j], head.softcap, head.scale, dtype, need_b)
            _accumulate(g, h, w, grad_h, grad_w, grad_b, g_sum, i)
    return None if grad_h is None else grad_h.to(ctx.hidden_dtype), grad_w, grad_b


def selected_rows_loss(
    head: OutputHead,
    hidden: Tensor,
    targets: Tensor,
    lse: Tensor | None = None,
    row_weight: Tensor | None = None,
    loss: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``(sum of the rows' losses (weighted by row_weight), per-row losses [K])``; the sum
    carries gradients to ``hidden`` and the head's weight and bias, the per-row losses are
    detached.

    ``lse`` (and ``loss``) from :func:`row_losses` save recomputing them; the logits of the
    selected rows are recomputed either way (the loss pass keeps no logits).
    """
    if not torch.is_grad_enabled():
        loss = row_losses(head, hidden, targets)[0]
        return (loss.sum() if row_weight is None else (loss * row_weight).sum()), loss
    rw = None if row_weight is None else row_weight.float()
    if resolve_backend(head) == "triton":
        return fused.FusedRowsCE.apply(hidden, head.weight, head.bias, targets, lse, loss, rw, head)
    defer = head.compute_dtype() == torch.float16
    return _SelectedRowsCE.apply(hidden, head.weight, head.bias, targets, lse, rw, head, defer)


def full_logits_rows_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-row cross-entropy from already computed logits (the fallback path), float32."""
    return F.cross_entropy(logits.float(), targets, reduction="none")
