"""Token selection for selective language modeling: scores -> boolean mask.

Pure torch on purpose: lift this file into any training loop. It imports nothing from
transformers, accelerate, hydra, wandb or datasets.

Per-token tensors follow Hugging Face's label alignment: entry ``t`` scores the prediction of
``labels[:, t]``; entry 0 and ``-100`` labels are invalid and never selected.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

SCOPES = ("sequence", "batch", "global")


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


def num_selected(valid: Tensor, ratio: float, scope: str) -> int:
    """How many tokens :func:`select_tokens` keeps for ``valid`` ([B, T] bool), computed from the
    mask alone: a trainer knows a step's denominator before any forward. ``scope="global"``
    counts this batch as if it were the whole global batch (sum the valid counts of all
    processes and call ``num_to_keep`` on the total instead)."""
    ratio = check_ratio(ratio)
    if scope == "sequence":
        return sum(num_to_keep(ratio, int(n)) for n in valid.sum(dim=1).tolist())
    return num_to_keep(ratio, int(valid.sum()))


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


def _top_k_rows(scores: Tensor, valid: Tensor, ratio: float, tiebreak: Tensor | None,
                counts: list[int] | None = None) -> Tensor:  # fmt: skip
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
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
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


# --- score functions: higher score = more worth training on -------------------------------------


def excess_loss(token_loss: Tensor, ref_loss: Tensor) -> Tensor:
    """Rho-1's score: the training model's loss minus the reference's. High = learnable, not learnt."""
    _same_shape(token_loss, ref_loss)
    return token_loss.float() - ref_loss.float()


def train_loss(token_loss: Tensor) -> Tensor:
    """Reference-free: the tokens the training model currently predicts worst."""
    return token_loss.float()


def reference_loss(ref_loss: Tensor) -> Tensor:
    """Keep the tokens the reference finds easiest (lowest reference loss)."""
    return -ref_loss.float()


def random_scores(like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Uniform random scores: the random-selection ablation. Seed it with ``generator``."""
    device = generator.device if generator is not None else like.device
    return to_device_async(torch.rand(like.shape, generator=generator, device=device), like.device)


def reference_entropy(ref_entropy: Tensor) -> Tensor:
    """Rho-1's self-reference scorer: keep the tokens the reference is most certain about (lowest
    entropy of its predictive distribution)."""
    return -ref_entropy.float()


def _same_shape(a: Tensor, b: Tensor, name: str = "ref_loss") -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name} has shape {tuple(b.shape)} but the token losses have shape {tuple(a.shape)}; "
            "reference values must be aligned with labels, one per token"
        )


ScoreFn = Callable[..., Tensor]  # (token_loss, ref_loss, generator, ref_entropy) -> scores

SCORERS: dict[str, ScoreFn] = {
    "excess_loss": lambda tl, ref, g, ent: excess_loss(tl, _need(ref, "excess_loss", "ref_loss")),
    "train_loss": lambda tl, ref, g, ent: train_loss(tl),
    "reference_loss": lambda tl, ref, g, ent: reference_loss(_need(ref, "reference_loss", "ref_loss")),
    "reference_entropy": lambda tl, ref, g, ent: reference_entropy(_need(ent, "reference_entropy", "ref_entropy")),
    "random": lambda tl, ref, g, ent: random_scores(tl, g),
}
NEEDS = {"excess_loss": "ref_loss", "reference_loss": "ref_loss", "reference_entropy": "ref_entropy"}


def _need(value: Tensor | None, name: str, column: str) -> Tensor:
    if value is None:
        raise ValueError(f"selector {name!r} needs {column} (live or stored reference values)")
    return value


def score_tokens(
    name: str,
    token_loss: Tensor,
    ref_loss: Tensor | None = None,
    generator: torch.Generator | None = None,
    ref_entropy: Tensor | None = None,
) -> Tensor:
    """Dispatch to a named score function (``excess_loss``, ``train_loss``, ``reference_loss``,
    ``reference_entropy``, ``random``)."""
    if name not in SCORERS:
        raise ValueError(f"unknown selector score {name!r}; choose one of {sorted(SCORERS)}")
    if ref_entropy is not None:
        _same_shape(token_loss, ref_entropy, "ref_entropy")
    return SCORERS[name](token_loss, ref_loss, generator, ref_entropy)


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


# --- the ratio over a run -------------------------------------------------------------------------

SCHEDULES = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class RatioSchedule:
    """The selection ratio at each optimizer step: ``constant`` (``start``), or ``linear`` /
    ``cosine`` from ``start`` at the first step to ``end`` at the last."""

    kind: str = "constant"
    start: float = 0.6
    end: float | None = None

    def __post_init__(self):
        if self.kind not in SCHEDULES:
            raise ValueError(f"selector.ratio schedule must be one of {SCHEDULES}, got {self.kind!r}")
        check_ratio(self.start, "selector.ratio.start")
        if self.kind != "constant":
            if self.end is None:
                raise ValueError(f"a {self.kind} selector.ratio schedule needs an end")
            check_ratio(self.end, "selector.ratio.end")

    def at(self, step: int, total_steps: int) -> float:
        """The ratio of optimizer step ``step`` (0-based) of ``total_steps``."""
        if self.kind == "constant":
            return self.start
        progress = min(1.0, step / max(1, total_steps - 1))
        if self.kind == "linear":
            return self.start + (self.end - self.start) * progress
        return self.end + (self.start - self.end) * 0.5 * (1 + math.cos(math.pi * progress))

    @property
    def is_constant(self) -> bool:
        return self.kind == "constant" or self.start == self.end

    def label(self) -> str:
        return f"{self.start}" if self.kind == "constant" else f"{self.kind}-{self.start}-{self.end}"


def ratio_schedule(value) -> RatioSchedule:
    """A schedule from a number (constant) or a mapping ``{schedule, start, end}``."""
    if isinstance(value, RatioSchedule):
        return value
    if isinstance(value, (int, float, str)):
        return RatioSchedule("constant", check_ratio(value, "selector.ratio"))
    try:
        spec = dict(value)
    except (TypeError, ValueError):
        raise ValueError(f"selector.ratio must be a number or {{schedule, start, end}}, got {value!r}") from None
    unknown = set(spec) - {"schedule", "start", "end"}
    if unknown:
        raise ValueError(f"selector.ratio schedule has unknown keys {sorted(unknown)}; use schedule, start, end")
    return RatioSchedule(spec.get("schedule", "constant"), spec.get("start", 0.6), spec.get("end"))
