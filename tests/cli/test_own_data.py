"""Rho-1 on your own data: clean eval sets, a reference trained from files, the self-reference
scorers, ratio schedules (issue 11)."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.compose import TINY, compose_train

from slm.analysis import main as curves
from slm.cli import train_composed
from slm.runs import read_metrics

WORDS = "the a cat dog sat ran on under near big small red blue house tree river quickly slowly".split()


def _sentence(rng):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))) + "."


def _junk(rng):
    return "".join(rng.choice("0123456789abcdef") for _ in range(rng.randint(20, 60)))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """clean.jsonl (the reference's text), noisy.jsonl (half web junk), eval.jsonl (clean, held out)."""
    root = tmp_path_factory.mktemp("own")
    rng = random.Random(0)
    write = lambda name, docs: (root / name).write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    write("clean.jsonl", [" ".join(_sentence(rng) for _ in range(4)) for _ in range(80)])
    write("noisy.jsonl", [" ".join(_sentence(rng) if rng.random() < 0.5 else _junk(rng) for _ in range(4))
                          for _ in range(80)])  # fmt: skip
    write("eval.jsonl", [" ".join(_sentence(rng) for _ in range(4)) for _ in range(12)])
    return root


def _own(corpus, *extra):
    return ("data=files", f"data.source={corpus / 'noisy.jsonl'}", f"+data.eval.clean={corpus / 'eval.jsonl'}",
            "data.block_size=64", *extra)  # fmt: skip


def test_baseline_and_slm_on_files_are_judged_on_a_clean_eval_set(corpus, tmp_path):
    ref = ("reference=train", f"reference.data.source={corpus / 'clean.jsonl'}", "reference.trainer.max_steps=4",
           "reference.trainer.batch_size=4", "reference.trainer.progress=false")  # fmt: skip
    train_composed(
        compose_train(tmp_path / "c", *_own(corpus, "selector=all", "reference=none")), tmp_path / "runs" / "base"
    )
    train_composed(compose_train(tmp_path / "c", *_own(corpus, *ref)), tmp_path / "runs" / "slm")
    for run in ("base", "slm"):
        evals = [e for e in read_metrics(tmp_path / "runs" / run) if "eval/clean/loss" in e]
        assert [e["step"] for e in evals] == [0, 3, 6]
        assert all(e["eval/clean/tokens"] > 0 and "eval/validation/loss" in e for e in evals)
        assert all(e["eval/loss"] == e["eval/clean/loss"] for e in evals)  # the first set is eval/loss
    info = json.loads((tmp_path / "runs" / "slm" / "run_info.json").read_text())
    assert info["selector"] == "excess_loss" and info["reference"] == "train"
    curves([str(tmp_path / "runs"), "--metric", "eval/clean/loss", "--out", str(tmp_path / "plots")])
    table = (tmp_path / "plots" / "tokens_to_baseline.csv").read_text().splitlines()
    assert table[1].startswith("baseline (all tokens)") and table[2].startswith("excess_loss 0.6")
    final = {r: read_metrics(tmp_path / "runs" / r)[-1]["eval/clean/loss"] for r in ("base", "slm")}
    assert table[1].split(",")[2] == str(round(final["base"], 4))


def test_an_eval_set_that_overlaps_the_training_data_is_warned_about(corpus, tmp_path):
    import warnings

    from slm.data import DataConfig, build

    own = dict(source=str(corpus / "noisy.jsonl"), block_size=64, cache_dir=str(tmp_path / "c"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a held-out eval set: no warning
        build(DataConfig(**own, eval={"clean": str(corpus / "eval.jsonl")}))
    with pytest.warns(UserWarning, match=r"data.eval.same: 9\d\.\d% of its 80 documents .*noisy.jsonl.*memorised"):
        build(DataConfig(**own, eval={"same": str(corpus / "noisy.jsonl")}))  # the training file itself


@pytest.mark.slow
def test_a_reference_trained_from_files_is_trained_once_per_sweep(corpus, tmp_path):
    exe = str(Path(sys.executable).with_name("slm-train"))
    args = [o for o in TINY if not o.startswith(("reference.", "data.builtin"))]
    ref = ("reference.trainer.max_steps=4", "reference.trainer.batch_size=4", "reference.trainer.progress=false")
    args += [*_own(corpus, "reference=train", f"reference.data.source={corpus / 'clean.jsonl'}", *ref),
             f"data.cache_dir={tmp_path / 'c'}", f"hydra.sweep.dir={tmp_path / 'sweep'}", "seed=0,1"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([exe, "-m", *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    log = done.stdout + done.stderr
    assert log.count("reference: training the reference on") == 1
    assert log.count("reference: reusing the cached reference") == 1
    assert len(list((tmp_path / "c" / "reference").glob("*/DONE"))) == 1


def test_a_ratio_schedule_sets_each_steps_ratio(tmp_path):
    sched = "selector.ratio={schedule:linear,start:1.0,end:0.5}"
    cfg = compose_train(tmp_path / "c", "reference=none", sched, "trainer.max_steps=6")
    assert cfg.name == "train_loss-linear-1.0-0.5-none-s0"
    train_composed(cfg, tmp_path / "run")
    steps = [e for e in read_metrics(tmp_path / "run") if "train/ratio" in e]
    assert [round(e["train/ratio"], 6) for e in steps] == [1.0, 0.9, 0.8, 0.7, 0.6, 0.5]
    for e in steps:  # each step keeps round(ratio * valid) tokens of every micro-batch
        assert e["train/selected_frac"] <= e["train/ratio"] + 0.01
    assert json.loads((tmp_path / "run" / "run_info.json").read_text())["ratio"] == "linear-1.0-0.5"


def test_slm_score_stores_the_references_entropy_and_the_self_reference_selectors_train(tmp_path):
    import slm
    from slm.cli import score
    from slm.data import build
    from slm.reference import load_stored

    cfg = compose_train(tmp_path / "c", "entropy=true", config_name="score")
    store = score(cfg)
    columns = load_stored(store, {})
    ds = build(cfg.data)["train"]
    ref_model = next((tmp_path / "c" / "reference").glob("*/model"))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ref_model).eval()
    rows = ds.with_format("torch")[:8]
    loss, ent = slm.token_losses(model, rows["input_ids"], rows["labels"], rows["attention_mask"], return_entropy=True)
    torch.testing.assert_close(columns.rows(range(8), "ref_entropy"), ent, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(columns.rows(range(8), "ref_loss"), loss, atol=1e-5, rtol=1e-5)
    stored = ("reference=stored", f"reference.scores_dir={store}")
    train_composed(
        compose_train(tmp_path / "c", *stored, "selector=reference_entropy", "trainer.max_steps=2"), tmp_path / "e"
    )
    train_composed(compose_train(tmp_path / "c", *stored, "selector=union", "trainer.max_steps=2"), tmp_path / "u")
    fracs = [e["train/selected_frac"] for e in read_metrics(tmp_path / "u") if "train/selected_frac" in e]
    assert all(0.6 <= f <= 1.0 for f in fracs)  # a union of two 60% sets
    with pytest.raises(ValueError, match="trainer.grad_accum must be 1"):
        train_composed(compose_train(tmp_path / "c", *stored, "selector=union", "trainer.grad_accum=2"), tmp_path / "x")
    no_entropy = score(compose_train(tmp_path / "c", "out_dir=" + str(tmp_path / "plain"), config_name="score"))
    with pytest.raises(ValueError, match="needs the reference's per-token entropy.*entropy=true"):
        train_composed(compose_train(tmp_path / "c", "reference=stored", f"reference.scores_dir={no_entropy}",
                            "selector=reference_entropy"), tmp_path / "y")  # fmt: skip
    assert torch.isfinite(columns.rows(range(len(ds)), "ref_entropy")).all()


@pytest.mark.slow  # about 40 s: lm-evaluation-harness at every eval point of two runs
def test_downstream_tasks_run_on_their_schedule_and_leave_training_unchanged(tmp_path, monkeypatch):
    """A custom offline lm-evaluation-harness task (tests/assets/lm_eval) every 3 steps while the eval
    sets run every 2; with dropout on, the weights equal a run without it (the harness reseeds
    every random generator it finds; they are restored)."""
    pytest.importorskip("lm_eval")
    from safetensors.torch import load_file

    monkeypatch.chdir(Path(__file__).resolve().parents[2])  # the task YAML's data path is relative to the repo
    common = ("reference=none", "selector=random", "+model.config.attention_dropout=0.2", "trainer.eval_every=2")
    task = ("downstream.tasks=[slm_arith]", "downstream.include_path=tests/assets/lm_eval", "downstream.every=3")
    train_composed(compose_train(tmp_path / "c", *common, *task), tmp_path / "run")
    logged = [e for e in read_metrics(tmp_path / "run") if "downstream/slm_arith/acc" in e]
    assert [e["step"] for e in logged] == [0, 3, 6]
    assert all(0.0 <= e["downstream/slm_arith/acc"] <= 1.0 and e["tokens_seen"] >= 0 for e in logged)
    assert [e["step"] for e in read_metrics(tmp_path / "run") if "eval/loss" in e] == [0, 2, 4, 6]
    train_composed(compose_train(tmp_path / "c", *common), tmp_path / "plain")
    with_tasks, plain = (load_file(str(tmp_path / d / "model" / "model.safetensors")) for d in ("run", "plain"))
    for k in plain:
        assert torch.equal(with_tasks[k], plain[k]), k


def test_downstream_without_the_harness_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if it were not installed
    with pytest.raises(ImportError, match=r"pip install -e '.\[eval\]'"):
        train_composed(compose_train(tmp_path / "c", "reference=none", "downstream.tasks=[gsm8k]"), tmp_path / "run")
    assert not (tmp_path / "c").exists()  # refused before any data was packed


def _run_on_relative_paths(corpus, tmp_path, monkeypatch, *extra) -> Path:
    """A run launched in ``work/`` with its own data given by relative paths (``work/run``); the test then
    carries on from another folder. Returns ``work``."""
    work = tmp_path / "work"
    work.mkdir()
    for name in ("noisy.jsonl", "clean.jsonl"):
        (work / name).write_text((corpus / name).read_text())
    monkeypatch.chdir(work)
    relative = ("data=files", "data.source=noisy.jsonl", "data.block_size=64", "reference=train",
                "reference.data.source=clean.jsonl", "reference.trainer.max_steps=2", "reference.trainer.batch_size=4",
                "reference.trainer.progress=false", "trainer.max_steps=2", *extra)  # fmt: skip
    train_composed(compose_train(tmp_path / "c", *relative), work / "run")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    return work


def test_what_a_run_on_relative_paths_kept_is_readable_from_any_folder(corpus, tmp_path, monkeypatch):
    """A run launched with data.source=noisy.jsonl (relative) records its launch folder, so the notebook's
    selection sample (run from notebooks/) reads the run's own data (issue 26, item 13)."""
    from slm.analysis import selection_sample

    work = _run_on_relative_paths(corpus, tmp_path, monkeypatch)
    assert json.loads((work / "run" / "run_info.json").read_text())["launch_dir"] == str(work)
    sample = selection_sample(work / "run", n_blocks=2)
    assert sample.mask.shape == (2, 64) and sample.mask.any() and len(sample.tokens) == 2


def test_slm_inspect_shows_what_a_run_on_relative_paths_keeps(corpus, tmp_path, monkeypatch):
    """slm-inspect RUN writes a page of sample blocks, each token marked kept or dropped with its score, for a
    run whose own data was given by a relative path, read from another folder (issue 28 item 3). Checked by
    parsing the page, and in a real headless Chromium (playwright's own or the system's; in CI it must run)."""
    import subprocess
    from html.parser import HTMLParser

    from slm.analysis import selection_sample

    work = _run_on_relative_paths(corpus, tmp_path, monkeypatch, "selector.ratio=0.4")
    done = subprocess.run(["slm-inspect", str(work / "run"), "--blocks", "3"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    page = work / "run" / "inspect.html"
    assert f"wrote {page}" in done.stdout

    class Tokens(HTMLParser):
        def __init__(self):
            super().__init__()
            self.spans, self.cls = [], None

        def handle_starttag(self, tag, attrs):
            if tag == "span" and "tok" in dict(attrs).get("class", ""):
                self.cls = dict(attrs)["class"]
                self.spans.append([self.cls, dict(attrs).get("data-score"), ""])

        def handle_data(self, data):
            if self.cls is not None:
                self.spans[-1][2] += data

        def handle_endtag(self, tag):
            self.cls = None

    parsed = Tokens()
    parsed.feed(page.read_text())
    tokens = [s for s in parsed.spans if s[1] is not None or "pad" in s[0]]
    sample = selection_sample(work / "run", n_blocks=3)
    kept = [s for s in tokens if "kept" in s[0].split()]
    assert len(kept) == int(sample.mask.sum()) > 0
    assert len([s for s in tokens if "dropped" in s[0].split()]) == int(sample.valid.sum() - sample.mask.sum())
    assert [float(s[1]) for s in kept] == pytest.approx(sample.excess[sample.mask.astype(bool)].tolist(), abs=1e-3)
    from support.browser import real_browser

    with real_browser() as browser:  # skips without one, except in CI, where it fails (issue 38 item 5)
        view = browser.new_page()
        view.goto(page.as_uri())
        assert view.locator("section.block .tok.kept").count() == len(kept)  # the legend has one too
        assert "kept" in view.locator("#summary").inner_text()
        assert view.locator("#histogram").evaluate("img => img.naturalWidth") > 0


def test_a_shared_references_quality_is_measured_on_each_runs_own_eval_sets(corpus, tmp_path):
    """Issue 37 item 9: two runs on different data share one cached reference (trained with the first run's eval
    sets). Each run's reference_quality holds the reference's loss on that run's own eval sets, not the numbers
    the first run recorded under the same names."""
    from support.hf_reference import plain_eval_loss

    from slm.cli.validation import validate
    from slm.data import build

    rng = random.Random(7)
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"text": " ".join(_junk(rng) if rng.random() < 0.7 else _sentence(rng)
                                                           for _ in range(4))}) + "\n" for _ in range(80)))  # fmt: skip
    ref = ("reference=train", f"reference.data.source={corpus / 'clean.jsonl'}", "reference.trainer.max_steps=4",
           "reference.trainer.batch_size=4", "reference.trainer.progress=false", "trainer.max_steps=1")  # fmt: skip
    a = compose_train(tmp_path / "c", *_own(corpus, *ref))
    b = compose_train(tmp_path / "c", *_own(corpus, *ref), f"data.source={other}")
    train_composed(a, tmp_path / "a")
    train_composed(b, tmp_path / "b")
    (model,) = [p.parent for p in (tmp_path / "c" / "reference").glob("*/model/config.json")]  # one reference
    for cfg, run in ((a, "a"), (b, "b")):
        quality = json.loads((tmp_path / run / "run_info.json").read_text())["reference_quality"]
        sets = build(validate(cfg).data).eval_sets
        for name in ("validation", "clean"):
            assert quality[f"eval/{name}/loss"] == pytest.approx(plain_eval_loss(model, sets[name]), abs=1e-4), run
    qa, qb = (json.loads((tmp_path / r / "run_info.json").read_text())["reference_quality"] for r in "ab")
    assert qa["eval/validation/loss"] != qb["eval/validation/loss"]  # other validation text, other loss


def test_auto_compares_with_the_clean_eval_set_and_warns_when_it_has_only_a_carved_one(corpus, tmp_path, caplog):
    """selector.ratio=auto on your own files: it reads the clean eval set eval/loss follows (data.eval.clean, first);
    with only the validation split carved from the noisy training files it says that this split is not known to
    be clean (its noise would count as learnable)."""
    ref = ("reference=train", f"reference.data.source={corpus / 'clean.jsonl'}", "reference.trainer.max_steps=4",
           "reference.trainer.batch_size=4", "reference.trainer.progress=false", "selector.ratio=auto")  # fmt: skip
    with caplog.at_level("WARNING"):
        train_composed(compose_train(tmp_path / "c", *_own(corpus, *ref)), tmp_path / "clean")
    assert json.loads((tmp_path / "clean" / "run_info.json").read_text())["ratio_auto"]["clean_set"] == "clean"
    assert "not known to be clean" not in caplog.text
    carved = [o for o in _own(corpus, *ref) if not o.startswith("+data.eval")]
    with caplog.at_level("WARNING"):
        train_composed(compose_train(tmp_path / "c", *carved), tmp_path / "carved")
    assert json.loads((tmp_path / "carved" / "run_info.json").read_text())["ratio_auto"]["clean_set"] == "validation"
    assert "not known to be clean" in caplog.text and "data.eval.<name>" in caplog.text
