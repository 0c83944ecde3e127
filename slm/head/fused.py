"""The ``triton`` head backend: the scoring pass and the selected rows' gradients as fused kernels.

Scoring (:func:`score`) writes only each row's loss and log-sum-exp (the logits stay on chip). The
training op (:class:`FusedRowsCE`) does nothing in its forward when the scoring pass already gave
the selected rows' losses and log-sum-exps (it scores just those rows otherwise, e.g. for a
``loss_mask``); its backward, when the incoming gradient is known (a loss scaler's factor
included), walks the vocabulary in slices: a kernel recomputes each slice's logits, reuses the
stored log-sum-exp and writes the slice's logit gradient in the compute dtype, then two matmuls
give that slice's weight gradient (written once, final) and add its share of the hidden-state
gradient. Nothing V x H lives from the forward to the backward, and no weight-gradient
accumulator is held across slices.

Runs on CUDA, and on CPU under Triton's interpreter (``TRITON_INTERPRET=1``) for the exactness tests.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from slm.head.matmul import addmm_f32_, mm_f32, no_autocast

# Logit-gradient elements held per vocabulary slice in the backward (compute dtype: 128 MiB in bf16).
SLICE_ELEMENTS = {"cuda": 1 << 26, "cpu": 1 << 20}
_IMPORT_ERROR: str | None = None
try:
    import triton

    from slm.head import kernels
except ImportError as e:  # Triton is optional: the torch and compiled backends need none
    triton = kernels = None
    _IMPORT_ERROR = f"{type(e).__name__}: {e}"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable(device: torch.device) -> str | None:
    """Why the triton backend cannot run on ``device`` here, or None when it can."""
    if triton is None:
        return f"Triton is not installed ({_IMPORT_ERROR}); pip install triton"
    if device.type != "cuda" and not interpreting():
        return f"the triton backend runs on CUDA devices (on {device.type}: only under TRITON_INTERPRET=1, for tests)"
    return None


def _interpreter_blocks() -> dict:
    # Small tiles: the interpreter runs every op in NumPy, and tests use small shapes.
    return dict(BLOCK_N=16, BLOCK_V=32, BLOCK_H=16)


_TUNED: dict = {}


def _launcher(name: str, grid_of):
    """``kernel[grid](...)`` with tile sizes autotuned per (V, H) on a GPU, fixed under the interpreter."""
    kernel = getattr(kernels, name)
    if interpreting():
        return lambda *args, **kw: kernel[grid_of(_interpreter_blocks())](*args, **kw, **_interpreter_blocks())
    if name not in _TUNED:
        configs = [
            triton.Config(dict(BLOCK_N=n, BLOCK_V=v, BLOCK_H=h), num_warps=w, num_stages=s)
            for n, v, h, w, s in (
                (64, 128, 64, 4, 3),
                (128, 128, 64, 8, 3),
                (64, 256, 64, 8, 3),
                (128, 64, 64, 4, 4),
                (64, 64, 128, 4, 3),
            )
        ]
        _TUNED[name] = triton.autotune(configs, key=["V", "H", "HAS_BIAS", "SOFTCAP"])(kernel)
    tuned = _TUNED[name]
    return lambda *args, **kw: tuned[lambda meta: grid_of(meta)](*args, **kw)


def _operands(head, hidden: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor | None]:
    w = head.weight.to(dtype).contiguous()
    b = None if head.bias is None else head.bias.float().contiguous()
    return hidden.to(dtype).contiguous(), w, b


def _flags(head, dtype: torch.dtype) -> dict:
    return dict(
        HAS_BIAS=head.bias is not None, SOFTCAP=bool(head.softcap), UPCAST=interpreting(), IEEE=dtype == torch.float32
    )


@torch.no_grad()
def scoring_pass(head, hidden: Tensor, targets: Tensor, hits: bool = False, entropy: bool = False):
    """(loss, lse, hit or None, entropy or None) of every row, float32, from one fused kernel."""
    n, dtype = hidden.shape[0], head.compute_dtype()
    loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
    lse = torch.empty_like(loss)
    hit = torch.empty(n, dtype=torch.int8, device=hidden.device) if hits else None
    ent = torch.empty_like(loss) if entropy else None
    if n == 0:
        return loss, lse, None if hit is None else hit.bool(), ent
    with no_autocast(hidden.device.type):
        h, w, b = _operands(head, hidden, dtype)
        vocab = w.shape[0]
        launch = _launcher("score_kernel", lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),))
        launch(
            h,
            w,
            w if b is None else b,
            targets.contiguous(),
            loss,
            lse,
            loss if hit is None else hit,
            loss if ent is None else ent,
            n,
            vocab,
            h.shape[1],
            h.stride(0),
            w.stride(0),
            float(head.scale),
            float(head.softcap or 1.0),
            HITS=hits,
            ENTROPY=entropy,
            **_flags(head, dtype),
        )
    return loss, lse, None if hit is None else hit.bool(), ent


class FusedRowsCE(torch.autograd.Function):
    """``sum_i w_i * ce_i`` over rows, its gradients computed in the backward by :mod:`slm.head.kernels`."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, lse, loss, row_weight, head):
        if lse is None or loss is None:  # rows not scored yet (a loss_mask, ratio 1.0): score just these
            loss, lse, _, _ = scoring_pass(head, hidden.detach(), targets)
        ctx.head, ctx.dtype = head, head.compute_dtype()
        ctx.save_for_backward(hidden, weight, bias, targets, lse, row_weight)
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
        hidden, weight, bias, targets, lse, row_weight = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grads = _backward(ctx.head, ctx.dtype, hidden, targets, lse, grad_sum, row_weight, need_h, need_w, need_b)
        return (*grads, None, None, None, None, None)


def _backward(head, dtype, hidden, targets, lse, grad_sum, row_weight, need_h, need_w, need_b):
    k, device = hidden.shape[0], hidden.device
    # The incoming gradient (a loss scale included) in float32, before anything is rounded.
    row_scale = grad_sum.float().expand(k).contiguous() if row_weight is None else grad_sum.float() * row_weight
    grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=device) if need_h else None
    vocab, width = head.weight.shape
    grad_w = torch.empty((vocab, width), dtype=torch.float32, device=device) if need_w else None
    grad_b = torch.empty(vocab, dtype=torch.float32, device=device) if need_b else None
    if k == 0:
        for g in (grad_w, grad_b):
            if g is not None:
                g.zero_()
        return _out(grad_h, hidden), grad_w, grad_b
    with no_autocast(device.type):
        h, w, b = _operands(head, hidden, dtype)
        budget = SLICE_ELEMENTS.get(device.type, SLICE_ELEMENTS["cpu"])
        width_v = max(256, budget // k // 256 * 256)  # a whole number of any tile's vocabulary block
        g_buf = torch.empty((k, min(width_v, vocab)), dtype=dtype, device=device)
        for v0 in range(0, vocab, width_v):
            v1 = min(vocab, v0 + width_v)
            g = g_buf[:, : v1 - v0]

            def grid(meta, span=v1 - v0):
                return triton.cdiv(k, meta["BLOCK_N"]), triton.cdiv(span, meta["BLOCK_V"])

            launch_slice = _launcher("grad_kernel", grid)
            launch_slice(
                h,
                w,
                w if b is None else b,
                targets.contiguous(),
                lse.contiguous(),
                row_scale,
                g,
                k,
                vocab,
                width,
                h.stride(0),
                w.stride(0),
                g.stride(0),
                v0,
                v1,
                float(head.scale),
                float(head.softcap or 1.0),
                BF16_OUT=dtype == torch.bfloat16,
                **_flags(head, dtype),
            )
            if need_w:
                grad_w[v0:v1] = mm_f32(g.t(), h)
            if need_h:
                addmm_f32_(grad_h, g, w[v0:v1])
            if need_b:
                grad_b[v0:v1] = g.sum(0, dtype=torch.float32)
    return _out(grad_h, hidden), grad_w, grad_b


def _out(grad_h, hidden):
    return None if grad_h is None else grad_h.to(hidden.dtype)
