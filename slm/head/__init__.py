"""The output layer and cross-entropy, computed without a B x T x V tensor.

Two operations, both over *rows* (one hidden state per predicted token):

* :func:`row_losses` - no grad, chunked: each row's loss and log-sum-exp. Every valid token
  goes through it, because selection needs the current model's loss on all of them.
* :func:`selected_rows_loss` - the grad-enabled (weighted) summed loss of the selected rows only.
  By default its forward computes the gradients too, chunk by chunk while each chunk's logits
  exist (the backward of a sum only scales them), so no pass holds more than one chunk of logits.

Per step the head costs one matmul per valid token (the loss pass) plus three per selected token,
against HF's three per token on a B x T x V tensor. Logits always come out of the matmul in
float32 (never rounded to bf16 first) and the loss math is float32; the matmul inputs run in the
autocast dtype when autocast is on, else in the weight's dtype. The matmuls are library calls;
the element-wise work on each chunk of logits (log-sum-exp, softmax gradient) is one function
per pass, run as is (``backend="torch"``) or fused by ``torch.compile`` (``"compiled"``, the
default on CUDA, where those passes over float32 logits dominate). No step inside the head waits
for the device: chunk boundaries come from shapes.

Layout: :mod:`~slm.head.output` (:class:`OutputHead`: the architecture's logits and chunk sizes),
:mod:`~slm.head.backend` (which backend a head runs, chosen in one place), :mod:`~slm.head.passes`
(the loss and training passes),
:mod:`~slm.head.chunks` (the element-wise chunk math, the ``torch`` backend),
:mod:`~slm.head.compiled` (the same math through ``torch.compile``), :mod:`~slm.head.matmul`
(float32-output matrix products), :mod:`~slm.head.fused` (``backend="triton"``: launches and the autograd
op) over :mod:`~slm.head.kernels` (the Triton loss and gradient kernels; loaded on first use).
"""

from slm.head.backend import chunk_kernels, resolve_backend
from slm.head.chunks import grad_chunk, loss_chunk
from slm.head.output import BACKENDS, CHUNK_ELEMENTS, OutputHead
from slm.head.passes import full_logits_rows_loss, row_losses, selected_rows_loss

__all__ = [
    "BACKENDS",
    "CHUNK_ELEMENTS",
    "OutputHead",
    "chunk_kernels",
    "full_logits_rows_loss",
    "grad_chunk",
    "resolve_backend",
    "loss_chunk",
    "row_losses",
    "selected_rows_loss",
]
