"""Sequence-level selection: whole blocks ranked by a score, only the kept ones trained.

As RHO-LOSS selects whole sequences by excess loss, a step reads more candidate blocks than it
trains and keeps the best share of them; the decoder's forward and backward then run only on the
kept blocks (token selection inside them optional), so a skipped block costs at most a forward
without grad (none when the score needs only stored reference values).
"""

from __future__ import annotations

import torch
from torch import Tensor

from slm.selection.scores import loss_scores, score_tokens

BLOCK_SCORES = loss_scores(random=False)  # a block's mean score; random blocks are what a plain run reads


def block_scores(name: str, valid: Tensor, token_loss: Tensor | None = None, ref_loss: Tensor | None = None) -> Tensor:
    """``[B]`` score of each block (higher = train it): the mean over its valid tokens of the excess
    loss (``token_loss - ref_loss``), of the training loss, or of minus the reference loss (the
    blocks the reference finds easiest); -inf for a block without a valid token."""
    if name not in BLOCK_SCORES:
        raise ValueError(f"block score must be one of {BLOCK_SCORES}, got {name!r}")
    if token_loss is None and name != "reference_loss":
        raise ValueError(f"block score {name!r} needs token_loss (a no-grad forward of the training model)")
    per_token = score_tokens(name, token_loss, ref_loss)  # the token scores, per token as selection has them
    valid = valid.bool()
    count = valid.sum(dim=1)
    mean = torch.where(valid, per_token, 0.0).sum(dim=1) / count.clamp(min=1)
    return torch.where(count > 0, mean, float("-inf"))


def select_blocks(scores: Tensor, keep: int) -> Tensor:
    """Indices of the ``keep`` highest-scoring blocks, in their original order (ties: the earlier)."""
    if not 0 < keep <= scores.numel():
        raise ValueError(f"keep must be in [1, {scores.numel()}], got {keep}")
    order = torch.sort(scores, descending=True, stable=True).indices[:keep]
    return torch.sort(order).values
