"""Matrix products with float32 results whatever the input dtype (logits are never rounded to bf16)."""

from __future__ import annotations

import torch
from torch import Tensor


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


def no_autocast(device_type: str):
    # The head casts explicitly: autocast would round the float32 logits' inputs and outputs.
    return torch.autocast(device_type, enabled=False)
