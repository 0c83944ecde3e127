"""What the loop watches at its eval points: the held-out loss that ends a run once it stops improving
(:class:`EarlyStop`, how ``reference=train`` trains as far as its text supports), and the reference's
loss that the training model may come to match (:class:`OutgrownWatch`: excess loss ranks learnable
tokens first only while the reference predicts them better than the model does)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

log = logging.getLogger(__name__)
WHEN_OUTGROWN = ("all", "keep")  # all: train every token from then on | keep: go on selecting


def check_outgrown(remedy: str, margin: float) -> None:
    if remedy not in WHEN_OUTGROWN:
        raise ValueError(f"selector.when_outgrown must be one of {WHEN_OUTGROWN}, got {remedy!r}")
    if not 0.0 <= float(margin) < 1.0:
        raise ValueError(f"selector.outgrown_margin must be in [0, 1), got {margin}")


@dataclass
class EarlyStop:
    """Stop once ``eval/<watch>/loss`` has not fallen by more than ``min_delta`` for ``patience`` evals
    in a row; the run keeps the weights of its best eval (the loop hands them to ``on_best``)."""

    watch: str
    patience: int = 3
    min_delta: float = 0.0
    best: float = math.inf
    best_step: int = 0
    since_best: int = 0

    def __post_init__(self):
        if int(self.patience) < 1:
            raise ValueError(f"patience must be >= 1, got {self.patience}")
        if not float(self.min_delta) >= 0:
            raise ValueError(f"min_delta must be >= 0, got {self.min_delta}")

    @property
    def key(self) -> str:
        return f"eval/{self.watch}/loss"

    def update(self, step: int, metrics: dict) -> bool:
        """Record one eval; True when it is the best so far."""
        loss = metrics[self.key]
        if loss < self.best - self.min_delta:
            self.best, self.best_step, self.since_best = loss, step, 0
            return True
        self.since_best += 1
        return False

    @property
    def done(self) -> bool:
        return self.since_best >= self.patience

    def state(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "since_best": self.since_best}

    def load(self, state: dict) -> None:
        self.best, self.best_step, self.since_best = state["best"], state["best_step"], state["since_best"]


@dataclass
class OutgrownWatch:
    """Compares the training model's eval loss with the reference's on the same eval set at every eval
    point. The first time the model comes within ``margin`` (relative) of the reference, or passes it,
    the run warns once and records the step; with ``remedy="all"`` every token trains from then on."""

    eval_set: str
    reference_loss: float
    margin: float = 0.02
    remedy: str = "all"
    step: int | None = None  # the step the model reached the reference (None: not yet)

    def __post_init__(self):
        check_outgrown(self.remedy, self.margin)

    @property
    def key(self) -> str:
        return f"eval/{self.eval_set}/loss"

    @property
    def level(self) -> float:
        """The model's loss at which the reference counts as outgrown."""
        return self.reference_loss * (1 + self.margin)

    def update(self, step: int, metrics: dict) -> bool:
        """Record one eval; True at the eval where the model first reaches the reference."""
        if self.step is not None or self.key not in metrics or metrics[self.key] > self.level:
            return False
        self.step = step
        then = (
            "every token trains from now on (selector.when_outgrown=all)"
            if self.remedy == "all"
            else "selection goes on as set (selector.when_outgrown=keep): expect it to fall behind the baseline"
        )
        log.warning(
            "step %d: the training model's loss on %s (%.4f) has reached its reference's (%.4f, margin %.0f%%): "
            "excess loss no longer tells learnable text from noise once the model predicts better than its "
            "reference; %s. A reference trained further (reference.trainer.max_steps, or more clean text) "
            "stays ahead longer",
            step,
            self.eval_set,
            metrics[self.key],
            self.reference_loss,
            100 * self.margin,
            then,
        )
        return True

    @property
    def selection_off(self) -> bool:
        """Whether selection is off from now on: the model has reached its reference and the remedy is ``all``."""
        return self.remedy == "all" and self.step is not None
