"""The ``triton`` head backend: the loss pass and the selected rows' gradients as fused kernels.

Scoring (:func:`score`) writes only each row's loss and log-sum-exp (the logits stay on chip). The
training op (:class:`FusedRowsCE`) does nothing in its forward when the loss pass already gave
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
import warnings

import torch
from torch import Tensor

from slm.head.matmul import addmm_f32_, mm_f32, no_autocast
from slm.head.output import OutputHead

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


_CHECKED: dict = {}  # (device, dtype, bias, softcap, scale) -> None (the kernels agree) or why not
_WARNED: set = set()  # (device, why) already said by auto_backend
# The self-check's tolerances by compute dtype: the kernels against float32 math on the same rounded operands.
SELF_CHECK_TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def self_check(head) -> str | None:
    """The first time a process runs the kernels on a device for a (compute dtype, bias, soft-cap)
    combination, compare them on a small problem with plain float32 math: losses and log-sum-exps of every
    loss-pass variant a process may launch (plain, with hits as evals ask, with entropy as GRPO and the entropy
    scores ask, with both), the hits and entropies themselves, and the hidden, weight and bias gradients.
    Returns None when they agree, else why not (a compile or resource error, or a mismatch); the answer is
    kept for the process."""
    dtype = head.compute_dtype()
    key = (str(head.weight.device), dtype, head.bias is not None, bool(head.softcap), float(head.scale))
    if key not in _CHECKED:
        try:
            with torch.inference_mode(False), torch.enable_grad():  # it may first run inside a no-grad loss pass
                _CHECKED[key] = _compare(head, dtype)
        except Exception as e:  # a compile error, out of resources, a launch failure: the kernels are not usable
            _CHECKED[key] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else e}"
    return _CHECKED[key]


def _compare(head, dtype: torch.dtype) -> str | None:
    device = head.weight.device
    g = torch.Generator(device="cpu").manual_seed(0)
    n, vocab, width = 37, 301, 64  # not multiples of any tile: the ragged edges run too
    make = lambda *shape: (torch.randn(*shape, generator=g) * 0.5).to(device)
    weight = make(vocab, width).to(dtype)
    bias = make(vocab).float() if head.bias is not None else None
    small = OutputHead(weight, bias, scale=head.scale, softcap=head.softcap, backend="triton")
    hidden, targets = make(n, width).to(dtype), torch.randint(0, vocab, (n,), generator=g).to(device)
    row_weight = torch.rand(n, generator=g).to(device)
    with no_autocast(device.type):
        variants = {(hits, ent): loss_pass(small, hidden, targets, hits, ent) for hits in (0, 1) for ent in (0, 1)}
        h, w = hidden.detach().clone().requires_grad_(True), weight.detach().clone().requires_grad_(True)
        b = None if bias is None else bias.detach().clone().requires_grad_(True)
        total, _ = FusedRowsCE.apply(h, w, b, targets, None, None, row_weight, small)
        total.backward()
        # the reference: float32 math on the same (rounded) operands
        hr, wr = hidden.float().requires_grad_(True), weight.float().requires_grad_(True)
        br = None if bias is None else bias.clone().requires_grad_(True)
        z = hr @ wr.t() + (br if br is not None else 0.0)
        z = z * small.scale
        if small.softcap:
            z = small.softcap * torch.tanh(z / small.softcap)
        ref_lse = torch.logsumexp(z, dim=-1)
        ref_loss = ref_lse - z.gather(1, targets[:, None]).squeeze(1)
        (ref_loss * row_weight).sum().backward()
        z = z.detach()
        ref_entropy = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)
        top2 = z.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 1e-2 * top2[:, 0].abs().clamp(min=1.0)  # hits where no near-tie
    tol = SELF_CHECK_TOLERANCE.get(dtype, 5e-2)
    pairs = [("hidden gradient", h.grad, hr.grad), ("weight gradient", w.grad, wr.grad)]
    if b is not None:
        pairs.append(("bias gradient", b.grad, br.grad))
    for (hits, ent), (loss, lse, hit, entropy) in variants.items():
        variant = " (with hits)" * hits + " (with entropy)" * ent
        pairs += [(f"loss{variant}", loss, ref_loss), (f"log-sum-exp{variant}", lse, ref_lse)]
        if ent:
            pairs.append((f"entropy{variant}", entropy, ref_entropy))
        if hits and not torch.equal(hit[clear], (z.argmax(-1) == targets)[clear]):
            return f"its hits{variant} differ from float32 math's argmax"
    for name, ours, ref in pairs:
        err = (ours.float() - ref.detach()).abs().max().item()
        scale = ref.detach().abs().max().item() + 1e-6
        if not err <= tol * scale:  # also catches NaN
            return f"its {name} differs from float32 math by {err:.3g} (tolerance {tol * scale:.3g})"
    return None


def auto_backend(head) -> str:
    """What ``head_backend=auto`` runs on CUDA: triton when its kernels pass :func:`self_check` here, else
    the compiled backend, with one warning naming why."""
    why = self_check(head)
    if why is None:
        return "triton"
    if (str(head.weight.device), why) not in _WARNED:
        _WARNED.add((str(head.weight.device), why))
        warnings.warn(
            f"the triton head backend failed its first-use check on {head.weight.device} ({why}); this process "
            "runs the compiled backend instead (same results, slower). Please report it on the project's issue tracker "
            "with the output of `bash scripts/gpu_check.sh OUT` (GPU, torch and triton versions); head_backend=triton "
            "makes it an error",
            RuntimeWarning,
            stacklevel=3,
        )
    return "compiled"


def _interpreter_blocks() -> dict:
    # Small tiles: the interpreter runs every op in NumPy, and tests use small shapes.
    return dict(BLOCK_N=16, BLOCK_V=32, BLOCK_H=16)


_TUNED: dict = {}
# (BLOCK_N, BLOCK_V, BLOCK_H, num_warps, num_stages) the autotuner tries on a GPU, by compute dtype.
# scripts/kernel_compile_check.py compiles every one for sm_80 and sm_90a with every flag set (bias, soft-cap,
# hits, entropy) and requires zero spill bytes: a [BLOCK_N, BLOCK_V] float32 tile and its [BLOCK_N, BLOCK_H]
# / [BLOCK_H, BLOCK_V] operands over 32 x num_warps threads must leave room for the online softmax's
# temporaries. float32 operands take twice the registers of 16-bit ones: one tile shape fits.
AUTOTUNE_CONFIGS = {
    "16-bit": (
        (64, 128, 32, 8, 3),
        (64, 128, 32, 8, 4),
        (128, 64, 32, 8, 3),
        (64, 64, 64, 8, 3),
        (32, 128, 32, 4, 3),
        (64, 64, 32, 4, 3),
    ),
    "float32": ((64, 64, 32, 8, 3),),
}


def config_family(dtype: torch.dtype) -> str:
    return "float32" if dtype == torch.float32 else "16-bit"


def _launcher(name: str, grid_of, dtype: torch.dtype):
    """``kernel[grid](...)`` with tile sizes autotuned per (V, H) on a GPU among the configs of the compute
    dtype's family, fixed under the interpreter."""
    kernel = getattr(kernels, name)
    if interpreting():
        return lambda *args, **kw: kernel[grid_of(_interpreter_blocks())](*args, **kw, **_interpreter_blocks())
    family = config_family(dtype)
    if (name, family) not in _TUNED:
        configs = [
            triton.Config(dict(BLOCK_N=n, BLOCK_V=v, BLOCK_H=h), num_warps=w, num_stages=s)
            for n, v, h, w, s in AUTOTUNE_CONFIGS[family]
        ]
        _TUNED[name, family] = triton.autotune(configs, key=["V", "H", "HAS_BIAS", "SOFTCAP"])(kernel)
    tuned = _TUNED[name, family]
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
def loss_pass(head, hidden: Tensor, targets: Tensor, hits: bool = False, entropy: bool = False):
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
        launch = _launcher("loss_kernel", lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),), dtype)
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
            loss, lse, _, _ = loss_pass(head, hidden.detach(), targets)
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

            launch_slice = _launcher("grad_kernel", grid, dtype)
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
                BF16_OUT=dtype == torch.bfloat16 and interpreting(),  # the GPU's own conversion rounds to even
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
