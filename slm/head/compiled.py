"""The ``compiled`` backend: :mod:`slm.head.chunks` through ``torch.compile`` (the CUDA default)."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from slm.head.chunks import grad_chunk, loss_chunk

_COMPILED: tuple | None = None
_COMPILE_FAILED: str | None = None  # why torch.compile could not build the chunk functions here


def compiled_kernels():
    """``(loss_chunk, grad_chunk)``, compiled once per process."""
    global _COMPILED
    if _COMPILED is None:
        # Not fullgraph: past dynamo's recompile limit (many head configurations in one process) a
        # chunk function falls back to eager, correct and slower, instead of failing the run. That
        # the functions compile whole is a test (tests/head/test_backends.py, zero graph breaks).
        _COMPILED = tuple(_compiled_call(fn) for fn in (loss_chunk, grad_chunk))
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
