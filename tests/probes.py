"""Dispatch-level probes for tests: matmul FLOPs (in-place variants included) and host syncs."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
_MATMULS = {aten.mm, aten.addmm, aten.addmm_, aten.bmm, aten.baddbmm, aten.baddbmm_}


class MatmulFlops(TorchDispatchMode):
    """Counts 2 x m x k x n for every matrix product dispatched inside the context."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func._overloadpacket
        if packet in _MATMULS:
            a, b = (args[0], args[1]) if packet in (aten.mm, aten.bmm) else (args[1], args[2])
            self.flops += 2 * a.numel() * b.shape[-1]
        return func(*args, **(kwargs or {}))
