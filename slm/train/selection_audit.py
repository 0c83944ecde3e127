"""What a run's selection kept, by what the data says about its tokens: the selection audit.

At each eval point, over the valid tokens read since the last one (every candidate block's): the share
of clean tokens kept and of junk dropped where the corpus marks its clean text (``clean_mask``: the
built-in corpora; tokens that are neither, such as paragraph breaks and document ends, count in neither
share), the share of each kind of junk dropped where it names the kinds (``junk_kind``), the
share kept of each source file when ``data.source`` names several (``source_id``), and, for any corpus,
the share kept of each quarter of the block (does the score favour the tokens that have more context?).
A token's label comes from its packed columns (or its position); tokens read are counted on the host from
the batch as read, tokens trained on the device from the forward's mask (no wait), and both are summed
over processes in one reduce at the eval point.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from slm.data import junk_mask
from slm.model import shifted_valid
from slm.selection import to_device_async
from slm.train.watchers import Watcher

POSITION_PARTS = 4  # the block's quarters


TEXT_CLASS = ("clean_mask", "junk_kind")  # clean text (1), junk (0) or neither (2: a paragraph break, a document end)


@dataclass(frozen=True)
class Grouping:
    """Tokens grouped by a label in ``0..size-1``: per label, the metric it reports (or none)."""

    column: str | tuple | None  # the batch column of per-token labels (TEXT_CLASS: both); None: the block part
    size: int
    report: dict  # label -> (metric name, True: the share dropped, False: the share kept)

    def labels(self, batch: dict) -> Tensor:
        if self.column == TEXT_CLASS:  # junk, else clean where marked, else neither
            return torch.where(junk_mask(batch), 0, torch.where(batch["clean_mask"].bool(), 1, 2)).long()
        if self.column is not None:
            return batch[self.column].long()
        b, t = batch["labels"].shape
        part = torch.arange(t, device=batch["labels"].device) * self.size // t
        return part.expand(b, t)


def groupings(columns: list[str], names: dict) -> list[Grouping]:
    """What a run can audit, from its training data's columns and the label names of its source
    (:func:`slm.data.sources.label_names`)."""
    out = []
    shares = {1: ("audit/clean_kept", False), 0: ("audit/junk_dropped", True)}
    if "clean_mask" in columns and "junk_kind" in columns:  # what is neither (label 2) is in neither share
        out.append(Grouping(TEXT_CLASS, 3, shares))
    elif "clean_mask" in columns:  # a corpus that marks only its clean text: the rest is junk
        out.append(Grouping("clean_mask", 2, shares))
    kinds = names.get("junk_kind") or []
    if "junk_kind" in columns and len(kinds) > 1:  # label 0: not junk
        out.append(
            Grouping("junk_kind", len(kinds), {i: (f"audit/junk_dropped/{k}", True) for i, k in enumerate(kinds) if i})
        )
    files = names.get("source_id") or []
    if "source_id" in columns and len(files) > 1:
        out.append(
            Grouping("source_id", len(files), {i: (f"audit/kept/source/{f}", False) for i, f in enumerate(files)})
        )
    step = 100 // POSITION_PARTS
    parts = {q: (f"audit/kept/position/{q * step}-{(q + 1) * step}%", False) for q in range(POSITION_PARTS)}
    out.append(Grouping(None, POSITION_PARTS, parts))
    return out


class SelectionAudit(Watcher):
    """Counts, per grouping and label, the valid tokens read (host) and trained (device) since the last
    eval point; :meth:`shares` turns them into the reported shares and starts the next interval. A watcher:
    its shares are logged with each eval after step 0, its counts ride the checkpoint."""

    key = "audit"

    def __init__(self, groups: list[Grouping], device):
        self.groups, self.device = groups, device
        self.offsets = [sum(g.size for g in groups[:i]) for i in range(len(groups))]
        n = sum(g.size for g in groups)
        self.read_counts = torch.zeros(n, dtype=torch.float64)  # host: what the step's batches hold
        self.kept_counts = torch.zeros(n, dtype=torch.float64, device=device)  # device: what they trained

    @property
    def columns(self) -> tuple[str, ...]:
        named = [g.column if isinstance(g.column, tuple) else (g.column,) for g in self.groups if g.column]
        return tuple(dict.fromkeys(c for cs in named for c in cs))

    def read(self, batch: dict) -> None:
        """A host batch as read, before any selection (dropped candidate blocks included)."""
        valid = shifted_valid(batch["labels"])
        for g, at in zip(self.groups, self.offsets):
            self.read_counts[at : at + g.size] += torch.bincount(g.labels(batch)[valid], minlength=g.size)[: g.size]

    def trained(self, batch: dict, mask: Tensor) -> None:
        """A device batch and the tokens its forward trained (``mask``, [B, T] bool): no host read."""
        kept = mask.reshape(-1).double()
        for g, at in zip(self.groups, self.offsets):
            self.kept_counts[at : at + g.size].index_add_(0, g.labels(batch).reshape(-1), kept)

    def totals(self, acc) -> list[float]:
        """(read, kept) counts of every process, summed: one reduce, one read."""
        both = torch.cat([to_device_async(self.read_counts, self.device), self.kept_counts])
        return acc.reduce(both, "sum").tolist()

    def shares(self, acc) -> dict:
        """The reported shares since the last call (labels with no token read are left out)."""
        both = self.totals(acc)
        self.reset()
        n = len(both) // 2
        out = {}
        for g, at in zip(self.groups, self.offsets):
            for label, (name, dropped) in g.report.items():
                read, kept = both[at + label], both[n + at + label]
                if read:
                    out[name] = (read - kept) / read if dropped else kept / read
        return out

    def reset(self) -> None:
        self.read_counts.zero_()
        self.kept_counts.zero_()

    def at_eval(self, run, metrics: dict) -> dict:
        return self.shares(run.acc) if run.step > 0 else {}

    def state(self, run) -> list[float]:
        return self.totals(run.acc)

    def load(self, state: list[float] | None, run) -> None:
        """Counts of an interrupted interval, held by the main process (the others start at zero); counts
        of another layout (an older checkpoint) are dropped: only that interval's audit is lost."""
        n = len(self.read_counts)
        if not state or len(state) != 2 * n or not run.acc.is_main_process:
            return
        self.read_counts.copy_(torch.tensor(state[:n], dtype=torch.float64))
        self.kept_counts.copy_(torch.tensor(state[n:], dtype=torch.float64))
