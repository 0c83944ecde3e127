"""The output layer and cross-entropy, computed without a B x T x V tensor.

Two operations, both over *rows* (one hidden state per predicted token):

* :func:`score_rows` - no grad, chunked: each row's loss and log-sum-exp. Every valid token
  goes through it, because selection needs the current model's loss on all of them.
* :func:`selected_rows_loss` - the grad-enabled loss of the selected rows only. Its forward
  reuses the losses from the scoring pass (no second forward matmul); its backward recomputes
  the logits of the selected rows chunk by chunk from the saved log-sum-exp, so neither pass
  ever holds more than one chunk of logits.

A faster kernel (a fused CUDA/Triton one) slots in by replacing these two functions for a
:class:`OutputHead`; everything above them only sees per-row losses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# Float32 logits per chunk: 2**22 elements = 16 MiB, e.g. 131 rows of a 32k vocabulary.
DEFAULT_CHUNK_ELEMENTS = 2**22


@dataclass
class OutputHead:
    """How an architecture turns final hidden states into logits.

    ``logits = softcap * tanh((h @ weight.T + bias) * scale / softcap)`` with the optional parts
    left out. Covers plain and tied heads, Phi-2's bias, Cohere/Granite logit scaling and
    Gemma 2's final logit soft-capping.
    """

    weight: Tensor
    bias: Tensor | None = None
    scale: float = 1.0
    softcap: float | None = None
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    def chunk_rows(self) -> int:
        return max(1, self.chunk_elements // self.vocab_size)

    def raw_logits(self, h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """Pre-cap logits in float32 (the matmul runs in the weights' dtype)."""
        z = F.linear(h.to(weight.dtype), weight, bias).float()
        return z * self.scale if self.scale != 1.0 else z

    def cap(self, z: Tensor) -> Tensor:
        return self.softcap * torch.tanh(z / self.softcap) if self.softcap else z


@torch.no_grad()
def score_rows(head: OutputHead, hidden: Tensor, targets: Tensor, hits: bool = False):
    """Per-row cross-entropy and log-sum-exp (float32), one chunk of logits at a time.

    With ``hits=True`` also returns whether each row's target is the arg-max prediction.
    """
    n = hidden.shape[0]
    loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
    lse = torch.empty_like(loss)
    hit = torch.empty(n, dtype=torch.bool, device=hidden.device) if hits else None
    step = head.chunk_rows()
    for i in range(0, n, step):
        logits = head.cap(head.raw_logits(hidden[i : i + step], head.weight, head.bias))
        lse[i : i + step] = torch.logsumexp(logits, dim=-1)
        target_logit = logits.gather(1, targets[i : i + step, None]).squeeze(1)
        loss[i : i + step] = lse[i : i + step] - target_logit
        if hits:
            hit[i : i + step] = logits.argmax(-1) == targets[i : i + step]
    return (loss, lse, hit) if hits else (loss, lse)


class _SelectedRowsCE(torch.autograd.Function):
    """Per-row CE whose value is known already; backward recomputes logits chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, lse, loss, head):
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.head = head
        # Backward runs outside autocast: remember the dtype the scoring matmuls used under it.
        dev = hidden.device.type
        ctx.compute_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        head: OutputHead = ctx.head
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
        w = weight.to(ctx.compute_dtype)
        b = None if bias is None else bias.to(ctx.compute_dtype)
        step = head.chunk_rows()
        for i in range(0, hidden.shape[0], step):
            h = hidden[i : i + step].to(ctx.compute_dtype)
            z = head.raw_logits(h, w, b)
            logits = head.cap(z)
            # d loss / d logits = softmax - onehot, scaled by the incoming per-row gradient.
            g = torch.exp(logits - lse[i : i + step, None])
            g.scatter_add_(1, targets[i : i + step, None], torch.full_like(g[:, :1], -1.0))
            g *= grad_loss[i : i + step, None]
            if head.softcap:
                g *= 1.0 - (logits / head.softcap).square()
            if head.scale != 1.0:
                g *= head.scale
            g = g.to(ctx.compute_dtype)
            if need_h:
                grad_h[i : i + step] = (g @ w).to(hidden.dtype)
            if need_w:
                grad_w.add_(g.t() @ h)
            if need_b:
                grad_b += g.float().sum(0)
        grad_w = grad_w.to(weight.dtype) if need_w else None
        grad_b = grad_b.to(bias.dtype) if need_b else None
        return grad_h, grad_w, grad_b, None, None, None, None


def selected_rows_loss(
    head: OutputHead,
    hidden: Tensor,
    targets: Tensor,
    lse: Tensor | None = None,
    loss: Tensor | None = None,
) -> Tensor:
    """Per-row losses ``[K]`` with gradients to ``hidden``, the head's weight and bias.

    Pass ``lse`` and ``loss`` from :func:`score_rows` to skip the forward matmul; without them
    they are computed here (the ``loss_mask`` path, which has no scoring pass).
    """
    if lse is None or loss is None:
        loss, lse = score_rows(head, hidden.detach(), targets)
    if not torch.is_grad_enabled():
        return loss
    return _SelectedRowsCE.apply(hidden, head.weight, head.bias, targets, lse, loss, head)
