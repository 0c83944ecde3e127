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


def _has_bool_index(args) -> bool:
    for a in args:
        if isinstance(a, (list, tuple)) and any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in a):
            return True
    return False


def _pageable_to_gpu(packet, args, kwargs) -> bool:
    src, dst = (args[0], kwargs.get("device")) if packet == aten._to_copy else (args[1], args[0].device)
    return str(dst).startswith("cuda") and src.device.type == "cpu" and not src.is_pinned()


class HostSyncs(TorchDispatchMode):
    """Counts the ops that make the host wait for a GPU: reading a value (``item``, ``int``), a
    copy to the CPU (``.cpu()`` included, which on a CPU tensor dispatches nothing), a copy to the
    GPU from pageable memory, data-dependent shapes (``nonzero``, boolean indexing,
    ``masked_select``), and asking the driver for free memory. On CPU nothing waits, but the same
    ops run: their count is what a GPU step would wait for."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []
        self._mem_get_info = None

    def __enter__(self):
        self._mem_get_info, self._cpu = torch.cuda.mem_get_info, torch.Tensor.cpu

        def counted(*args, **kwargs):
            self.ops.append("torch.cuda.mem_get_info")
            return self._mem_get_info(*args, **kwargs)

        def cpu(t, *args, **kwargs):
            if t.device.type == "cpu":  # a no-op that dispatches nothing here; on a GPU, the copy below
                self.ops.append("copy to cpu")
            return self._cpu(t, *args, **kwargs)

        torch.cuda.mem_get_info, torch.Tensor.cpu = counted, cpu
        return super().__enter__()

    def __exit__(self, *exc):
        torch.cuda.mem_get_info, torch.Tensor.cpu = self._mem_get_info, self._cpu
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func._overloadpacket
        name = None
        if packet in (aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten.unique_consecutive,
                      aten._unique2):  # fmt: skip
            name = str(packet)
        elif packet in (aten.index, aten.index_put, aten.index_put_) and _has_bool_index(args):
            name = f"{packet} with a boolean index"
        elif packet == aten._to_copy and str(kwargs.get("device")) == "cpu":
            name = "copy to cpu"
        elif packet in (aten._to_copy, aten.copy_) and _pageable_to_gpu(packet, args, kwargs):
            name = "pageable copy to the GPU"
        if name is not None:
            self.ops.append(name)
        return func(*args, **kwargs)
