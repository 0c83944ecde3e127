"""Per-token log-probabilities whose gradients reach the model only through the tokens a rule keeps.

For losses that are any function of per-token log-probabilities (policy gradients: GRPO's clipped
ratio, its high-entropy token mask), not just their sum. One no-grad loss pass gives every valid
token's log-probability and entropy; ``keep`` picks tokens from them; the returned log-probabilities
carry gradients at the kept tokens only. Their backward runs the selective head on the kept rows with
the incoming gradient as row weights (``d/dθ sum_i g_i log p_i = d/dθ sum_i (-g_i) CE_i``), so no other
row's logits are ever recomputed with gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from slm.head import row_losses, selected_rows_loss


class _KeptLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, values, positions, targets, lse, head):
        ctx.save_for_backward(hidden, positions, targets, lse)
        ctx.head, ctx.has_bias = head, bias is not None
        return values.clone()

    @staticmethod
    def backward(ctx, grad):
        hidden, positions, targets, lse = ctx.saved_tensors
        g = grad.reshape(-1).index_select(0, positions).float()
        params = [ctx.head.weight] + ([ctx.head.bias] if ctx.has_bias else [])
        with torch.enable_grad():
            rows = hidden.detach().requires_grad_(True)
            total, _ = selected_rows_loss(ctx.head, rows, targets, lse, row_weight=-g)
            wanted = [rows] + [p for p in params if p.requires_grad]
            grads = iter(torch.autograd.grad(total, wanted, allow_unused=True))
        d_hidden = next(grads)
        d_params = [next(grads) if p.requires_grad else None for p in params]
        d_weight, d_bias = d_params[0], (d_params[1] if ctx.has_bias else None)
        return d_hidden, d_weight, d_bias, None, None, None, None, None


def kept_logprobs(head, hidden: Tensor, targets: Tensor, plan, keep) -> tuple[Tensor, Tensor, Tensor]:
    """``(log p [B, T], entropy [B, T], kept [B, T] bool)`` for the valid rows of ``plan`` (entry t is the
    prediction of ``labels[:, t]``; 0 where invalid). ``hidden``: the valid rows' final hidden states (with
    gradients); ``keep(logp, entropy, valid) -> [B, T] bool`` is called once, on detached values."""
    loss, lse, entropy = row_losses(head, hidden.detach(), targets, entropy=True)
    logp, ent = plan.scatter(plan.valid_pos, -loss), plan.scatter(plan.valid_pos, entropy)
    kept = keep(logp, ent, plan.valid) & plan.valid
    positions = kept[:, 1:].reshape(-1).nonzero().squeeze(1)  # data-dependent: one wait for the device
    rows = plan.rows_of(positions)
    b, t = plan.shape
    values = _KeptLogProbs.apply(
        hidden.index_select(0, rows),
        head.weight,
        head.bias,
        logp[:, 1:].reshape(-1),
        positions,
        targets.index_select(0, rows),
        lse.index_select(0, rows),
        head,
    )
    return F.pad(values.view(b, t - 1), (1, 0)), ent, kept
