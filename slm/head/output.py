"""How an architecture turns hidden states into logits, and how the head runs on a device."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from slm.head.matmul import mm_f32

# Float32 logits per chunk, by device and pass. CPU: 2**22 elements = 16 MiB (131 rows of a 32k
# vocabulary) stays in cache-friendly sizes. GPU: large enough that launch overhead does not
# dominate; training holds the logits and their gradient at once, so it gets half the budget.
CHUNK_ELEMENTS = {"cpu": {"score": 2**22, "train": 2**22}, "cuda": {"score": 2**27, "train": 2**26}}
BACKENDS = ("auto", "torch", "compiled", "triton")
_FREE_BUDGET: dict = {}  # (device, pass) -> chunk elements that fit in free memory, read once per process


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
    backend: str = "auto"  # auto | torch | compiled | triton: see slm.head.backend

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    def chunk_rows(self, kind: str = "score") -> int:
        """Rows per chunk: the budget over the vocabulary; on CUDA a multiple of 128 that also fits
        in a quarter of the memory free when first asked (read once: a driver call per forward
        would cost a sync)."""
        device = self.weight.device
        budget = self.chunk_elements or CHUNK_ELEMENTS.get(device.type, CHUNK_ELEMENTS["cpu"])[kind]
        if device.type == "cuda" and not self.chunk_elements:
            key = (str(device), kind)
            if key not in _FREE_BUDGET:
                free, _ = torch.cuda.mem_get_info(device)
                _FREE_BUDGET[key] = min(budget, free // (4 * 4 * 2))  # float32, ~four chunk buffers, half of free
            budget = _FREE_BUDGET[key]
        rows = max(1, budget // self.vocab_size)
        return max(128, rows // 128 * 128) if device.type == "cuda" else rows

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
