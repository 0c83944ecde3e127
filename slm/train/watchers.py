"""What a run watches: hooks the loop calls at every step and eval point, each keeping its own part of a
checkpoint. A new watch is a :class:`Watcher` passed to the ``Trainer`` in its ``watchers`` list; the loop
needs no new keyword for it.

What a watcher sees and what it may change (everything is a no-op by default):

  columns                 training-data columns it reads (the loop keeps them in the batches)
  start(run)              once the engine is built: refuse a launch it cannot work under
  read(batch)             a host micro-batch as read, before any selection (dropped candidate blocks included)
  trained(batch, mask)    a device micro-batch and the tokens its forward trained (no host read)
  at_eval(run, metrics)   at an eval point, after the eval sets: numbers to log with this eval
  due(step)               True: call ``at_eval`` at this step although it is no eval point (``metrics`` empty)
  stop                    True: end the run after this eval point
  selection_off           True: train every token from now on (the loop records the step; it holds on resume)
  result()                what it adds to the run's result
  state(run) / load(state, run)   its part of a checkpoint, under ``key``

Here: :class:`EarlyStop` (the held-out loss that ends a run once it stops improving: how ``reference=train``
trains as far as its text supports) and :class:`OutgrownWatch` (the reference's loss that the training model
may come to match: excess loss ranks learnable tokens first only while the reference predicts them better
than the model does). The selection audit (:mod:`slm.train.selection_audit`) and downstream tasks
(:mod:`slm.train.downstream`) are watchers too.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

log = logging.getLogger(__name__)
WHEN_OUTGROWN = ("all", "keep")  # all: train every token from then on | keep: go on selecting


class Watcher:
    """The protocol, with every hook a no-op: subclass it and override what the watch needs."""

    key: str = ""  # its entry in a checkpoint's state ("" : it keeps nothing)
    columns: tuple[str, ...] = ()
    stop: bool = False
    selection_off: bool = False
    bar_note: str | None = None  # what the progress bar should say about the run's length (an early stop)

    def start(self, run) -> None:
        """Called once the run's engine is built: refuse a launch the watch cannot work under."""

    def read(self, batch: dict) -> None:
        pass

    def trained(self, batch: dict, mask) -> None:
        pass

    def at_eval(self, run, metrics: dict) -> dict:
        return {}

    def due(self, step: int) -> bool:
        return False

    def result(self) -> dict:
        return {}

    def state(self, run):
        return None

    def load(self, state, run) -> None:
        pass


def check_outgrown(remedy: str, margin: float) -> None:
    if remedy not in WHEN_OUTGROWN:
        raise ValueError(f"selector.when_outgrown must be one of {WHEN_OUTGROWN}, got {remedy!r}")
    if not 0.0 <= float(margin) < 1.0:
        raise ValueError(f"selector.outgrown_margin must be in [0, 1), got {margin}")


class EarlyStop(Watcher):
    """Stop once ``eval/<watch>/loss`` has not fallen by more than ``min_delta`` for ``patience`` evals
    in a row; the run keeps the weights of its best eval (``on_best()`` is called at each new best after
    step 0, to save them) and reports that eval's numbers. Where no eval beats step 0, the run keeps (and
    reports) its final weights: never its starting ones."""

    key = "early_stop"

    def __init__(self, watch: str, patience: int = 3, min_delta: float = 0.0, on_best: Callable | None = None):
        if int(patience) < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        if not float(min_delta) >= 0:
            raise ValueError(f"min_delta must be >= 0, got {min_delta}")
        self.watch, self.patience, self.min_delta, self.on_best = watch, int(patience), float(min_delta), on_best
        self.best, self.best_step, self.since_best = math.inf, 0, 0

    @property
    def metric(self) -> str:
        return f"eval/{self.watch}/loss"

    @property
    def bar_note(self) -> str:
        return f"stops when {self.metric} stops improving; the total is the cap"

    def update(self, step: int, metrics: dict) -> bool:
        """Record one eval; True when it is the best so far."""
        loss = metrics[self.metric]
        if loss < self.best - self.min_delta:
            self.best, self.best_step, self.since_best = loss, step, 0
            return True
        self.since_best += 1
        return False

    def at_eval(self, run, metrics: dict) -> dict:
        if self.update(run.step, metrics) and run.step > 0 and self.on_best:
            self.on_best()
        return {}

    @property
    def done(self) -> bool:
        return self.since_best >= self.patience

    stop = done

    def result(self) -> dict:
        if self.done:
            log.info(
                "stopped: %s not better than %.4f (step %d) for %d evals",
                self.metric,
                self.best,
                self.best_step,
                self.patience,
            )
        return {"best_step": self.best_step, "stopped_early": self.done}

    def state(self, run) -> dict:
        return {"best": self.best, "best_step": self.best_step, "since_best": self.since_best}

    def load(self, state, run) -> None:
        if state:
            self.best, self.best_step, self.since_best = state["best"], state["best_step"], state["since_best"]


class OutgrownWatch(Watcher):
    """Compares the training model's eval loss with the reference's on the same eval set at every eval
    point. The first time the model comes within ``margin`` (relative) of the reference, or passes it,
    the run warns once and records the step; with ``remedy="all"`` every token trains from then on."""

    key = "outgrown_step"

    def __init__(self, eval_set: str, reference_loss: float, margin: float = 0.02, remedy: str = "all"):
        check_outgrown(remedy, margin)
        self.eval_set, self.reference_loss, self.margin, self.remedy = eval_set, reference_loss, margin, remedy
        self.step: int | None = None  # the step the model reached the reference (None: not yet)

    @property
    def metric(self) -> str:
        return f"eval/{self.eval_set}/loss"

    @property
    def level(self) -> float:
        """The model's loss at which the reference counts as outgrown."""
        return self.reference_loss * (1 + self.margin)

    def update(self, step: int, metrics: dict) -> bool:
        """Record one eval; True at the eval where the model first reaches the reference."""
        if self.step is not None or self.metric not in metrics or metrics[self.metric] > self.level:
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
            metrics[self.metric],
            self.reference_loss,
            100 * self.margin,
            then,
        )
        return True

    def at_eval(self, run, metrics: dict) -> dict:
        if self.update(run.step, metrics):
            return {"reference/outgrown": 1.0, "reference/eval_loss": self.reference_loss}
        return {}

    @property
    def selection_off(self) -> bool:
        """Whether selection is off from now on: the model has reached its reference and the remedy is ``all``."""
        return self.remedy == "all" and self.step is not None

    def result(self) -> dict:
        return {} if self.step is None else {"outgrown_step": self.step}

    def state(self, run) -> int | None:
        return self.step

    def load(self, state, run) -> None:
        self.step = state


class RisingEval(Watcher):
    """Warns once when ``eval/loss`` has risen at ``patience`` eval points in a row (the run is overfitting its
    training text, typically a small file read many times), and records the eval step where the rise began: a
    baseline whose curve rises at its end makes every "fraction of the baseline's tokens" look better than it
    is (slm-curves measures against the baseline's first crossing and flags it too). Changes nothing else."""

    key = "rising_eval"

    def __init__(self, patience: int = 3):
        if int(patience) < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.patience = int(patience)
        self.last: float | None = None
        self.rises: list[int] = []  # the eval steps of the current run of rises
        self.since: int | None = None  # where the rise began, once reported

    def at_eval(self, run, metrics: dict) -> dict:
        loss = metrics.get("eval/loss")
        if loss is None:
            return {}
        rose = self.last is not None and loss > self.last
        self.rises = [*self.rises, run.step] if rose else []
        self.last = loss
        if len(self.rises) >= self.patience and self.since is None:
            self.since = self.rises[0]
            log.warning(
                "step %d: eval/loss has risen at %d eval points in a row (since step %d, now %.4f): the run is "
                "overfitting its training text (a small file read many times?); its best eval was earlier",
                run.step,
                len(self.rises),
                self.since,
                loss,
            )
        return {}

    def result(self) -> dict:
        return {} if self.since is None else {"eval_rising_since": self.since}

    def state(self, run) -> dict:
        return {"last": self.last, "rises": self.rises, "since": self.since}

    def load(self, state, run) -> None:
        if state:
            self.last, self.rises, self.since = state["last"], list(state["rises"]), state["since"]
