"""What the training loop asks of a reference: :class:`RefSource` gives each batch its reference values
(none, stored columns, or a live, possibly evolving, model)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from slm.model import token_losses
from slm.reference.store import StoredColumns, StoreError


def check_evolution(every, ema) -> None:
    """An evolving reference's schedule: refreshed every ``every >= 1`` steps, ``ema`` in [0, 1)."""
    if int(every) < 1:
        raise ValueError(f"reference.evolve_every must be >= 1 steps, got {every}")
    if not 0.0 <= float(ema) < 1.0:
        raise ValueError(f"reference.evolve_ema must be in [0, 1), got {ema}")


@dataclass
class RefSource:
    """Where reference values come from: none, a store (``ref_loss``, ``ref_entropy`` columns read
    by row), or a live model. ``entropy``: the selector also needs the reference's per-token entropy.

    An evolving reference (``evolve_every`` steps; Token Cleaning's self-evolving variant) is a live
    one refreshed from the training model on that schedule: copied (``evolve_ema=0``) or moved
    towards it, ``ref = ema * ref + (1 - ema) * model``. Its cost: a forward per step (live scoring)."""

    kind: str = "none"  # none | stored | live
    model: nn.Module | None = None
    scores_dir: str | None = None  # where stored columns came from
    entropy: bool = False
    store: StoredColumns | None = None
    error: str | None = field(default=None, repr=False)  # a damaged shard found while reading (see stored)
    evolve_every: int | None = None
    evolve_ema: float = 0.0
    refreshes: int = 0

    def __post_init__(self):
        if self.evolve_every is not None:
            if self.kind != "live":
                raise ValueError("reference.evolve_every needs a reference model scored live")
            check_evolution(self.evolve_every, self.evolve_ema)

    @torch.no_grad()
    def maybe_evolve(self, step: int, model: nn.Module) -> bool:
        """After optimizer step ``step``: refresh the reference from ``model`` if its schedule says so."""
        if not self.evolve_every or step % int(self.evolve_every):
            return False
        ours, theirs = dict(self.model.named_parameters()), dict(model.named_parameters())
        if ours.keys() != theirs.keys() or any(ours[k].shape != theirs[k].shape for k in ours):
            raise ValueError(
                "reference.evolve_every: the reference and the training model differ in architecture; "
                "an evolving reference is a copy of the training model"
            )
        for k, p in ours.items():
            p.mul_(self.evolve_ema).add_(theirs[k].detach().to(p.dtype), alpha=1.0 - self.evolve_ema)
        self.refreshes += 1
        return True

    def evolving_state(self) -> dict:
        return {
            "weights": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "refreshes": self.refreshes,
        }

    def load_evolving_state(self, state: dict) -> None:
        self.model.load_state_dict(state["weights"])
        self.refreshes = int(state["refreshes"])

    @property
    def columns(self) -> list[str]:
        return ["ref_loss"] + (["ref_entropy"] if self.entropy else []) if self.kind == "stored" else []

    def stored(self, idx: list[int]) -> dict:
        """The stored columns of rows ``idx`` of the packed split (CPU tensors). A shard that fails its
        check is remembered in ``error`` (zeros returned) so that the caller can stop every process
        at once (a process that raised alone would leave the others waiting)."""
        if self.kind != "stored":
            return {}
        try:
            return {c: self.store.rows(idx, c) for c in self.columns}
        except StoreError as e:
            self.error = self.error or str(e)
            return {c: torch.zeros(len(idx), self.store.meta["block_size"]) for c in self.columns}

    def values(self, batch: dict) -> dict:
        """Keyword arguments for SelectiveLM: ``ref_loss`` (and ``ref_entropy``) of this batch."""
        if self.kind == "stored":
            return {c: batch[c] for c in self.columns}
        if self.kind == "live":
            out = token_losses(
                self.model, batch["input_ids"], batch["labels"], batch["attention_mask"], return_entropy=self.entropy
            )
            return {"ref_loss": out[0], "ref_entropy": out[1]} if self.entropy else {"ref_loss": out}
        return {}
