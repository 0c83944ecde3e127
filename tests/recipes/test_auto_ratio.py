"""selector.ratio=auto in a run (issue 39 item 4): chosen from the reference's stored losses and the starting
model's before training, recorded in run_info with its evidence, fixed for the run and kept by a resume."""

import json

import pytest
import torch
from support.compose import compose_train
from support.resume import interrupted_in_step
from transformers import AutoModelForCausalLM

from slm.cli import train_composed
from slm.cli.validation import validate
from slm.data import build
from slm.model import build_model, shifted_valid, token_losses
from slm.recipes import ratio_choice
from slm.reference import load_stored
from slm.runs import read_metrics
from slm.selection import estimate_ratio

AUTO = ("selector.ratio=auto", "trainer.eval_every=2", "trainer.checkpoint_every=100")


def test_the_ratio_is_chosen_from_the_data_recorded_and_kept_by_a_resume(tmp_path, monkeypatch):
    cache = tmp_path / "c"
    cfg = compose_train(cache, *AUTO)
    train_composed(cfg, tmp_path / "run")
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    auto = info["ratio_auto"]
    assert info["ratio"] == auto["ratio"] and 0 < auto["ratio"] < 1 and auto["rows"] > 0
    # the same estimate, computed here from the store, the reference and a fresh model built as the run builds it
    settings = validate(cfg)
    data = build(settings.data)
    model = build_model(settings.model, len(data.tokenizer), settings.seed, data.tokenizer).eval()
    store = load_stored(info["scores_dir"], {})
    reference = AutoModelForCausalLM.from_pretrained(store.meta["reference"]["name"]).eval()

    def excess(ds, stored):
        rows = list(range(min(auto["rows"], len(ds))))
        batch = {k: torch.as_tensor(v) for k, v in ds.select(rows)[:].items()}
        ids, labels, am = batch["input_ids"], batch["labels"], batch["attention_mask"]
        theirs = store.rows(rows, "ref_loss") if stored else token_losses(reference, ids, labels, am)
        return (token_losses(model, ids, labels, am) - theirs)[shifted_valid(labels)]

    est = estimate_ratio(excess(data["train"], True), excess(data.eval_sets[auto["clean_set"]], False))
    assert auto["ratio"] == est.ratio and auto["kappa"] == pytest.approx(est.kappa, abs=1e-4)
    assert auto["clean_set"] == info["eval_loss_set"] == "validation"
    # the run selected at that ratio
    selected = [e["train/selected_frac"] for e in read_metrics(tmp_path / "run") if "train/selected_frac" in e]
    assert selected and all(f == pytest.approx(auto["ratio"], abs=0.02) for f in selected)

    # interrupted, then resumed: the choice is read back, not made again
    interrupted_in_step(monkeypatch, 3, lambda: train_composed(compose_train(cache, *AUTO), tmp_path / "cut"))
    monkeypatch.setattr(ratio_choice, "_measure", lambda *a, **k: pytest.fail("chose the ratio again on a resume"))
    train_composed(compose_train(cache, *AUTO, "trainer.resume=true"), tmp_path / "cut")
    resumed = json.loads((tmp_path / "cut" / "run_info.json").read_text())
    assert resumed["ratio_auto"] == auto and resumed["status"] == "finished"
    assert [e["train/loss"] for e in read_metrics(tmp_path / "cut") if "train/loss" in e] == pytest.approx(
        [e["train/loss"] for e in read_metrics(tmp_path / "run") if "train/loss" in e], rel=1e-6
    )


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["reference=none", "selector=train_loss", "selector.ratio=auto"], "it needs a reference"),
        (["selector.ratio=auto", "reference.evolve_every=5"], "not with reference.evolve_every"),
        (["selector.ratio=autox"], "selector.ratio"),
    ],
)
def test_auto_without_a_fixed_reference_is_refused(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        validate(compose_train(tmp_path, *overrides))
