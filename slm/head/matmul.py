"""Matrix products with float32 results whatever the input dtype (logits are never rounded to bf16)."""

from __future__ import annotations

import torch
from torch import Tensor

_OUT_DTYPE_WORKS: dict = {}  # (device type, dtype) -> whether mm/addmm(out_dtype=float32) are right there


def mm_f32(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` with a float32 result, accumulating in float32 whatever the input dtype."""
    if a.dtype == torch.float32:
        return a @ b
    if _out_dtype_works(a):
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def addmm_f32_(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """``acc += a @ b`` into the float32 ``acc``, accumulating in float32 whatever the input dtype.

    A bf16/fp16 product goes straight into ``acc`` where the device has
    ``addmm(..., out_dtype=float32, out=acc)`` (CUDA), so no V x H temporary is written and read
    back per chunk; elsewhere it is formed in float32 and added.
    """
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif _out_dtype_works(a):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc += mm_f32(a, b)


def _out_dtype_works(a: Tensor) -> bool:
    """Whether ``mm``/``addmm`` with ``out_dtype=float32`` (accumulating into ``out``) give the right
    numbers for ``a``'s device and dtype: checked once per process on a small product, so a torch
    build or device without them (or with a wrong one) falls back instead of failing or drifting."""
    key = (a.device.type, a.dtype)
    if key not in _OUT_DTYPE_WORKS:
        ok = False
        if a.is_cuda:  # CPU builds have no mm(out_dtype=) kernels
            g = torch.Generator(device="cpu").manual_seed(0)
            x, y, acc = (torch.randn(s, generator=g).to(a.device) for s in ((64, 48), (48, 40), (64, 40)))
            x, y = x.to(a.dtype), y.to(a.dtype)
            product = x.float() @ y.float()
            expected = acc + product
            try:
                mm = torch.mm(x, y, out_dtype=torch.float32)
                torch.addmm(acc, x, y, out_dtype=torch.float32, out=acc)
                ok = bool(torch.allclose(mm, product, atol=1e-3, rtol=1e-3)) and bool(
                    torch.allclose(acc, expected, atol=1e-3, rtol=1e-3)
                )
            except (RuntimeError, TypeError):  # no out_dtype= for this device or dtype
                pass
        _OUT_DTYPE_WORKS[key] = ok
    return _OUT_DTYPE_WORKS[key]


def no_autocast(device_type: str):
    # The head casts explicitly: autocast would round the float32 logits' inputs and outputs.
    return torch.autocast(device_type, enabled=False)
