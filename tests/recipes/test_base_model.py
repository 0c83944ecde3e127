"""base=train (issue 39 item 2): a base model pretrained once on general text, cached, reused by every run of a
sweep; the run and a reference with reference.init=pretrained start from its weights; its quality is reported."""

import json

import pytest
from support.compose import compose_train

from slm.cli import train_composed
from slm.cli.validation import validate
from slm.runs import read_metrics

BASE = [
    "base=train", "base.data.source=builtin", "base.data.split=clean", "+base.data.builtin.seed=99",
    "base.trainer.max_steps=6", "base.trainer.batch_size=4", "base.trainer.eval_every=2",
    "base.trainer.progress=false", "base.converge.holdout=0.1", "reference.init=pretrained",
]  # fmt: skip


def _step0(metrics_file_dir, key):
    return next(e[key] for e in read_metrics(metrics_file_dir) if e.get("step") == 0 and key in e)


def test_a_run_continues_from_the_base_trained_once_and_a_sweep_reuses_it(tmp_path, caplog):
    cache = tmp_path / "cache"
    train_composed(compose_train(cache, *BASE, "seed=0"), tmp_path / "a")
    (base,) = (cache / "base").iterdir()
    assert (base / "DONE").exists() and (base / "model" / "config.json").exists()
    trained_at = (base / "result.json").stat().st_mtime_ns
    info = json.loads((tmp_path / "a" / "run_info.json").read_text())
    assert info["base"] == str(base / "model")
    quality = info["base_quality"]
    assert quality["steps"] >= 2 and "eval/base_heldout/loss" in quality
    assert quality["measured_on"] == "this run's eval sets"
    # the run's first eval is the base's: the training model starts from its weights, not fresh
    assert _step0(tmp_path / "a", "eval/validation/loss") == pytest.approx(quality["eval/validation/loss"], abs=1e-4)
    # the reference (reference.init=pretrained) is the base fine-tuned: its first eval is the base's too
    (ref,) = (cache / "reference").iterdir()
    assert _step0(ref / "run", "eval/validation/loss") == pytest.approx(quality["eval/validation/loss"], abs=1e-4)

    caplog.clear()
    with caplog.at_level("INFO"):
        train_composed(compose_train(cache, *BASE, "seed=1", "selector.ratio=0.3"), tmp_path / "b")
    assert "reusing the cached base" in caplog.text and "training the base" not in caplog.text
    assert (base / "result.json").stat().st_mtime_ns == trained_at and len(list((cache / "base").iterdir())) == 1
    assert json.loads((tmp_path / "b" / "run_info.json").read_text())["base"] == str(base / "model")
    # without a base stage the model starts fresh
    train_composed(compose_train(cache, "seed=0"), tmp_path / "c")
    assert _step0(tmp_path / "c", "eval/validation/loss") != pytest.approx(quality["eval/validation/loss"], abs=1e-3)


def test_a_subword_tokenizer_trains_on_the_base_text_too(tmp_path):
    from slm.recipes import resolve_tokenizer_text

    settings = validate(compose_train(tmp_path, *BASE, "data.tokenizer=bpe:300"))
    texts = resolve_tokenizer_text(settings).data.tokenizer_text
    assert [t.builtin for t in texts] == [{"seed": 99}]  # the base's text; the reference's (own clean split) is in


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["base=train", "base.data.source=null"], "base=train needs base.data.source"),
        (["reference.init=pretrained"], "set model.pretrained, or base=train"),
        (["base=train", "model.pretrained=some/folder"], "use base=none to continue from it"),
        (["base=train", "base.kind=pretrain"], "base.kind must be one of"),
    ],
)
def test_bad_base_settings_are_refused_with_the_fix(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        validate(compose_train(tmp_path, *overrides))
