"""How often a training step makes the host wait for the device, by selector and scope (issue 25, item 5).

On CPU nothing waits, but the same ops run (``support.probes.HostSyncs``): a step of any selector must wait
no more often than a step that trains every token, except where its selection needs a forward of its own
(block selection's loss pass) or a count only the scores decide (a threshold over the run, a global top-k,
unions and intersections); and beyond its forwards and the optimizer's own step, a step reads the device
exactly twice."""

from collections import Counter

import pytest
from support.compose import compose_train
from support.probes import HostSyncs

from slm.cli import train_composed
from slm.model import SelectiveLM
from slm.train import BlockFilter, Trainer


def step_ops(monkeypatch, tmp_path, name: str, *overrides: str) -> tuple[Counter, list[tuple[Counter, Counter]]]:
    """The ops of the run's last training step (a reference trained first runs steps of its own), and for each
    block filter's keep in it, its ops and those of the scoring forward it ran."""
    steps, keeps, forwards = [], [], []
    step, keep, forward = Trainer.train_on, BlockFilter.keep, SelectiveLM.forward

    def probed_step(self, *args):  # after the host has read the step's batches
        with HostSyncs() as probe:
            out = step(self, *args)
        steps.append(Counter(probe.ops))
        return out

    def probed_keep(self, batch, engine, ref):
        forwards.clear()
        with HostSyncs() as probe:
            out = keep(self, batch, engine, ref)
        keeps.append((Counter(probe.ops), sum(forwards, Counter())))
        return out

    def probed_forward(self, *args, **kwargs):
        with HostSyncs() as probe:
            out = forward(self, *args, **kwargs)
        forwards.append(Counter(probe.ops))
        return out

    monkeypatch.setattr(Trainer, "train_on", probed_step)
    monkeypatch.setattr(BlockFilter, "keep", probed_keep)
    monkeypatch.setattr(SelectiveLM, "forward", probed_forward)
    train_composed(
        compose_train(tmp_path / "cache", "trainer.max_steps=2", "trainer.eval_every=2", *overrides), tmp_path / name
    )
    monkeypatch.undo()
    accum = int(next((o.split("=")[1] for o in overrides if o.startswith("trainer.grad_accum=")), 1))
    return steps[-1], keeps[len(keeps) - accum :]


CASES = {
    "excess batch": ("selector.scope=batch",),
    "excess sequence": ("selector.scope=sequence",),
    "train_loss": ("selector=train_loss",),
    "random": ("selector=random",),
    "reference_loss": ("selector=reference_loss",),
    "ratio schedule": ("selector.ratio={schedule: linear, start: 1.0, end: 0.4}",),
    "oracle": ("selector=oracle",),
    "accumulated": ("selector.scope=sequence", "trainer.grad_accum=2", "trainer.batch_size=2"),
    "sparse backward": ("trainer.sparse_backward=true",),
    "sparse backward, top layer": ("trainer.sparse_backward=1", "trainer.grad_accum=2", "trainer.batch_size=2"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_selecting_step_waits_as_often_as_a_step_on_every_token(tmp_path, monkeypatch, case):
    accumulated = "trainer.grad_accum=2" in CASES[case]
    shape = ("trainer.grad_accum=2", "trainer.batch_size=2") if accumulated else ()
    every, _ = step_ops(monkeypatch, tmp_path, "all", "selector=all", *shape)
    ops, _ = step_ops(monkeypatch, tmp_path, "case", *CASES[case])
    assert ops == every, (case, ops, every)


@pytest.mark.parametrize(
    "case", ["selector.scope=dataset", "selector.scope=global", "selector=union", "selector=intersection"]
)
def test_a_count_known_after_the_scores_costs_one_more_wait_per_forward(tmp_path, monkeypatch, case):
    """A threshold over the run reads its count with its bound in one copy; a top-k over the global batch
    keeps a share on each process that only the scores decide, and a union's size depends on how its two
    top-k sets overlap: their positions are found by one ``nonzero``."""
    every, _ = step_ops(monkeypatch, tmp_path, "all", "selector=all")
    ops, _ = step_ops(monkeypatch, tmp_path, "case", case)
    once_more = "copy to cpu" if case.endswith("dataset") else "aten.nonzero"
    assert ops == every + Counter({once_more: 1}), (ops, every)


@pytest.mark.parametrize("accum", [1, 2])
def test_block_selection_waits_only_for_its_scoring_forwards(tmp_path, monkeypatch, accum):
    """Which blocks a micro-batch keeps stays on the device, and the step counts their tokens there: the step
    waits as often as one that trains every candidate, plus each scoring forward's own waits, which are a
    forward's at ratio 1.0 (its decoder's and its one plan read)."""
    shape = (f"trainer.grad_accum={accum}", "trainer.batch_size=2")
    every_candidate = (f"trainer.grad_accum={accum}", "trainer.batch_size=4")  # 2 / 0.5 candidates
    every, _ = step_ops(monkeypatch, tmp_path, "all", "selector=all", *every_candidate)
    blocks = ("selector=train_loss", "selector.blocks=0.5")
    ops, keeps = step_ops(monkeypatch, tmp_path, "blocks", *blocks, *shape)
    assert len(keeps) == accum
    for kept, scoring in keeps:
        assert kept == scoring and scoring["copy to cpu"] >= 1, (kept, scoring)
    assert ops == every + sum((kept for kept, _ in keeps), Counter()), (ops, every, keeps)


@pytest.mark.parametrize("accum", [1, 2])
def test_beyond_its_forwards_a_step_waits_twice_its_count_and_its_closing_read(tmp_path, monkeypatch, accum):
    """Outside the forwards (each waits once for its plan) and the optimizer's own step (on CPU, AdamW reads its
    step counters, host tensors on a GPU too), a step reads the device twice: its count reduce before the
    forwards and one closing reduce that also carries the gradient norm it logs."""
    from slm.parallel import Engine

    forwards, stepped, last = [], [], {}
    forward, step, train_on = SelectiveLM.forward, Engine.step, Trainer.train_on

    def probed_forward(self, *args, **kwargs):
        with HostSyncs() as probe:
            out = forward(self, *args, **kwargs)
        forwards.append(Counter(probe.ops))
        return out

    def probed_step(self):
        with HostSyncs() as probe:
            out = step(self)
        stepped.append(Counter(probe.ops))
        return out

    def probed_train_on(self, *args):  # this step's forwards and optimizer step (evals run forwards too)
        forwards.clear()
        stepped.clear()
        out = train_on(self, *args)
        last.update(forwards=sum(forwards, Counter()), step=sum(stepped, Counter()), n=len(forwards))
        return out

    monkeypatch.setattr(SelectiveLM, "forward", probed_forward)
    monkeypatch.setattr(Engine, "step", probed_step)
    monkeypatch.setattr(Trainer, "train_on", probed_train_on)
    shape = (f"trainer.grad_accum={accum}", "trainer.batch_size=2")
    ops, _ = step_ops(monkeypatch, tmp_path, "run", "selector.scope=sequence", *shape)
    assert last["n"] == accum
    own = ops - last["forwards"] - last["step"]
    assert own == Counter({"copy to cpu": 2}), own
