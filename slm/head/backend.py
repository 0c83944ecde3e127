"""Which backend a head runs, chosen where every backend can be seen: the torch chunk functions, their
``torch.compile``d twins, or the Triton kernels (which check themselves on first use)."""

from __future__ import annotations

from slm.head import fused
from slm.head.chunks import grad_chunk, loss_chunk
from slm.head.compiled import compiled_kernels
from slm.head.output import BACKENDS, OutputHead


def resolve_backend(head: OutputHead) -> str:
    """The backend ``head`` runs: ``auto`` is triton on CUDA where Triton is installed and its kernels pass
    their first-use check (:func:`slm.head.fused.self_check`), else compiled on CUDA (with a warning when the
    check failed), torch elsewhere; an explicit ``triton`` it cannot run or trust is an error."""
    if head.backend not in BACKENDS:
        raise ValueError(f"head backend must be one of {BACKENDS}, got {head.backend!r}")
    device = head.weight.device
    if head.backend == "auto":
        if device.type == "cuda":
            return fused.auto_backend(head) if fused.unavailable(device) is None else "compiled"
        return "torch"
    if head.backend == "triton":
        if why := fused.unavailable(device) or fused.self_check(head):
            raise ValueError(f"head_backend=triton: {why}")
    return head.backend


def chunk_kernels(head: OutputHead):
    """The element-wise chunk functions (score, grad) of the torch or compiled backend."""
    return compiled_kernels() if resolve_backend(head) == "compiled" else (loss_chunk, grad_chunk)
