"""slm: Rho-1 style selective language modeling.

``import slm.selection`` stays pure torch; the names below that need transformers are imported
on first use.
"""

from slm.selection import (
    excess_loss,
    random_scores,
    reference_entropy,
    reference_loss,
    score_tokens,
    select_combined,
    select_tokens,
    train_loss,
)

__version__ = "0.1.0"

_LAZY = {
    "SelectiveLM": "slm.model",
    "SelectiveOutput": "slm.model",
    "token_losses": "slm.model",
    "SelectiveTrainer": "slm.trainers",
}

__all__ = [
    "select_tokens",
    "select_combined",
    "score_tokens",
    "excess_loss",
    "train_loss",
    "reference_loss",
    "reference_entropy",
    "random_scores",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'slm' has no attribute {name!r}")
