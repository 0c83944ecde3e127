"""The output layer and cross-entropy, computed without a B x T x V tensor.

Two operations, both over *rows* (one hidden state per predicted token):

* :func:`score_rows` - no grad, chunked: each row's loss and log-sum-exp. Every valid token
  goes through it, because selection needs the current model's loss on all of them.
* :func:`selected_rows_loss` - the grad-enabled summed loss of the selected rows only. Its
  forward computes the gradients too, chunk by chunk while each chunk's logits exist (the
  backward of a sum only scales them), so no pass ever holds more than one chunk of logits.

Per step the head costs one matmul per valid token (scoring) plus three per selected token,
against HF's three per token on a B x T x V tensor. A faster kernel (a fused CUDA/Triton one)
slots in by replacing these two functions for an :class:`OutputHead`; everything above them only
sees per-row losses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# Float32 logits per chunk. CPU: 2**22 elements = 16 MiB (131 rows of a 32k vocabulary) stays in
# cache-friendly sizes. GPU: 2**26 = 256 MiB (441 rows of Qwen's 152k) keeps kernels large enough
# that launch overhead does not dominate.
CHUNK_ELEMENTS = {"cpu": 2**22, "cuda": 2**26}


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
    chunk_elements: int | None = None  # None: by device, see CHUNK_ELEMENTS

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    def chunk_rows(self) -> int:
        budget = self.chunk_elements or CHUNK_ELEMENTS.get(self.weight.device.type, CHUNK_ELEMENTS["cpu"])
        return max(1, budget // self.vocab_size)

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


class _SummedRowsCE(torch.autograd.Function):
    """Sum of the rows' cross-entropies. The gradient of a sum is the same for every row up to
    one scalar, so the forward computes it chunk by chunk while the logits are at hand
    (3 matmuls per chunk: logits, d hidden, d weight) and the backward only scales it."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, lse, head):
        n = hidden.shape[0]
        loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        grad_b = None if bias is None else torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)
        step = head.chunk_rows()
        for i in range(0, n, step):
            h, t = hidden[i : i + step], targets[i : i + step, None]
            logits = head.cap(head.raw_logits(h, weight, bias))
            row_lse = torch.logsumexp(logits, dim=-1) if lse is None else lse[i : i + step]
            loss[i : i + step] = row_lse - logits.gather(1, t).squeeze(1)
            # d loss / d logits = softmax - onehot, then back through the soft-cap and the scale.
            g = torch.exp(logits - row_lse[:, None])
            g.scatter_add_(1, t, torch.full_like(g[:, :1], -1.0))
            if head.softcap:
                g *= 1.0 - (logits / head.softcap).square()
            if head.scale != 1.0:
                g *= head.scale
            g = g.to(weight.dtype)  # under autocast the two matmuls below run in its dtype, like the logits'
            grad_h[i : i + step] = (g @ weight).to(hidden.dtype)
            grad_w.add_(g.t() @ h.to(weight.dtype))
            if grad_b is not None:
                grad_b += g.float().sum(0)
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype), None if grad_b is None else grad_b.to(bias.dtype))
        ctx.mark_non_differentiable(loss)
        return loss.sum(), loss

    @staticmethod
    def backward(ctx, grad_sum, _grad_rows):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        return (
            grad_h * grad_sum.to(grad_h.dtype) if need_h else None,
            grad_w * grad_sum.to(grad_w.dtype) if need_w else None,
            grad_b * grad_sum.to(grad_b.dtype) if need_b and grad_b is not None else None,
            None,
            None,
            None,
        )


def selected_rows_loss(
    head: OutputHead, hidden: Tensor, targets: Tensor, lse: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``(sum of the rows' losses, per-row losses [K])``; the sum carries gradients to
    ``hidden`` and the head's weight and bias, the per-row losses are detached.

    ``lse`` from :func:`score_rows` saves the log-sum-exp reduction; the logits of the
    selected rows are recomputed either way (the scoring pass keeps no logits).
    """
    if not torch.is_grad_enabled():
        loss = score_rows(head, hidden, targets)[0]
        return loss.sum(), loss
    return _SummedRowsCE.apply(hidden, head.weight, head.bias, targets, lse, head)
