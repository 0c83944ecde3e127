"""Score functions: higher score = more worth training on."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from slm.selection.topk import to_device_async


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


def loss_scores(random: bool = True) -> tuple[str, ...]:
    """The registry's scores computable from the training model's per-token loss and a reference's per-token
    loss alone (not its entropy), in registry order; ``random=False`` leaves out the random score. What a
    selector that sees no reference entropy offers (block ranking, the TRL trainers) is derived from this."""
    return tuple(n for n in SCORERS if NEEDS.get(n) in (None, "ref_loss") and (random or n != "random"))


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
