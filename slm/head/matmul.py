"""Matrix products with float32 results whatever the input dtype (logits are never rounded to bf16).

Two CUDA fast paths, each checked once per process on a small product (a torch build or device
without one, or with a wrong one, must not train on it): ``mm(out_dtype=float32)`` writes float32
logits straight from bf16/fp16 inputs, and ``addmm(out_dtype=float32, out=acc)`` adds a bf16
product into a float32 buffer in place. Where either is missing the product is formed in float32
(``a.float() @ b.float()``, several times slower on a GPU) and a warning says so once.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

_WORKS: dict = {}  # (op, device type, dtype) -> whether the fast path gives the right numbers there


def mm_f32(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` with a float32 result, accumulating in float32 whatever the input dtype."""
    if a.dtype == torch.float32:
        return a @ b
    if fast_path("mm", a):
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def addmm_f32_(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """``acc += a @ b`` into the float32 ``acc``, accumulating in float32 whatever the input dtype.

    A bf16/fp16 product goes straight into ``acc`` where the device has
    ``addmm(..., out_dtype=float32, out=acc)`` (CUDA), so no temporary of ``acc``'s size is written
    and read back; elsewhere it is formed in float32 and added.
    """
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif fast_path("addmm", a):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc += mm_f32(a, b)


def fast_path(op: str, a: Tensor) -> bool:
    """Whether ``op`` (``mm`` or ``addmm``) with ``out_dtype=float32`` gives the right numbers for
    ``a``'s device and dtype (checked once per process; on CPU, whose builds have no such kernels,
    never)."""
    key = (op, a.device.type, a.dtype)
    if key not in _WORKS:
        _WORKS[key] = a.is_cuda and _check(op, a)
        if a.is_cuda and not _WORKS[key]:
            warnings.warn(
                f"slm: this torch build has no CUDA {op}(out_dtype=float32) for {a.dtype} inputs (torch "
                f"{torch.__version__}); the head forms those products in float32 instead, several times slower. "
                "A recent torch (2.9 or later) has it",
                stacklevel=3,
            )
    return _WORKS[key]


def _check(op: str, a: Tensor) -> bool:
    g = torch.Generator(device="cpu").manual_seed(0)
    x, y, acc = (torch.randn(s, generator=g).to(a.device) for s in ((64, 48), (48, 40), (64, 40)))
    x, y = x.to(a.dtype), y.to(a.dtype)
    product = x.float() @ y.float()
    try:
        if op == "mm":
            return bool(torch.allclose(torch.mm(x, y, out_dtype=torch.float32), product, atol=1e-3, rtol=1e-3))
        expected = acc + product
        torch.addmm(acc, x, y, out_dtype=torch.float32, out=acc)
        return bool(torch.allclose(acc, expected, atol=1e-3, rtol=1e-3))
    except (RuntimeError, TypeError):  # no out_dtype= for this op, device or dtype
        return False


def no_autocast(device_type: str):
    # The head casts explicitly: autocast would round the float32 logits' inputs and outputs.
    return torch.autocast(device_type, enabled=False)
