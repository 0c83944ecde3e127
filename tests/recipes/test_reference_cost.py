"""The reference's cost (issue 39 item 5): a trained reference records its training time and FLOPs, its store its
scoring's; a run that selects with them records both, and slm-curves charges them beside its own cost."""

import json
from pathlib import Path

import pytest
from support.compose import compose_train
from transformers import AutoModelForCausalLM

from slm.analysis import curves, load_runs, savings_table
from slm.cli import train_composed
from slm.model import flop_model
from slm.reference import load_stored


def test_a_run_records_what_its_reference_cost_and_the_table_charges_it(tmp_path):
    cache = tmp_path / "c"
    train_composed(compose_train(cache, "selector.ratio=0.5", "trainer.eval_every=2"), tmp_path / "slm")
    train_composed(compose_train(cache, "selector=all", "trainer.eval_every=2"), tmp_path / "base")
    info = json.loads((tmp_path / "slm" / "run_info.json").read_text())
    cost = info["reference_cost"]
    store = load_stored(info["scores_dir"], {})
    folder = Path(store.meta["reference"]["name"])
    trained = json.loads((folder.parent / "result.json").read_text())
    assert cost["train_tokens"] == trained["tokens_seen"] == 4 * 4 * 32  # reference.trainer: 4 steps x 4 x 32
    assert cost["train_time_s"] == trained["train_time_s"] > 0 and cost["train_flops"] == trained["flops"] > 0
    rows = store.meta["rows"]
    expected = flop_model(AutoModelForCausalLM.from_pretrained(folder), 32).forward(rows * 32)
    assert cost["score_tokens"] == rows * 32 and cost["score_flops"] == pytest.approx(expected)
    assert cost["score_time_s"] == store.meta["seconds"]
    assert json.loads((tmp_path / "base" / "run_info.json").read_text())["reference_cost"] is None
    rows, _ = savings_table(curves(load_runs([str(tmp_path / "slm"), str(tmp_path / "base")])))
    slm = next(r for r in rows if r["run"].startswith("excess_loss"))
    base = next(r for r in rows if r["run"].startswith("baseline"))
    assert base["fraction_of_baseline_flops_with_reference"] == 1.0
    if slm["fraction_of_baseline_flops"] is not None:  # a 6-step run may not reach its baseline
        assert slm["fraction_of_baseline_flops_with_reference"] > slm["fraction_of_baseline_flops"]


def test_a_reference_budget_follows_the_run_it_serves(tmp_path):
    """reference.budget: the reference's cap is that share of the run's training tokens: arms of one sweep share
    one reference; a longer run gets a longer one."""
    cache = tmp_path / "c"
    budget = ("reference.budget=0.5", "reference.trainer.max_steps=1000", "trainer.eval_every=3")
    for i, ratio in enumerate(("0.3", "0.5")):  # two arms of one sweep: 6 steps x 4 blocks -> 3 steps x 4 blocks
        train_composed(compose_train(cache, *budget, f"selector.ratio={ratio}"), tmp_path / f"arm{i}")
    (ref,) = (cache / "reference").iterdir()
    result = json.loads((ref / "result.json").read_text())
    assert result["step"] == 3 and result["tokens_seen"] == 3 * 4 * 32
    train_composed(compose_train(cache, *budget, "trainer.max_steps=12"), tmp_path / "longer")
    steps = sorted(json.loads((r / "result.json").read_text())["step"] for r in (cache / "reference").iterdir())
    assert steps == [3, 6]
    with pytest.raises(ValueError, match="reference.budget"):
        from slm.cli.validation import validate

        validate(compose_train(cache, "reference.budget=0"))
