"""Top-k selection: exactly ``round(ratio * n_valid)`` tokens per scope unit (a row, a batch, or the
batch of every process), and the union or intersection of two scores' top-k sets."""

from __future__ import annotations

import math

import torch
from torch import Tensor

TOPK_SCOPES = ("sequence", "batch", "global")  # an exact top-k per row, per batch, per global batch
SCOPES = (*TOPK_SCOPES, "dataset")  # and a threshold over the run (slm.selection.running)


class NonFiniteScores(ValueError):
    """Scores of valid tokens are NaN or inf (a diverged model or a broken reference column)."""


def check_ratio(ratio: float, name: str = "ratio") -> float:
    """Return ``ratio`` as a float, or raise if it is not in (0, 1]."""
    if isinstance(ratio, bool) or type(ratio).__name__ == "bool_":  # True would pass as 1.0
        raise ValueError(f"{name} must be a number in (0, 1], got {ratio!r}")
    try:
        r = float(ratio)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in (0, 1], got {ratio!r}") from None
    if math.isnan(r) or not 0.0 < r <= 1.0:
        raise ValueError(f"{name} must be in (0, 1] (the fraction of valid tokens that receive loss), got {ratio!r}")
    return r


def num_to_keep(ratio: float, n_valid: int) -> int:
    """``round(ratio * n_valid)`` with halves rounded up, and at least one when ``n_valid > 0``."""
    if n_valid == 0:
        return 0
    # The epsilon absorbs float error such as 0.3 * 10 = 3.0000000000000004 or 0.15 * 10 = 1.4999999.
    return min(n_valid, max(1, math.floor(ratio * n_valid + 0.5 + 1e-9)))


def keep_counts(ratio: float, n_valid: Tensor) -> Tensor:
    """:func:`num_to_keep` of every count in ``n_valid`` (an integer tensor), on its device: the same
    float64 arithmetic, so the same integers, without reading the counts to the host."""
    k = torch.floor(n_valid.double() * ratio + 0.5 + 1e-9).long()
    return torch.where(n_valid > 0, k.clamp(min=1).minimum(n_valid.long()), 0)


def count_selected(valid: Tensor, ratio: float, scope: str) -> Tensor:
    """How many tokens :func:`select_tokens` keeps for ``valid`` ([B, T] bool), as a 0-d integer tensor on
    ``valid``'s device, computed from the mask alone: a trainer knows a step's denominator before any
    forward, and counting kept blocks that stay on a GPU costs no wait. ``scope="global"`` counts this batch
    as if it were the whole global batch (sum the valid counts of all processes and call ``num_to_keep`` on
    the total instead)."""
    ratio = check_ratio(ratio)
    counts = valid.sum(dim=1) if scope == "sequence" else valid.sum()
    return keep_counts(ratio, counts).sum()


def num_selected(valid: Tensor, ratio: float, scope: str) -> int:
    """:func:`count_selected` as a number (read to the host)."""
    return int(count_selected(valid, ratio, scope))


def _valid_mask(scores: Tensor, valid: Tensor | None) -> Tensor:
    if not torch.is_tensor(scores) or not scores.is_floating_point():
        raise ValueError(f"scores must be a floating-point tensor, got {type(scores).__name__}")
    if valid is None:
        return torch.ones_like(scores, dtype=torch.bool)
    if not torch.is_tensor(valid):
        raise ValueError(f"valid must be a bool tensor of the scores' shape (None: every token), got {valid!r}")
    if valid.dtype != torch.bool and ((valid != 0) & (valid != 1)).any():
        raise ValueError("valid must be boolean (or 0/1): it marks which tokens may be selected")
    if valid.shape != scores.shape:
        raise ValueError(
            f"valid has shape {tuple(valid.shape)} but scores have shape {tuple(scores.shape)}; "
            "they must match (one entry per token)"
        )
    return valid.bool()


def _check_finite(scores: Tensor, valid: Tensor) -> None:
    bad = (~torch.isfinite(scores) & valid).sum().item()
    if bad:
        raise NonFiniteScores(
            f"{bad} valid token(s) have NaN or inf scores; check the training/reference losses "
            "(a diverged model or a reference column with missing values)"
        )


def _top_k_rows(
    scores: Tensor, valid: Tensor, ratio: float, tiebreak: Tensor | None, counts: list[int] | None = None
) -> Tensor:
    """Top-k per row of a 2-D ``scores``, k computed from each row's valid count (``counts``:
    those counts already on the host, so nothing waits for the device)."""
    masked = scores.float().masked_fill(~valid, float("-inf"))
    if tiebreak is not None:
        masked = masked[:, tiebreak]
    # A stable descending sort keeps the earlier position first among equal scores.
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices
    counts = valid.sum(dim=1).tolist() if counts is None else counts
    ks = to_device_async(torch.tensor([num_to_keep(ratio, int(n)) for n in counts]), scores.device)
    keep_sorted = torch.arange(scores.shape[1], device=scores.device)[None, :] < ks[:, None]
    keep = torch.zeros_like(valid)
    keep.scatter_(1, order, keep_sorted)
    if tiebreak is not None:
        keep = keep[:, torch.argsort(tiebreak)]
    return keep & valid


def _gather_global(flat: Tensor) -> tuple[Tensor, int, int]:
    """All-gather variable-length 1-D tensors; returns (concatenation, my offset, my length)."""
    import torch.distributed as dist

    n = torch.tensor([flat.numel()], device=flat.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    sizes_l = [int(s.item()) for s in sizes]
    padded = torch.zeros(max(sizes_l), dtype=flat.dtype, device=flat.device)
    padded[: flat.numel()] = flat
    parts = [torch.empty_like(padded) for _ in sizes_l]
    dist.all_gather(parts, padded)
    rank = dist.get_rank()
    return torch.cat([p[:s] for p, s in zip(parts, sizes_l)]), sum(sizes_l[:rank]), sizes_l[rank]


def select_tokens(
    scores: Tensor,
    ratio: float,
    valid: Tensor | None = None,
    scope: str = "batch",
    generator: torch.Generator | None = None,
    counts: list[int] | None = None,
    check_finite: bool = True,
) -> Tensor:
    """Keep the top ``ratio`` share of valid tokens by score.

    Each scope unit keeps exactly ``k = round(ratio * n_valid)`` tokens (halves round up; at
    least one when the unit has a valid token). Invalid tokens are never selected.

    Args:
        scores: float tensor ``[B, T]`` (or any shape for ``"batch"``/``"global"``); higher = keep.
        ratio: share of valid tokens to keep, in (0, 1]. ``1.0`` selects exactly the valid tokens.
        valid: bool tensor of the scores' shape; ``None`` means every token is valid.
        scope: ``"sequence"`` (top-k per row), ``"batch"`` (over all local tokens) or
            ``"global"`` (over the batch of every process of the initialised
            ``torch.distributed`` group, exactly as ``"batch"`` over the concatenated global
            batch; ``"batch"`` when not distributed).
        generator: if given, ties are broken by a random permutation drawn from it; otherwise
            the earlier position wins (deterministic).
        counts: the valid count of each scope unit when the caller already has it on the host
            (per row for ``"sequence"``, one total for ``"batch"``): then selection never waits
            for the device. Ignored for ``"global"`` (which gathers across processes anyway).
        check_finite: raise :class:`NonFiniteScores` on NaN/inf scores of valid tokens (a device
            sync); ``False`` leaves the check to the caller.

    Returns:
        bool tensor of the scores' shape.
    """
    ratio = check_ratio(ratio)
    if scope not in TOPK_SCOPES:
        raise ValueError(
            f"scope must be one of {TOPK_SCOPES} for a top-k (scope='dataset' is a RunningThreshold), got {scope!r}"
        )
    valid = _valid_mask(scores, valid)
    if ratio == 1.0:  # every valid token, whatever the scores
        return valid.clone()
    # No early return for an empty batch: under scope="global" every process must join the gather.

    flat_s, flat_v = scores.reshape(1, -1), valid.reshape(1, -1)
    if scope == "global" and _distributed():
        all_s, offset, n = _gather_global(flat_s[0].float())
        all_v, _, _ = _gather_global(flat_v[0].to(torch.uint8))
        # Checked on the gathered scores: every process raises, or none does (a process that raised
        # alone would leave the others waiting in, or mispaired by, the next gather).
        if check_finite:
            _check_finite(all_s, all_v.bool())
        perm = _permutation(all_s.numel(), generator, scores.device)
        keep = _top_k_rows(all_s[None], all_v[None].bool(), ratio, perm)[0, offset : offset + n]
        return keep.reshape(scores.shape)
    if check_finite:
        _check_finite(scores, valid)
    if scope == "sequence":
        if scores.dim() != 2:
            raise ValueError(f'scope="sequence" needs [B, T] scores, got shape {tuple(scores.shape)}')
        perm = _permutation(scores.shape[1], generator, scores.device)
        return _top_k_rows(scores, valid, ratio, perm, counts)
    perm = _permutation(flat_s.shape[1], generator, scores.device)
    return _top_k_rows(flat_s, flat_v, ratio, perm, counts).reshape(scores.shape)


def _permutation(n: int, generator: torch.Generator | None, device: torch.device) -> Tensor | None:
    if generator is None:
        return None
    return to_device_async(torch.randperm(n, generator=generator, device=generator.device), device)


def to_device_async(t: Tensor, device: torch.device) -> Tensor:
    """A host tensor on ``device`` without the host waiting: a copy from pinned memory is queued, one
    from pageable memory would wait for the GPU."""
    if t.device.type == "cpu" and torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# --- two scores combined: the union or intersection of their exact top-k sets ---------------------

COMBINATIONS = ("union", "intersection")


def select_combined(
    how: str,
    scores_a: Tensor,
    scores_b: Tensor,
    ratio: float,
    valid: Tensor | None = None,
    scope: str = "batch",
    generator: torch.Generator | None = None,
    counts: list[int] | None = None,
    check_finite: bool = True,
) -> Tensor:
    """Tokens in the top ``ratio`` of ``scores_a`` or (``"union"``) / and (``"intersection"``) in the
    top ``ratio`` of ``scores_b``; each set is exactly :func:`select_tokens`'s. The result holds
    between k and 2k (union) or between 0 and k (intersection) tokens per scope unit, so its size is
    known only after scoring."""
    if how not in COMBINATIONS:
        raise ValueError(f"combination must be one of {COMBINATIONS}, got {how!r}")
    if scores_a.shape != scores_b.shape:
        raise ValueError(f"the two scores differ in shape: {tuple(scores_a.shape)} vs {tuple(scores_b.shape)}")
    a = select_tokens(scores_a, ratio, valid, scope, generator, counts, check_finite)
    b = select_tokens(scores_b, ratio, valid, scope, generator, counts, check_finite)
    return a | b if how == "union" else a & b
