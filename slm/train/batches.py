"""Which rows each step reads (:class:`BatchStream`: deterministic, resumable, the same rows at any
process count) and how they reach the device."""

from __future__ import annotations

import torch

from slm.selection import to_device_async


def fetch(ds, idx: list[int]) -> dict:
    """Rows ``idx`` of a packed split as CPU tensors (counting needs them on the host anyway).
    A split in datasets' torch format (as the Trainer sets it) skips Python lists altogether."""
    return {k: v if torch.is_tensor(v) else torch.as_tensor(v) for k, v in ds[idx].items()}


def to_device(batch: dict, device) -> dict:
    """A batch on ``device``, queued from pinned memory on a GPU (a pageable copy would make the host wait)."""

    return {k: to_device_async(v, device) for k, v in batch.items()}


class BatchStream:
    """Deterministic, resumable batches: global micro-batch ``j`` is a fixed slice of an endless
    stream of seeded per-epoch permutations; process ``r`` takes the ``r``-th share of it.

    The global batch of W processes x b rows is the same rows as 1 process x W*b, so runs with
    different process counts see identical data.
    """

    def __init__(self, n: int, batch_size: int, world: int, rank: int, seed: int):
        if n == 0:
            raise ValueError("the training split is empty")
        self.n, self.b, self.world, self.rank, self.seed = n, batch_size, world, rank, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g)}
        return self._perms[epoch]

    def indices(self, j: int) -> list[int]:
        start = (j * self.world + self.rank) * self.b
        return [int(self._perm(p // self.n)[p % self.n]) for p in range(start, start + self.b)]
