"""Selection that adapts to the corpus, end to end through slm-train: a threshold over the run, whole
blocks, an evolving reference; each trains what it promises and resumes exactly."""

import json

import pytest
import torch
from support.compose import compose_train
from support.resume import resumed_equals_whole, step_values

from slm.cli import train_composed


def test_a_threshold_over_the_run_trains_data_dependent_counts_and_resumes_exactly(tmp_path, monkeypatch):
    train_composed(compose_train(tmp_path / "c", "selector.scope=dataset", "selector.ratio=0.4"), tmp_path / "run")
    fracs = step_values(tmp_path / "run", "train/selected_frac")
    assert len(set(round(f, 4) for f in fracs)) > 1  # batches train different shares
    seen, sel = step_values(tmp_path / "run", "tokens_seen")[-1], step_values(tmp_path / "run", "tokens_selected")[-1]
    assert 0.25 < sel / seen < 0.5  # the ratio of the valid tokens, paid back within a few steps
    with pytest.raises(ValueError, match="selector.scope=dataset keeps a data-dependent number.*grad_accum must be 1"):
        train_composed(compose_train(tmp_path / "c", "selector.scope=dataset", "trainer.grad_accum=2"), tmp_path / "x")
    resumed_equals_whole(tmp_path / "resume", monkeypatch, "selector.scope=dataset", "selector.ratio=0.4")


@pytest.mark.parametrize("score", ["excess_loss", "reference_loss"])
def test_whole_blocks_are_selected_and_only_the_kept_ones_train(tmp_path, score):
    base = ("selector.ratio=1.0", "trainer.batch_size=4")
    train_composed(compose_train(tmp_path / "c", *base), tmp_path / "all")
    train_composed(compose_train(tmp_path / "c", *base, "selector.blocks=0.5", f"selector.block_score={score}"),
          tmp_path / "blocks")  # fmt: skip
    seen_all, seen_blocks = (
        step_values(tmp_path / "all", "tokens_seen"),
        step_values(tmp_path / "blocks", "tokens_seen"),
    )
    sel_blocks = step_values(tmp_path / "blocks", "tokens_selected")
    # each step reads 8 candidate blocks and trains 4 of them, every valid token of those
    assert seen_blocks[-1] > 1.8 * seen_all[-1] and sel_blocks[-1] < 0.6 * seen_blocks[-1]
    flops_all, flops_blocks = step_values(tmp_path / "all", "flops"), step_values(tmp_path / "blocks", "flops")
    if score == "excess_loss":  # a no-grad forward of every candidate: more than the plain run's FLOPs
        assert flops_blocks[-1] > flops_all[-1]
    else:  # stored reference losses: no forward, so about the plain run's
        assert flops_blocks[-1] == pytest.approx(flops_all[-1], rel=0.1)


def test_whole_block_selection_resumes_exactly(tmp_path, monkeypatch):
    resumed_equals_whole(tmp_path, monkeypatch, "selector.blocks=0.5", "selector.ratio=0.6")


def test_an_evolving_reference_is_refreshed_on_schedule_scored_live_and_resumes_exactly(tmp_path, monkeypatch):
    train_composed(
        compose_train(tmp_path / "c", "reference.evolve_every=2", "reference.evolve_ema=0.5"), tmp_path / "run"
    )
    ckpt = sorted((tmp_path / "run" / "checkpoints").glob("step_*"))[-1]
    assert torch.load(ckpt / "reference.pt", weights_only=True)["refreshes"] == 3  # steps 2, 4 and 6
    # scored live: every step pays a reference forward, which the FLOPs count
    train_composed(compose_train(tmp_path / "c"), tmp_path / "fixed")
    assert step_values(tmp_path / "run", "flops")[-1] > 1.2 * step_values(tmp_path / "fixed", "flops")[-1]
    with pytest.raises(ValueError, match="reference.evolve_every refreshes a reference model.*reference=stored"):
        bad = ("reference=stored", "reference.scores_dir=/x", "+reference.evolve_every=2")
        train_composed(compose_train(tmp_path / "c", *bad), tmp_path / "x")
    resumed_equals_whole(tmp_path / "resume", monkeypatch, "reference.evolve_every=2")


def test_a_block_share_that_keeps_every_candidate_is_refused_with_the_settings_that_work(tmp_path):
    """trainer.batch_size=1 with selector.blocks=0.7 reads round(1 / 0.7) = 1 candidate and keeps it: no block
    selection happens, so the setting is refused naming the nearest ones that select (issue 26, item 6)."""
    from slm.cli.validation import validate

    with pytest.raises(ValueError, match=r"selector\.blocks<=0\.667 .*trainer\.batch_size>=2"):
        validate(compose_train(tmp_path / "c", "selector.blocks=0.7", "trainer.batch_size=1"))
    validate(compose_train(tmp_path / "c", "selector.blocks=0.6", "trainer.batch_size=1"))  # 2 candidates, 1 kept
    validate(compose_train(tmp_path / "c", "selector.blocks=0.7", "trainer.batch_size=2"))  # 3 candidates, 2 kept


def test_a_resume_that_would_read_other_candidate_blocks_is_refused(tmp_path, monkeypatch):
    """5 x 2 micro-batches read 2 x round(5 / 0.3) = 34 candidates a step; 10 x 1 would read 33, so other rows
    than the uninterrupted run's: refused, naming both layouts."""
    from slm.runs import ResumeMismatch

    common = ("reference=none", "selector=train_loss", "selector.blocks=0.3", "selector.block_score=train_loss",
              "trainer.max_steps=2")  # fmt: skip
    train_composed(
        compose_train(tmp_path / "c", *common, "trainer.batch_size=5", "trainer.grad_accum=2"), tmp_path / "run"
    )
    with pytest.raises(ResumeMismatch, match=r"34 candidate blocks.*33"):
        train_composed(
            compose_train(
                tmp_path / "c", *common, "trainer.batch_size=10", "trainer.grad_accum=1", "trainer.resume=true"
            ),
            tmp_path / "run",
            overrides=["trainer.batch_size=10", "trainer.grad_accum=1", "trainer.resume=true"],
        )


@pytest.mark.slow  # packs the whole real-text corpus (about a minute)
def test_the_oracle_trains_exactly_the_tokens_that_are_not_junk_in_each_batch(tmp_path):
    """selector=oracle on the real-text corpus: each step trains exactly the tokens the corpus does not mark as
    junk (its clean text, paragraph breaks and document ends) of the rows it reads (counted independently from
    the packed split and the batch stream), and slm-curves never takes it for the baseline."""
    from slm.analysis import load_runs
    from slm.cli.validation import validate
    from slm.data import build
    from slm.model import shifted_valid
    from slm.runs import read_metrics
    from slm.train import BatchStream

    common = ("data=realtext", "data.block_size=64", "reference=none", "trainer.max_steps=3", "selector=oracle")
    cfg = compose_train(tmp_path / "c", *common)
    train_composed(cfg, tmp_path / "run")
    packed = build(validate(cfg).data)["train"].with_format("torch")
    stream = BatchStream(len(packed), 4, 1, 0, seed=0)
    expected, total = [], 0
    for step in range(3):
        rows = packed[stream.indices(step)]
        total += int(((rows["junk_kind"] == 0) & shifted_valid(rows["labels"])).sum())
        expected.append(total)
    got = [e["tokens_selected"] for e in read_metrics(tmp_path / "run") if "train/loss" in e]
    assert got == expected and 0 < expected[-1]
    (run,) = load_runs([str(tmp_path / "run")])
    assert not run.is_baseline and run.group == "oracle (all but the junk)"
    own = tmp_path / "own.jsonl"  # a corpus that does not mark its clean text
    own.write_text("".join('{"text": "%s"}\n' % ("some plain text " * 20) for _ in range(40)))
    plain = ("data=files", f"data.source={own}", "data.block_size=64", "reference=none", "trainer.max_steps=1")
    with pytest.raises(ValueError, match="no clean_mask column: selector=oracle needs a corpus"):
        train_composed(compose_train(tmp_path / "c", *plain, "selector=oracle"), tmp_path / "x")


def test_the_selection_audit_counts_what_each_run_kept_of_the_clean_tokens_and_the_junk(tmp_path):
    """Every eval point logs the share of the clean tokens kept and of the junk dropped since the last one
    (issue 28 item 2): 1 and 0 for the baseline, 1 and 1 for the oracle; for a selection, kept clean plus
    kept junk is what it trained but for the tokens that are neither (document ends: issue 37 item 14), with
    the clean, junk and other counts taken independently from the packed data."""
    from slm.cli.validation import validate
    from slm.data import build
    from slm.model import shifted_valid
    from slm.runs import read_metrics
    from slm.train import BatchStream

    def audits(run):
        return [(e["step"], e["audit/clean_kept"], e["audit/junk_dropped"]) for e in read_metrics(run)
                if "audit/clean_kept" in e]  # fmt: skip

    for name, extra in (("base", ["selector=all"]), ("oracle", ["selector=oracle"]), ("sel", ["selector.ratio=0.5"])):
        train_composed(compose_train(tmp_path / "c", *extra), tmp_path / name)
    assert [a[1:] for a in audits(tmp_path / "base")] == [(1.0, 0.0), (1.0, 0.0)]
    assert [a[1:] for a in audits(tmp_path / "oracle")] == [(1.0, 1.0), (1.0, 1.0)]
    packed = build(validate(compose_train(tmp_path / "c")).data)["train"].with_format("torch")
    stream = BatchStream(len(packed), 4, 1, 0, seed=0)
    selected = {e["step"]: e["tokens_selected"] for e in read_metrics(tmp_path / "sel") if "train/loss" in e}
    last = 0
    for step, clean_kept, junk_dropped in audits(tmp_path / "sel"):
        rows = [packed[stream.indices(s)] for s in range(last, step)]
        clean = sum(int((r["clean_mask"] & shifted_valid(r["labels"])).sum()) for r in rows)
        junk = sum(int(((r["junk_kind"] > 0) & shifted_valid(r["labels"])).sum()) for r in rows)
        neither = sum(int(shifted_valid(r["labels"]).sum()) for r in rows) - clean - junk
        kept = selected[step] - selected.get(last, 0)
        kept_neither = kept - (clean_kept * clean + (1 - junk_dropped) * junk)
        assert -1e-6 <= kept_neither <= neither + 1e-6 and neither > 0
        assert 0 < clean_kept < 1 and 0 < junk_dropped < 1
        last = step
    # slm-curves draws the audit panels from them
    from slm.analysis import curves, load_runs
    from slm.analysis.report import main as slm_curves

    runs = load_runs([str(tmp_path / n) for n in ("base", "oracle", "sel")])
    assert {c.group: float(c.mean[-1]) for c in curves(runs, "audit/junk_dropped")} == {
        "baseline (all tokens)": 0.0,
        "oracle (all but the junk)": 1.0,
        "excess_loss 0.5": audits(tmp_path / "sel")[-1][2],
    }
    slm_curves([str(tmp_path / n) for n in ("base", "oracle", "sel")] + ["--out", str(tmp_path / "plot")])
    assert (tmp_path / "plot" / "curves.png").stat().st_size > 0


def test_the_audit_reports_each_kind_of_junk_and_each_part_of_the_block(tmp_path):
    """Per kind of junk and per quarter of the block (issue 28 item 2), checked against counts taken from the
    packed data and the batch stream: the oracle drops every kind and keeps, of each quarter, exactly what is not
    junk; a selection's quarters add up to what it trained and its kinds to the junk it kept; slm-curves
    tabulates them."""
    from slm.cli.validation import validate
    from slm.data import build
    from slm.data.builtin import JUNK_KINDS
    from slm.model import shifted_valid
    from slm.runs import read_metrics
    from slm.train import BatchStream

    for name, extra in (("oracle", ["selector=oracle"]), ("sel", ["selector.ratio=0.5"])):
        train_composed(compose_train(tmp_path / "c", *extra), tmp_path / name)
    packed = build(validate(compose_train(tmp_path / "c")).data)["train"].with_format("torch")
    stream = BatchStream(len(packed), 4, 1, 0, seed=0)
    quarters = [f"audit/kept/position/{q * 25}-{q * 25 + 25}%" for q in range(4)]
    kinds = [f"audit/junk_dropped/{k}" for k in JUNK_KINDS]

    def counts(first: int, last: int):
        rows = [packed[stream.indices(s)] for s in range(first, last)]
        valid = [shifted_valid(r["labels"]) for r in rows]
        part = torch.arange(32) * 4 // 32  # block_size 32
        per = {"clean": [0] * 4, "all": [0] * 4, "kind": [0] * (len(JUNK_KINDS) + 1), "junk": 0}
        for r, v in zip(rows, valid):
            for q in range(4):
                per["clean"][q] += int(((r["junk_kind"] == 0) & v & (part == q)).sum())  # what the oracle trains
                per["all"][q] += int((v & (part == q)).sum())
            for k in range(len(JUNK_KINDS) + 1):
                per["kind"][k] += int((v & (r["junk_kind"] == k) & ~r["clean_mask"]).sum())
            per["junk"] += int((v & (r["junk_kind"] > 0)).sum())
        return per

    for name in ("oracle", "sel"):
        selected = {e["step"]: e["tokens_selected"] for e in read_metrics(tmp_path / name) if "train/loss" in e}
        last = 0
        for e in [e for e in read_metrics(tmp_path / name) if "audit/clean_kept" in e]:
            per = counts(last, e["step"])
            kept = selected[e["step"]] - selected.get(last, 0)
            if name == "oracle":
                assert [e[k] for k in kinds] == [1.0] * len(kinds)
                assert [e[q] for q in quarters] == pytest.approx([c / a for c, a in zip(per["clean"], per["all"])])
            else:
                assert sum(e[q] * a for q, a in zip(quarters, per["all"])) == pytest.approx(kept)
                kept_junk = (1 - e["audit/junk_dropped"]) * per["junk"]
                kept_by_kind = sum((1 - e[k]) * n for k, n in zip(kinds, per["kind"][1:]))
                assert kept_junk == pytest.approx(kept_by_kind)  # the junk share and the kinds count the same
                assert all(0 < e[k] < 1 for k in kinds)
            last = e["step"]
    from slm.analysis.report import main as slm_curves

    slm_curves([str(tmp_path / n) for n in ("oracle", "sel")] + ["--out", str(tmp_path / "plot")])
    table = (tmp_path / "plot" / "audit.md").read_text()
    for row in ("junk dropped: wrong_answer", "junk dropped: junk_problem", "kept of block part 0-25%"):
        assert row in table


def test_slm_inspect_names_each_junk_tokens_kind_and_what_was_dropped_of_each(tmp_path):
    """On a corpus that names its kinds of junk, the page marks every junk token with its kind (as packed) and
    says what share of each kind the sample dropped."""
    import re
    from html.parser import HTMLParser

    from slm.analysis import selection_sample
    from slm.analysis.inspect import write_page
    from slm.cli.validation import validate
    from slm.data import build
    from slm.model import shifted_valid

    cfg = compose_train(tmp_path / "c", "selector.ratio=0.5")
    train_composed(cfg, tmp_path / "run")
    page = write_page(tmp_path / "run", n_blocks=3).read_text()

    class Kinds(HTMLParser):
        def __init__(self):
            super().__init__()
            self.kinds = []

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag == "span" and "data-score" in a:  # a valid token (not padding, not the legend)
                self.kinds.append(a.get("data-kind"))

    parsed = Kinds()
    parsed.feed(page)
    packed = build(validate(cfg).data)["train"].select(range(3))
    names = ["not junk", "wrong_answer", "junk_problem"]
    valid = shifted_valid(torch.tensor(packed["labels"])).tolist()
    expected = [names[k] if k else None for kinds, ok in zip(packed["junk_kind"], valid)
                for k, v in zip(kinds, ok) if v]  # fmt: skip
    assert parsed.kinds == expected and {"wrong_answer", "junk_problem"} & set(expected)
    sample = selection_sample(tmp_path / "run", n_blocks=3)
    for label, name in enumerate(names[1:], 1):
        of_kind = sample.valid.astype(bool) & (sample.kind == label)
        if of_kind.any():
            share = 1 - (sample.mask.astype(bool) & of_kind).sum() / of_kind.sum()
            assert re.search(rf"{name} dropped {share:.0%}", page), name


def test_the_selection_sample_of_a_ratio_schedule_selects_at_the_ratio_it_ends_at(tmp_path):
    """run_info holds a schedule's label, not a number: the sample (slm-inspect, the notebook) selects at the
    schedule's last ratio, as the run's final steps did (before, it showed every token as kept)."""
    from slm.analysis import selection_sample
    from slm.selection import num_selected

    schedule = "selector.ratio={schedule: linear, start: 1.0, end: 0.4}"
    train_composed(compose_train(tmp_path / "c", schedule), tmp_path / "run")
    sample = selection_sample(tmp_path / "run", n_blocks=3)
    valid = torch.from_numpy(sample.valid)
    assert sample.ratio == 0.4 and int(sample.mask.sum()) == num_selected(valid, 0.4, "batch") < int(valid.sum())


def test_slm_inspect_selects_by_the_runs_own_rule_and_says_what_it_cannot_reproduce(tmp_path):
    """Issue 37 item 13: a train_loss run is shown ranked by the training loss (not by excess loss), a
    reference_loss run by its reference's stored loss per sequence when its scope says so; a block-selection
    run and a threshold over the run say on the page what the sample cannot reproduce."""
    from slm.analysis import selection_sample
    from slm.analysis.inspect import write_page
    from slm.model import shifted_valid, token_losses
    from slm.reference import expected_store, load_stored
    from slm.selection import select_tokens

    runs = {"train_loss": ["selector=train_loss", "selector.ratio=0.5"],
            "reference_loss": ["selector=reference_loss", "selector.ratio=0.5", "selector.scope=sequence"],
            "blocks": ["selector.blocks=0.5"], "dataset": ["selector.scope=dataset"]}  # fmt: skip
    for name, extra in runs.items():
        train_composed(compose_train(tmp_path / "c", *extra), tmp_path / name)
    from transformers import AutoModelForCausalLM

    from slm.cli.validation import validate
    from slm.data import build

    data = build(validate(compose_train(tmp_path / "c")).data)
    ds = data["train"].select(range(8)).with_format("torch")[:]  # the sample's 8 blocks, as tensors
    valid = shifted_valid(ds["labels"])
    for name, score, scope in (("train_loss", "train_loss", "batch"), ("reference_loss", "reference_loss", "sequence")):
        sample = selection_sample(tmp_path / name)
        model = AutoModelForCausalLM.from_pretrained(tmp_path / name / "model").eval()
        tl = token_losses(model, ds["input_ids"], ds["labels"], attention_mask=ds["attention_mask"])
        if score == "train_loss":
            expected = select_tokens(tl, 0.5, valid=valid, scope=scope)
        else:
            info = json.loads((tmp_path / name / "run_info.json").read_text())
            ref = load_stored(info["scores_dir"], expected_store(data)).rows(range(8))
            expected = select_tokens(-ref, 0.5, valid=valid, scope=scope)
        assert sample.score == score and sample.rule.startswith(name), (name, sample.rule)
        assert torch.equal(torch.as_tensor(sample.mask), expected), name
        assert not sample.unlike_the_run
    blocks, dataset = selection_sample(tmp_path / "blocks"), selection_sample(tmp_path / "dataset")
    assert any("of the blocks it read" in n for n in blocks.unlike_the_run)
    assert any("threshold over the whole run" in n for n in dataset.unlike_the_run)
    page = write_page(tmp_path / "dataset", None, 8).read_text()
    assert "cannot reproduce" in page and "threshold over the whole run" in page and "final model" in page
