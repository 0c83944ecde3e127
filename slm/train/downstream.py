"""Downstream evaluation with lm-evaluation-harness at chosen eval points.

The main process runs the listed tasks on the current model (the others wait) and the results
are logged as ``downstream/<task>/<metric>`` against ``tokens_seen``. Any harness task works:
a registered one (``gsm8k``) or your own YAML in ``downstream.include_path``.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from slm.model import causal_lm
from slm.train.watchers import Watcher

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DownstreamConfig:
    tasks: list = field(default_factory=list)  # harness task names; empty: no downstream evaluation
    every: int | None = None  # steps between runs; None: at every eval point
    include_path: str | None = None  # a folder of custom task YAMLs
    limit: float | None = None  # examples per task (a fraction below 1); None: all
    num_fewshot: int | None = None
    batch_size: int = 8

    def __post_init__(self):
        object.__setattr__(self, "tasks", list(self.tasks or []))
        if self.every is not None and int(self.every) < 1:
            raise ValueError(f"downstream.every must be >= 1 (or null: every eval point), got {self.every}")

    def due(self, step: int, eval_every: int) -> bool:
        return bool(self.tasks) and step % (self.every or eval_every) == 0


def harness():
    """The lm_eval package, or an error that says how to get it."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "downstream.tasks needs lm-evaluation-harness: pip install -e '.[eval]' (or pip install lm-eval)"
        ) from e
    return lm_eval


@contextmanager
def preserved_rng():
    """Every random state a training step reads (torch on CPU and each GPU, NumPy, Python), restored on exit."""
    import random

    import numpy as np

    states = (
        random.getstate(),
        np.random.get_state(),
        torch.get_rng_state(),
        torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    )
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if states[3] is not None:
            torch.cuda.set_rng_state_all(states[3])


@torch.no_grad()
def evaluate_tasks(model: nn.Module, tokenizer, cfg: DownstreamConfig) -> dict[str, float]:
    """``{"downstream/<task>/<metric>": value}`` of ``cfg.tasks`` on ``model`` (an HF causal LM)."""
    lm_eval = harness()
    from lm_eval.models.huggingface import HFLM

    was_training = model.training
    model.eval()
    with preserved_rng():  # the harness seeds torch, NumPy and Python: training must not notice that it ran
        try:
            wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size)
            out = lm_eval.simple_evaluate(
                model=wrapped,
                tasks=list(cfg.tasks),
                num_fewshot=cfg.num_fewshot,
                limit=cfg.limit,
                task_manager=lm_eval.tasks.TaskManager(include_path=cfg.include_path),
                log_samples=False,
                verbosity="WARNING",
            )
        finally:
            model.train(was_training)
    results = {}
    for task, metrics in out["results"].items():
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")  # e.g. "acc,none", "exact_match,strict-match"
            if metric in ("alias", "sample_len") or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            results[f"downstream/{task}/{metric}" + (f"/{filt}" if filt not in ("", "none") else "")] = float(value)
    log.info("downstream: %s", ", ".join(f"{k}={v:.4f}" for k, v in results.items()))
    return results


class DownstreamTasks(Watcher):
    """The harness tasks as a watch: run at the eval points their schedule names (``downstream.every``:
    also between eval points), on the main process's whole model (the others wait)."""

    def __init__(self, cfg: DownstreamConfig, tokenizer, eval_every: int):
        self.cfg, self.tokenizer, self.eval_every = cfg, tokenizer, eval_every

    def start(self, run) -> None:
        if run.engine.mode in ("fsdp2", "deepspeed"):
            raise ValueError(
                "downstream.tasks runs on the main process's whole model, which FSDP and DeepSpeed "
                "shard: evaluate the saved model/ afterwards with lm_eval instead"
            )

    def due(self, step: int) -> bool:
        return self.cfg.due(step, self.eval_every)

    def at_eval(self, run, metrics: dict) -> dict:
        if not self.due(run.step):
            return {}
        res = {}
        if run.acc.is_main_process:  # the others wait: the harness runs in one process
            res = evaluate_tasks(causal_lm(run.selective.model), self.tokenizer, self.cfg)
        run.acc.wait_for_everyone()
        return res
