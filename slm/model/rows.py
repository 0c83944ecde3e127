"""Which rows a step scores and trains, found with one device sync.

A row is one predicted token: position ``t`` of ``labels[:, 1:]`` (flattened to ``B x (T-1)``
positions). Everything the host must know to give the head fixed shapes (how many rows are
valid, how many train, each selection unit's size) and every input check (label range, mask and
weight values) comes back in one small copy; rows are then found with ``nonzero_static`` and
moved with ``index_select``/``index_copy_``, so nothing else in a forward waits for the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from slm.head import OutputHead, full_logits_rows_loss, row_losses, selected_rows_loss

IGNORE_INDEX = -100


def shifted_valid(labels: Tensor) -> Tensor:
    """[B, T] bool: tokens whose loss is defined (t >= 1 and label != -100)."""
    valid = labels != IGNORE_INDEX
    valid[:, 0] = False
    return valid


MASK_ERROR = (
    "loss_mask must be boolean (or 0/1); it holds other values. For per-token loss weights pass "
    "loss_weight (the loss is then sum(weight * loss) / sum(weight))"
)
WEIGHT_ERROR = "loss_weight must be finite and >= 0 (0 = not trained)"


def _not_boolean(loss_mask: Tensor) -> Tensor:
    """Where a non-bool ``loss_mask`` holds something other than 0 or 1."""
    return (loss_mask != 0) & (loss_mask != 1)


def _bad_weights(w: Tensor) -> Tensor:
    return ~torch.isfinite(w) | (w < 0)


def check_loss_mask(loss_mask: Tensor) -> Tensor:
    """``loss_mask`` as bool (host-side check); a value like 0.5, 2 or -1 is an error, not a silent True."""
    if loss_mask.dtype != torch.bool and _not_boolean(loss_mask).any():
        raise ValueError(MASK_ERROR)
    return loss_mask.bool()


def check_loss_weight(loss_weight: Tensor) -> Tensor:
    w = loss_weight.float()
    if _bad_weights(w).any():
        raise ValueError(WEIGHT_ERROR)
    return w


def to_host(t: Tensor) -> list:
    """The one device-to-host copy of a forward (on a GPU, the sync)."""
    return t.to("cpu", copy=True).tolist()


@dataclass
class RowPlan:
    valid: Tensor  # [B, T] bool
    valid_pos: Tensor  # [n_valid] flat positions of the valid rows
    n_valid: int
    known: Tensor | None  # [B, T] bool: the trained tokens, when known before any forward
    known_pos: Tensor | None  # [n_known] their flat positions
    weights: Tensor | None  # [B, T] float32 per-token loss weights (0 off the trained tokens)
    counts: list[int] | None  # valid rows per selection unit (per row, or one total)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.valid.shape)

    def positions(self, mask: Tensor, n: int) -> Tensor:
        """Flat positions of the ``n`` rows set in a [B, T] mask (``n`` known on the host)."""
        return torch.nonzero_static(mask[:, 1:].reshape(-1), size=n).squeeze(1)

    def rows_of(self, pos: Tensor) -> Tensor:
        """Indices into the valid rows of the rows at flat positions ``pos``."""
        b, t = self.shape
        row = torch.zeros(b * (t - 1), dtype=torch.long, device=pos.device)
        row.index_copy_(0, self.valid_pos, torch.arange(self.n_valid, device=pos.device))
        return row.index_select(0, pos)

    def scatter(self, pos: Tensor, values: Tensor) -> Tensor:
        """A [B, T] tensor holding ``values`` at flat positions ``pos`` and 0 elsewhere."""
        b, t = self.shape
        flat = torch.zeros(b * (t - 1), dtype=values.dtype, device=values.device)
        flat.index_copy_(0, pos, values)
        return F.pad(flat.view(b, t - 1), (1, 0))

    def weights_at(self, pos: Tensor) -> Tensor | None:
        return None if self.weights is None else self.weights[:, 1:].reshape(-1).index_select(0, pos)


def plan_rows(
    labels: Tensor,
    vocab: int,
    loss_mask: Tensor | None,
    loss_weight: Tensor | None,
    ratio: float,
    scope: str,
    input_ids: Tensor | None = None,
    input_vocab: int | None = None,
) -> RowPlan:
    """The rows of a batch, every count and check fetched in one copy (see the module docstring);
    ``input_ids`` (and the embedding's size) are checked in the same copy, before the decoder sees them."""
    valid = shifted_valid(labels)
    rows, targets = valid[:, 1:], labels[:, 1:]
    parts = [rows.sum(), (rows & ((targets < 0) | (targets >= vocab))).sum()]
    if rows.numel():  # the offending range, for the error message
        info = torch.iinfo(targets.dtype)
        parts += [
            torch.where(rows, targets, targets.new_full((), info.max)).min(),
            torch.where(rows, targets, targets.new_full((), info.min)).max(),
        ]
    check_inputs = input_ids is not None and input_vocab is not None
    if check_inputs:
        parts += [((input_ids < 0) | (input_ids >= input_vocab)).sum(), input_ids.min(), input_ids.max()]
    weights = known = None
    if loss_weight is not None:
        w = loss_weight.to(valid.device).float()
        parts.append(_bad_weights(w).sum())
        weights = torch.where(valid, w, torch.zeros_like(w))
        known = weights > 0
    elif loss_mask is not None:
        m = loss_mask.to(valid.device)
        parts.append(
            torch.zeros((), dtype=torch.long, device=valid.device) if m.dtype == torch.bool else _not_boolean(m).sum()
        )
        known = (m != 0) & valid
    elif ratio == 1.0:
        known = valid
    if known is not None:
        parts.append(known.sum())
    elif scope == "sequence":
        parts.append(rows.sum(dim=1))
    host = to_host(torch.cat([p.reshape(-1).long() for p in parts]))
    n_valid, n_bad = host[0], host[1]
    rest = host[4:] if rows.numel() else host[2:]
    if check_inputs:
        (n_bad_inputs, lo, hi), rest = rest[:3], rest[3:]
        if n_bad_inputs:
            raise ValueError(
                f"input_ids must be token ids in [0, {input_vocab}), got values in [{lo}, {hi}]; is the tokenizer "
                "the model's (a tokenizer with added tokens needs model.resize_token_embeddings(len(tokenizer)))?"
            )
    if n_bad:
        raise ValueError(
            f"labels must be token ids in [0, {vocab}) or -100, got values in [{host[2]}, {host[3]}]; "
            "is the tokenizer the model's?"
        )
    if loss_weight is not None and rest[0]:
        raise ValueError(WEIGHT_ERROR)
    if loss_mask is not None and rest[0]:
        raise ValueError(MASK_ERROR)
    plan = RowPlan(valid, torch.empty(0), n_valid, known, None, weights, None)
    plan.valid_pos = plan.positions(valid, n_valid)
    if known is not None:
        plan.known_pos = plan.positions(known, rest[-1])
    elif scope == "sequence":
        plan.counts = rest
    elif scope == "batch":
        plan.counts = [n_valid]
    return plan


class HeadRows:
    """Valid rows' hidden states; scores all of them, trains a subset, never all logits at once."""

    def __init__(self, head: OutputHead, hidden: Tensor, targets: Tensor):
        self.head, self.hidden, self.targets = head, hidden, targets
        self.loss = self.lse = None

    def score(self, hits: bool = False, entropy: bool = False) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """(every row's loss, arg-max hits or None, predictive entropy or None), without gradients."""
        out = row_losses(self.head, self.hidden.detach(), self.targets, hits=hits, entropy=entropy)
        self.loss, self.lse = out[0], out[1]
        return out[0], out[2] if hits else None, out[-1] if entropy else None

    def train(self, picked: Tensor, row_weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(weighted loss sum, per-row losses) of the valid rows at indices ``picked``."""
        if self.loss is not None and not torch.is_grad_enabled():  # e.g. eval: the scores are the losses
            loss = self.loss.index_select(0, picked)
            return (loss.sum() if row_weight is None else (loss * row_weight).sum()), loss
        lse = None if self.lse is None else self.lse.index_select(0, picked)
        loss = None if self.loss is None else self.loss.index_select(0, picked)
        return selected_rows_loss(
            self.head, self.hidden.index_select(0, picked), self.targets.index_select(0, picked), lse, row_weight, loss
        )


class FullLogitRows:
    """Fallback for heads we cannot reproduce: HF's own logits, masked. Correct, not faster."""

    def __init__(self, logits: Tensor, targets: Tensor):
        self.ce = full_logits_rows_loss(logits, targets)
        self.logits, self.targets = logits.detach(), targets

    def score(self, hits: bool = False, entropy: bool = False) -> tuple[Tensor, Tensor | None, Tensor | None]:
        hit = self.logits.argmax(-1) == self.targets if hits else None
        ent = None
        if entropy:
            logp = torch.log_softmax(self.logits.float(), dim=-1)
            ent = -(logp.exp() * logp).sum(-1)
        return self.ce.detach(), hit, ent

    def train(self, picked: Tensor, row_weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
        ce = self.ce.index_select(0, picked)
        total = ce.sum() if row_weight is None else (ce * row_weight).sum()
        return total, ce.detach()
