"""An interrupted run resumed against one never interrupted."""

import os
import signal

import pytest
import torch

from slm.cli import train_composed
from slm.runs import read_metrics
from slm.train import RunInterrupted, Trainer
from support.compose import compose_train


def step_values(run, key):
    return [e[key] for e in read_metrics(run) if key in e and "train/loss" in e]


def interrupted_in_step(monkeypatch, step: int, run) -> None:
    """``run()`` with Ctrl-C arriving during training step ``step`` (the step finishes, a checkpoint is written,
    the run stops with RunInterrupted); the loop is as it was afterwards."""
    real = Trainer.train_step

    def ctrl_c_in_step(self):
        if self.step == step - 1:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self)

    monkeypatch.setattr(Trainer, "train_step", ctrl_c_in_step)
    with pytest.raises(RunInterrupted):
        run()
    monkeypatch.setattr(Trainer, "train_step", real)


def resumed_equals_whole(tmp_path, monkeypatch, *overrides):
    """Ctrl-C at step 3 of 6, resume: the same metrics and weights as a run never interrupted."""
    from safetensors.torch import load_file

    common = ("trainer.checkpoint_every=100", "trainer.eval_every=2", *overrides)  # cut mid-way between evals
    train_composed(compose_train(tmp_path / "c", *common), tmp_path / "whole")
    interrupted_in_step(
        monkeypatch, 3, lambda: train_composed(compose_train(tmp_path / "c", *common), tmp_path / "cut")
    )
    train_composed(compose_train(tmp_path / "c", *common, "trainer.resume=true"), tmp_path / "cut")
    for key in ("train/loss", "tokens_seen", "tokens_selected", "flops"):
        assert step_values(tmp_path / "cut", key) == pytest.approx(step_values(tmp_path / "whole", key), rel=1e-6), key
    audits = [[{k: v for k, v in e.items() if k.startswith("audit/")} for e in read_metrics(tmp_path / d)] for d in
              ("whole", "cut")]  # fmt: skip
    audits = [[a for a in run if a] for run in audits]  # the interrupted interval's counts carried in the checkpoint
    assert len(audits[1]) == len(audits[0]) >= 2
    for cut, whole in zip(*audits[::-1]):
        assert cut == pytest.approx(whole, rel=1e-9)
    a, b = (load_file(str(tmp_path / d / "model" / "model.safetensors")) for d in ("whole", "cut"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-5)
