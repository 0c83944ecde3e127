"""The output layer and cross-entropy, computed without a B x T x V tensor.

Two operations, both over *rows* (one hidden state per predicted token):

* :func:`score_rows` - no grad, chunked: each row's loss and log-sum-exp. Every valid token
  goes through it, because selection needs the current model's loss on all of them.
* :func:`selected_rows_loss` - the grad-enabled (weighted) summed loss of the selected rows only.
  By default its forward computes the gradients too, chunk by chunk while each chunk's logits
  exist (the backward of a sum only scales them), so no pass holds more than one chunk of logits.

Per step the head costs one matmul per valid token (scoring) plus three per selected token,
against HF's three per token on a B x T x V tensor. Logits always come out of the matmul in
float32 (never rounded to bf16 first) and the loss math is float32; the matmul inputs run in the
autocast dtype when autocast is on, else in the weight's dtype. The matmuls are library calls;
the element-wise work on each chunk of logits (log-sum-exp, softmax gradient) is one function
per pass, run as is (``backend="torch"``) or fused by ``torch.compile`` (``"compiled"``, the
default on CUDA, where those passes over float32 logits dominate). No step inside the head waits
for the device: chunk boundaries come from shapes.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# Float32 logits per chunk, by device and pass. CPU: 2**22 elements = 16 MiB (131 rows of a 32k
# vocabulary) stays in cache-friendly sizes. GPU: large enough that launch overhead does not
# dominate; training holds the logits and their gradient at once, so it gets half the budget.
CHUNK_ELEMENTS = {"cpu": {"score": 2**22, "train": 2**22}, "cuda": {"score": 2**27, "train": 2**26}}
BACKENDS = ("auto", "torch", "compiled")


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
    chunk_elements: int | None = None  # None: by device and pass, see CHUNK_ELEMENTS
    backend: str = "auto"  # auto (compiled on CUDA, torch elsewhere) | torch | compiled

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    def chunk_rows(self, kind: str = "score") -> int:
        """Rows per chunk: the budget over the vocabulary; on CUDA a multiple of 128 that also fits
        in a quarter of the free memory (logits plus their temporaries)."""
        device = self.weight.device.type
        budget = self.chunk_elements or CHUNK_ELEMENTS.get(device, CHUNK_ELEMENTS["cpu"])[kind]
        if device == "cuda" and not self.chunk_elements:
            free, _ = torch.cuda.mem_get_info(self.weight.device)
            budget = min(budget, free // (4 * 4 * 2))  # float32, about four chunk-sized buffers, half of free
        rows = max(1, budget // self.vocab_size)
        return max(128, rows // 128 * 128) if device == "cuda" else rows

    def compute_dtype(self) -> torch.dtype:
        """The matmul input dtype: autocast's when it is on for the weight's device, else the weight's."""
        device = self.weight.device.type
        if torch.is_autocast_enabled(device):
            return torch.get_autocast_dtype(device)
        return self.weight.dtype

    def raw_logits(self, h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """Pre-cap logits in float32; ``h`` and ``weight`` are already in the compute dtype."""
        z = mm_f32(h, weight.t())
        if bias is not None:
            z += bias.float()
        return z * self.scale if self.scale != 1.0 else z

    def kernels(self):
        """The element-wise chunk functions of this head's backend."""
        backend = self.backend
        if backend == "auto":
            backend = "compiled" if self.weight.device.type == "cuda" else "torch"
        if backend not in ("torch", "compiled"):
            raise ValueError(f"head backend must be one of {BACKENDS}, got {self.backend!r}")
        return _compiled() if backend == "compiled" else (score_chunk, grad_chunk)


def mm_f32(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` with a float32 result, accumulating in float32 whatever the input dtype."""
    if a.dtype == torch.float32:
        return a @ b
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError):  # a torch without mm(out_dtype=) for this dtype
            pass
    return a.float() @ b.float()


_ADDMM_IN_PLACE: dict = {}  # device type -> whether addmm(out_dtype=float32, out=acc) is right there


def addmm_f32_(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """``acc += a @ b`` into the float32 ``acc``, accumulating in float32 whatever the input dtype.

    A float32 product is ``addmm_``; a bf16/fp16 one goes straight into ``acc`` where the device
    has ``addmm(..., out_dtype=float32, out=acc)`` (CUDA), so no V x H temporary is written and
    read back per chunk. That path is taken only after a one-time check on the device that it
    gives ``acc + a @ b``; otherwise the product is formed in float32 and added.
    """
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif _addmm_in_place_works(a):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc += mm_f32(a, b)


def _addmm_in_place_works(a: Tensor) -> bool:
    key = (a.device.type, a.dtype)
    if key not in _ADDMM_IN_PLACE:
        ok = False
        if a.is_cuda:
            g = torch.Generator(device="cpu").manual_seed(0)
            x, y, acc = (torch.randn(s, generator=g).to(a.device) for s in ((64, 48), (48, 40), (64, 40)))
            expected = acc + x.to(a.dtype).float() @ y.to(a.dtype).float()
            try:
                torch.addmm(acc, x.to(a.dtype), y.to(a.dtype), out_dtype=torch.float32, out=acc)
                ok = torch.allclose(acc, expected, atol=1e-3, rtol=1e-3)
            except (RuntimeError, TypeError):  # no addmm(out_dtype=) for this device or dtype
                pass
        _ADDMM_IN_PLACE[key] = ok
    return _ADDMM_IN_PLACE[key]


def _no_autocast(device_type: str):
    # The head casts explicitly: autocast would round the float32 logits' inputs and outputs.
    return torch.autocast(device_type, enabled=False)


# --- element-wise chunk functions: pure, fixed-shape, no graph breaks (torch.compile fuses them) ---


def score_chunk(raw: Tensor, t: Tensor, softcap: float | None, hits: bool, entropy: bool = False):
    """(loss, lse, hit or None, entropy or None) of each row of one chunk of float32 pre-cap logits."""
    z = softcap * torch.tanh(raw / softcap) if softcap else raw
    lse = torch.logsumexp(z, dim=-1)
    loss = lse - z.gather(1, t[:, None]).squeeze(1)
    ent = lse - (torch.softmax(z, dim=-1) * z).sum(-1) if entropy else None  # H = lse - E_p[z]
    return loss, lse, (z.argmax(-1) == t) if hits else None, ent


def grad_chunk(raw: Tensor, t: Tensor, lse: Tensor | None, row_scale: Tensor | None, softcap: float | None,
               scale: float):  # fmt: skip
    """(d(sum of row_scale * loss)/d(pre-scale logits), loss) of one chunk, both float32."""
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
    return g, loss


_COMPILED: tuple | None = None
_COMPILE_FAILED: str | None = None  # why torch.compile could not build the chunk functions here


def _compiled():
    global _COMPILED
    if _COMPILED is None:
        # Not fullgraph: past dynamo's recompile limit (many head configurations in one process) a
        # chunk function falls back to eager, correct and slower, instead of failing the run. That
        # the functions compile whole is a test (tests/test_model.py, zero graph breaks).
        _COMPILED = tuple(_compiled_call(fn) for fn in (score_chunk, grad_chunk))
    return _COMPILED


def _compiled_call(fn):
    """``torch.compile(fn)`` with the row dimension of its tensor arguments symbolic: a step's row
    counts and its last chunk's size vary from step to step, and one graph serves them all instead
    of a recompile per size (the vocabulary stays a compile-time constant). Where compiling fails
    (no C++ compiler, a GPU too old for Triton), it warns once and runs ``fn`` eagerly: the same
    numbers, only slower."""
    compiled = torch.compile(fn, dynamic=False)

    def call(*args):
        global _COMPILE_FAILED
        if _COMPILE_FAILED is None:
            for a in args:
                if isinstance(a, Tensor):
                    torch._dynamo.maybe_mark_dynamic(a, 0)
            try:
                return compiled(*args)
            except torch._dynamo.exc.BackendCompilerFailed as e:
                _COMPILE_FAILED = str(e).strip().splitlines()[0]
                warnings.warn(
                    f"slm's compiled head backend is unavailable here, running the head's element-wise math "
                    f"eagerly (same results, slower; head_backend=torch silences this): {_COMPILE_FAILED}",
                    stacklevel=2,
                )
        return fn(*args)

    return call


@torch.no_grad()
def score_rows(head: OutputHead, hidden: Tensor, targets: Tensor, hits: bool = False, entropy: bool = False):
    """Per-row cross-entropy and log-sum-exp (float32), one chunk of logits at a time.

    With ``hits=True`` also returns whether each row's target is the arg-max prediction, and with
    ``entropy=True`` (after it) the entropy of each row's predictive distribution.
    """
    n = hidden.shape[0]
    loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
    lse = torch.empty_like(loss)
    hit = torch.empty(n, dtype=torch.bool, device=hidden.device) if hits else None
    ent = torch.empty_like(loss) if entropy else None
    dtype = head.compute_dtype()
    step = head.chunk_rows("score")
    score, _ = head.kernels()
    with _no_autocast(hidden.device.type):
        weight = head.weight.to(dtype)
        for i in range(0, n, step):
            raw = head.raw_logits(hidden[i : i + step].to(dtype), weight, head.bias)
            loss[i : i + step], lse[i : i + step], h, e = score(raw, targets[i : i + step], head.softcap, hits, entropy)
            if hits:
                hit[i : i + step] = h
            if entropy:
                ent[i : i + step] = e
    return (loss, lse) + ((hit,) if hits else ()) + ((ent,) if entropy else ())


class _SelectedRowsCE(torch.autograd.Function):
    """Weighted sum of the rows' cross-entropies, ``sum_i w_i * ce_i``.

    Eager mode (the default): the gradient of a sum is the same for every row up to one scalar,
    so the forward computes it chunk by chunk while the logits are at hand (3 matmuls per chunk:
    logits, d hidden, d weight; the weight's only when it requires grad) and the backward scales
    it in place. Deferred mode (fp16): the backward recomputes each chunk's logits and computes
    the gradients with the incoming scale already applied, so a loss scaler's factor reaches them
    before the float16 matmuls and small gradients do not underflow.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, lse, row_weight, head, defer):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n = hidden.shape[0]
        dtype = head.compute_dtype()
        ctx.head, ctx.defer, ctx.dtype = head, defer, dtype
        ctx.hidden_dtype = hidden.dtype
        loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
        step = head.chunk_rows("train")
        score, grad = head.kernels()
        with _no_autocast(hidden.device.type):
            w = weight.to(dtype)
            if defer:
                row_lse = torch.empty_like(loss)
                for i in range(0, n, step):
                    raw = head.raw_logits(hidden[i : i + step].to(dtype), w, bias)
                    loss[i : i + step], lse_i, _, _ = score(raw, targets[i : i + step], head.softcap, False, False)
                    row_lse[i : i + step] = lse_i if lse is None else lse[i : i + step]
                ctx.save_for_backward(hidden, weight, bias, targets, row_lse, row_weight)
            else:
                grad_h = torch.empty_like(hidden) if need_h else None
                grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
                grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
                for i in range(0, n, step):
                    h = hidden[i : i + step].to(dtype)
                    raw = head.raw_logits(h, w, bias)
                    rw = None if row_weight is None else row_weight[i : i + step]
                    row_lse = None if lse is None else lse[i : i + step]
                    g, loss[i : i + step] = grad(raw, targets[i : i + step], row_lse, rw, head.softcap, head.scale)
                    _accumulate(g, h, w, grad_h, grad_w, grad_b, i)
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
                "forward again for a second backward."
            )
        ctx.consumed = True
        _weight, grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = grad_sum.float()
        return (
            None if grad_h is None else grad_h.mul_(scale.to(grad_h.dtype)),
            None if grad_w is None else grad_w.mul_(scale),
            None if grad_b is None else grad_b.mul_(scale),
            None, None, None, None, None,
        )  # fmt: skip


def _accumulate(g: Tensor, h: Tensor, w: Tensor, grad_h, grad_w, grad_b, i: int) -> None:
    """Add one chunk's contribution: d hidden rows, d weight (in place), d bias."""
    g_c = g.to(w.dtype)  # the gradient matmuls run in the compute dtype, like the logits'
    if grad_h is not None:
        grad_h[i : i + g.shape[0]] = mm_f32(g_c, w).to(grad_h.dtype)
    if grad_w is not None:
        addmm_f32_(grad_w, g_c.t(), h)
    if grad_b is not None:
        grad_b += g.sum(0)


def _deferred_grads(ctx, grad_sum: Tensor):
    hidden, weight, bias, targets, row_lse, row_weight = ctx.saved_tensors
    head, dtype = ctx.head, ctx.dtype
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    grad_h = torch.empty(hidden.shape, dtype=ctx.hidden_dtype, device=hidden.device) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
    grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
    scale = grad_sum.float().expand(hidden.shape[0])
    if row_weight is not None:
        scale = scale * row_weight
    step = head.chunk_rows("train")
    _, grad = head.kernels()
    with _no_autocast(hidden.device.type):
        w = weight.to(dtype)
        for i in range(0, hidden.shape[0], step):
            h = hidden[i : i + step].to(dtype)
            raw = head.raw_logits(h, w, bias)
            g, _ = grad(raw, targets[i : i + step], row_lse[i : i + step], scale[i : i + step], head.softcap,
                        head.scale)  # fmt: skip
            _accumulate(g, h, w, grad_h, grad_w, grad_b, i)
    return grad_h, grad_w, grad_b


def selected_rows_loss(
    head: OutputHead,
    hidden: Tensor,
    targets: Tensor,
    lse: Tensor | None = None,
    row_weight: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``(sum of the rows' losses (weighted by row_weight), per-row losses [K])``; the sum
    carries gradients to ``hidden`` and the head's weight and bias, the per-row losses are
    detached.

    ``lse`` from :func:`score_rows` saves the log-sum-exp reduction; the logits of the
    selected rows are recomputed either way (the scoring pass keeps no logits).
    """
    if not torch.is_grad_enabled():
        loss = score_rows(head, hidden, targets)[0]
        return (loss.sum() if row_weight is None else (loss * row_weight).sum()), loss
    defer = head.compute_dtype() == torch.float16
    rw = None if row_weight is None else row_weight.float()
    return _SelectedRowsCE.apply(hidden, head.weight, head.bias, targets, lse, rw, head, defer)


def full_logits_rows_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-row cross-entropy from already computed logits (the fallback path), float32."""
    return F.cross_entropy(logits.float(), targets, reduction="none")
