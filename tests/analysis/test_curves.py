"""slm-curves and the analysis notebook on real (tiny) runs."""

import json
import os

import pytest
from support.compose import compose_train

from slm.analysis import Curve, curves, load_runs, main, savings_table, tokens_to_reach
from slm.cli import train_composed
from slm.runs import read_metrics


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    for ratio in ("1.0", "0.5"):
        for seed in (0, 1):
            cfg = compose_train(root / "cache", f"selector.ratio={ratio}", f"seed={seed}", "trainer.eval_every=2")
            train_composed(cfg, root / "sweep" / f"r{ratio}-s{seed}")
    return root / "sweep"


def test_tokens_to_reach_interpolates():
    import numpy as np

    c = Curve("x", False, x={"tokens_seen": np.array([0, 100, 200])}, mean=np.array([5.0, 3.0, 1.0]))
    assert tokens_to_reach(c, 3.0) == 100
    assert tokens_to_reach(c, 2.0) == 150
    assert tokens_to_reach(c, 0.5) is None


def test_curves_cli_writes_plots_and_table(sweep, tmp_path, capsys):
    main([str(sweep), "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert (tmp_path / "curves.png").stat().st_size > 10_000 and (tmp_path / "curves.svg").exists()
    assert "baseline (all tokens)" in printed and "excess_loss 0.5" in printed
    rows = list((tmp_path / "tokens_to_baseline.csv").read_text().splitlines())
    assert len(rows) == 3 and rows[0].startswith("run,seeds,final_eval_loss")
    assert ",2," in rows[1]  # two seeds averaged


def test_baseline_row_reaches_itself_at_its_last_point(sweep):
    from slm.analysis import curves

    rows, note = savings_table(curves(load_runs([str(sweep)])))
    assert note is None
    base = next(r for r in rows if r["run"].startswith("baseline"))
    assert base["fraction_of_baseline_tokens"] <= 1.0 and base["seeds"] == 2


def test_single_run_and_runs_without_evals(sweep, tmp_path, capsys):
    main([str(sweep / "r0.5-s0"), "--out", str(tmp_path / "one")])
    assert "no baseline run" in capsys.readouterr().out
    empty = tmp_path / "running"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text(json.dumps({"step": 1, "tokens_seen": 10, "train/loss": 3.0}) + "\n")
    main([str(sweep), str(empty), "--out", str(tmp_path / "two")])
    assert "has no eval/loss points; skipped" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="none of the runs has eval/loss points"):
        main([str(empty)])


def test_notebook_executes(sweep, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(os.path.join(os.path.dirname(__file__), "..", "..", "notebooks", "analysis.ipynb"), as_version=4)
    os.environ["SLM_SWEEP_DIR"] = str(sweep)
    here = tmp_path / "notebooks"  # the kernel runs where the notebook lives
    here.mkdir()
    before = (sweep / "curves.png").stat().st_mtime_ns if (sweep / "curves.png").exists() else None
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(here)}}).execute()
    finally:
        del os.environ["SLM_SWEEP_DIR"]
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    (hist,) = [c for c in nb.cells if c.cell_type == "code" and "ax.hist(" in c.source]
    assert any("image/png" in o.get("data", {}) for o in hist.outputs)  # the histogram is shown
    assert any("text/html" in o.get("data", {}) and "background:#b7f0b1" in o["data"]["text/html"] for o in outputs)
    assert (tmp_path / "outputs" / "notebook" / "curves.png").exists()  # beside the notebook, not in the sweep
    after = (sweep / "curves.png").stat().st_mtime_ns if (sweep / "curves.png").exists() else None
    assert after == before


def test_an_interrupted_seed_is_labelled_partial_not_silently_averaged(sweep, tmp_path, capsys):
    import shutil

    mixed = tmp_path / "mixed"
    for name in ("r1.0-s0", "r0.5-s0", "r0.5-s1"):
        shutil.copytree(sweep / name, mixed / name)
    cut = mixed / "r0.5-s1"
    events = [e for e in read_metrics(cut) if e["step"] <= 2]
    (cut / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (cut / "result.json").write_text(json.dumps({"status": "interrupted", "step": 2}))
    main([str(mixed), "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert "excess_loss 0.5 is partial: 1 of 2 runs incomplete (r0.5-s1: interrupted at step 2 of 6)" in printed
    assert "| excess_loss 0.5 (partial) |" in printed


def _fake_run(root, name, ratio, seed, losses, max_steps=4, selector=None, width=32, scope=None, info=None):
    """A run folder as slm-train writes it, with a chosen eval curve (tokens 100 per step)."""
    from omegaconf import OmegaConf

    run = root / name
    run.mkdir(parents=True)
    chosen = {"name": selector or "excess_loss", "ratio": ratio, **({"scope": scope} if scope else {})}
    OmegaConf.save(OmegaConf.create({"seed": seed, "selector": chosen,
                                     "trainer": {"max_steps": max_steps}, "model": {"width": width}}),
                   run / "config.yaml")  # fmt: skip
    sel = selector or ("all" if ratio == 1.0 else "excess_loss")
    (run / "run_info.json").write_text(json.dumps({"selector": sel, "ratio": ratio, "seed": seed, **(info or {})}))
    (run / "result.json").write_text(json.dumps({"status": "finished"}))
    events = [{"step": s, "tokens_seen": 100 * s, "tokens_selected": int(100 * s * ratio), "train_time_s": 2.0 * s,
               "flops": 1e9 * s * (1 + ratio), "eval/loss": v} for s, v in enumerate(losses)]  # fmt: skip
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))


def test_fractions_are_paired_by_seed_and_sweeps_with_other_settings_are_never_averaged(tmp_path, capsys):
    root = tmp_path / "multirun"
    # sweep A: baseline and ratio 0.5, two seeds; seed 1's baseline ends higher than seed 0's
    _fake_run(root / "a", "base0", 1.0, 0, [5, 4, 3, 2, 1.0])
    _fake_run(root / "a", "base1", 1.0, 1, [5, 4, 3, 2.5, 2.0])
    _fake_run(root / "a", "half0", 0.5, 0, [5, 3, 1.5, 1.0, 0.8])  # reaches 1.0 at step 3
    _fake_run(root / "a", "half1", 0.5, 1, [5, 3, 2.0, 1.5, 1.2])  # reaches 2.0 at step 2
    # sweep B: another model width, also seed 0: its own groups, never "seeds" of sweep A's
    _fake_run(root / "b", "base0", 1.0, 0, [6, 5, 4, 3, 2.0], width=64)
    _fake_run(root / "b", "half0", 0.5, 0, [6, 4, 3, 2, 1.5], width=64)
    from slm.analysis import curves, savings_table

    cs = curves(load_runs([str(root)]))
    labels = sorted(c.group for c in cs)
    assert labels == ["baseline (all tokens) [model.width=32]", "baseline (all tokens) [model.width=64]",
                      "excess_loss 0.5 [model.width=32]", "excess_loss 0.5 [model.width=64]"]  # fmt: skip
    assert {len(c.runs) for c in cs if "width=32" in c.group} == {2}
    rows, note = savings_table(cs)
    assert rows == [] and "2 baseline groups" in note and "--baseline" in note  # which one is ambiguous
    rows, note = savings_table(cs, baseline="baseline (all tokens) [model.width=32]")
    half = next(r for r in rows if r["run"].startswith("excess_loss 0.5 [model.width=32]"))
    # paired: seed 0 reaches its baseline's 1.0 at 300 of 400 tokens, seed 1 its 2.0 at 200 of 400
    assert half["fraction_of_baseline_tokens"] == pytest.approx((0.75 + 0.5) / 2)
    assert half["worst_seed_fraction"] == 0.75
    assert half["fraction_of_baseline_time"] == pytest.approx((0.75 + 0.5) / 2)
    other = next(r for r in rows if r["run"].startswith("excess_loss 0.5 [model.width=64]"))
    assert other["fraction_of_baseline_tokens"] is None and other["notes"] == "1 of 1 seed(s) never reached it"
    main([str(root), "--out", str(tmp_path / "out"), "--baseline", str(root / "a" / "base0")])
    assert "| baseline: baseline (all tokens) [model.width=32]" in capsys.readouterr().out


def test_any_group_can_be_the_baseline_and_unequal_eval_points_do_not_divide_by_zero(tmp_path):
    from slm.analysis import curves, savings_table

    root = tmp_path / "runs"
    _fake_run(root, "random", 0.5, 0, [5, 4, 3, 2.5, 2.2], selector="random")
    _fake_run(root, "slm", 0.5, 0, [5, 3, 2, 1.5, 1.2])
    _fake_run(root, "base", 1.0, 0, [5.0])  # a baseline that logged only its first eval point
    rows, note = savings_table(curves(load_runs([str(root)])))
    assert note is None and all(r["fraction_of_baseline_tokens"] is None or r["seeds"] for r in rows)
    rows, note = savings_table(curves(load_runs([str(root)])), baseline="random")
    slm = next(r for r in rows if r["run"].startswith("excess_loss"))
    assert slm["fraction_of_baseline_tokens"] == pytest.approx(0.25 + 0.25 * (3 - 2.2) / (3 - 2))


def test_settings_that_do_not_act_when_every_token_trains_never_label_the_baseline(tmp_path):
    """A baseline trains every token whatever its selector.scope says: only the arms are told apart by it."""
    from slm.analysis import curves

    root = tmp_path / "runs"
    _fake_run(root, "base", 1.0, 0, [5, 4, 3], scope="batch")
    _fake_run(root, "topk", 0.5, 0, [5, 3, 2], scope="batch")
    _fake_run(root, "threshold", 0.5, 0, [5, 3, 1.5], scope="dataset")
    labels = sorted(c.group for c in curves(load_runs([str(root)])))
    assert labels == ["baseline (all tokens)", "excess_loss 0.5 [selector.scope=batch]",
                      "excess_loss 0.5 [selector.scope=dataset]"]  # fmt: skip
    _fake_run(root, "base_dataset", 1.0, 1, [5, 4, 2.5], scope="dataset")  # the same experiment: another seed
    base = next(c for c in curves(load_runs([str(root)])) if c.is_baseline)
    assert len(base.runs) == 2


def test_a_folder_of_several_sweeps_reads_the_newest_and_says_which(tmp_path, capsys):
    """Two sweeps with the same settings under multirun/default are never pooled as seeds: the newest is
    read and named, the older one listed; named folders are read as given (issue 26, item 11)."""
    root = tmp_path / "multirun" / "default"
    for stamp, shift in (("2026-12-01_10-00-00", 0.0), ("2026-12-02_10-00-00", 0.5)):
        sweep = root / stamp
        sweep.mkdir(parents=True)
        (sweep / "multirun.yaml").write_text("hydra: {}\n")  # what Hydra's sweeper writes in the sweep folder
        _fake_run(sweep, "0_base", 1.0, 0, [5, 4, 3 + shift, 2 + shift, 1.0 + shift])
        _fake_run(sweep, "1_half", 0.5, 0, [5, 3, 1.5 + shift, 1.0 + shift, 0.8 + shift])
    main([str(root), "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert "holds 2 sweeps" in out and "2026-12-02_10-00-00" in out and "2026-12-01_10-00-00" in out
    base = next(c for c in curves(load_runs([str(root)])) if c.is_baseline)
    assert [r.path for r in base.runs] == [str(root / "2026-12-02_10-00-00" / "0_base")]
    rows, _ = savings_table(curves(load_runs([str(root)])))
    assert next(r for r in rows if r["run"].startswith("baseline"))["fraction_of_baseline_time"] == 1.0
    both = load_runs([str(root / "2026-12-01_10-00-00"), str(root / "2026-12-02_10-00-00")])
    assert len(both) == 4  # named sweep folders are all read, each sweep its own groups
    assert sorted(c.group for c in curves(both) if c.is_baseline) == [
        "baseline (all tokens) [sweep=2026-12-01_10-00-00]",
        "baseline (all tokens) [sweep=2026-12-02_10-00-00]",
    ]


def test_a_fraction_resting_on_too_few_eval_points_is_marked(tmp_path):
    """Two eval points make a straight line of any curve: the table says the fraction is rough (issue 26, 10)."""
    from slm.runs import MIN_EVAL_POINTS

    root = tmp_path / "runs"
    _fake_run(root, "base", 1.0, 0, [5, 2.0], max_steps=1)
    _fake_run(root, "half", 0.5, 0, [5, 1.5], max_steps=1)
    rows, _ = savings_table(curves(load_runs([str(root)])))
    half = next(r for r in rows if r["run"].startswith("excess_loss"))
    assert half["fraction_of_baseline_tokens"] is not None
    assert f"rests on 2 eval points (fewer than {MIN_EVAL_POINTS})" in half["notes"]
    dense = tmp_path / "dense"
    _fake_run(dense, "base", 1.0, 0, [5, 4, 3, 2.5, 2.0], max_steps=4)
    _fake_run(dense, "half", 0.5, 0, [5, 3, 2.5, 1.8, 1.5], max_steps=4)
    rows, _ = savings_table(curves(load_runs([str(dense)])))
    assert all("eval points" not in r["notes"] for r in rows)


def test_with_an_oracle_every_group_gets_its_distance_from_it(tmp_path):
    from slm.analysis import curves, savings_table

    root = tmp_path / "runs"
    _fake_run(root, "base", 1.0, 0, [5, 4, 3, 2, 1.0])
    _fake_run(root, "slm", 0.5, 0, [5, 3, 2, 1.0, 0.8])  # reaches 1.0 at step 3: 0.75 of the baseline's tokens
    _fake_run(root, "oracle", 1.0, 0, [5, 2, 1.0, 0.7, 0.6], selector="oracle")  # at step 2: 0.5
    rows, note = savings_table(curves(load_runs([str(root)])))
    by = {r["run"].split(" ")[0]: r for r in rows}
    assert note is None and by["oracle"]["fraction_of_baseline_tokens"] == 0.5
    assert by["excess_loss"]["fraction_vs_oracle"] == 1.5 and by["oracle"]["fraction_vs_oracle"] == 1.0
    assert list(by["baseline"])[-1] == "notes"
    rows, _ = savings_table(curves(load_runs([str(root / "base"), str(root / "slm")])))
    assert all("fraction_vs_oracle" not in r for r in rows)  # no oracle, no column


def test_the_audit_table_weights_each_interval_by_the_tokens_it_read(tmp_path):
    """Issue 37 item 12: a short last interval (a run ending between eval points) weighs by its tokens, not as
    much as a full one; the table says so."""
    from slm.analysis import load_runs
    from slm.analysis.audit_report import audit_table, write_audit

    _fake_run(tmp_path, "run", 0.5, 0, [5, 4, 3])
    path = tmp_path / "run" / "metrics.jsonl"
    events = [json.loads(line) for line in path.read_text().splitlines()]
    for e, tokens, kept in zip(events, (0, 1000, 1100), (None, 0.2, 1.0)):  # intervals of 1000 and 100 tokens
        e["tokens_seen"] = tokens
        if kept is not None:
            e["audit/clean_kept"] = kept
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    (row,) = audit_table(load_runs([str(tmp_path / "run")]))
    (value,) = [v for k, v in row.items() if k != "audit"]
    assert value == pytest.approx((1000 * 0.2 + 100 * 1.0) / 1100)  # not (0.2 + 1.0) / 2
    (tmp_path / "out").mkdir()
    assert "weighted by the tokens each read" in write_audit([row], tmp_path / "out")


def test_fractions_are_measured_against_the_baselines_first_crossing_and_a_rising_end_is_flagged(tmp_path):
    """Issue 37 item 20: a baseline whose curve rises at its end reaches its own final loss before its end. Every
    run, the baseline included, is measured against that first crossing: the baseline's row reads 1.0 by
    construction, and the table says the baseline's curve rose."""
    from slm.analysis import curves, load_runs, savings_table

    _fake_run(tmp_path, "base", 1.0, 0, [5, 3, 2, 1.5, 2.0])  # final 2.0, first reached at step 2 (200 tokens)
    _fake_run(tmp_path, "half", 0.5, 0, [5, 2.0, 1.8, 1.7, 1.6])  # reaches 2.0 at step 1 (100 tokens)
    rows, _ = savings_table(curves(load_runs([str(tmp_path / "base"), str(tmp_path / "half")])))
    base, half = (next(r for r in rows if r["run"].startswith(name)) for name in ("baseline", "excess_loss 0.5"))
    for key in ("fraction_of_baseline_tokens", "fraction_of_baseline_time", "fraction_of_baseline_flops"):
        assert base[key] == 1.0, key
    assert half["fraction_of_baseline_tokens"] == pytest.approx(0.5)  # 100 of the baseline's 200, not of 400
    assert half["fraction_of_baseline_time"] == pytest.approx(0.5)
    assert half["fold_saving"] == pytest.approx(2.0)
    assert "rises at its end" in base["notes"] and "first crossing" in base["notes"]


def test_figures_read_at_any_length(tmp_path):
    """Issue 38 item 1: with 2 eval points every curve still shows (a marker at each point, y-limits around the
    values, not clipped to stubs), is labelled rough, and the figure has a title and the baseline's target;
    a long sweep is not labelled rough; the reference's level is drawn for whichever eval set the metric
    names (its quality measured on the run's own sets)."""
    from slm.analysis import curves, load_runs
    from slm.analysis.plots import draw

    for name, n in (("short", 2), ("long", 7)):
        _fake_run(tmp_path / name, "base", 1.0, 0, [5, 3, 2.5, 2.2, 2.1, 2.05, 2.0][:n])
        _fake_run(tmp_path / name, "half", 0.5, 0, [5, 2.4, 2.1, 2.0, 1.9, 1.85, 1.8][:n])
        cs = curves(load_runs([str(tmp_path / name)]))
        fig = draw(cs, [], title=name)
        ax = fig.axes[0]
        lines = [line for line in ax.get_lines() if not line.get_label().startswith(("the baseline's", "_"))]
        assert len(lines) == 2 and all(line.get_marker() == "o" for line in lines)
        lo, hi = ax.get_ylim()
        shown = [y for line in lines for y in (line.get_ydata() if n == 2 else line.get_ydata()[1:])]
        assert all(lo <= y <= hi for y in shown)  # every point in view (but step 0's, far above, on a long curve)
        labels = [line.get_label() for line in lines]
        assert all(("rough: 2 eval points" in label) == (n == 2) for label in labels)
        target = [line for line in ax.get_lines() if line.get_label() == "the baseline's final value (target)"]
        assert target and target[0].get_ydata()[0] == ([5, 3][n - 1] if n == 2 else 2.0)
        assert fig._suptitle is not None and fig._suptitle.get_text().startswith(f"{name}: eval/loss")
    # the reference's level on a named eval set
    run = tmp_path / "ref" / "half"
    _fake_run(tmp_path / "ref", "half", 0.5, 0, [5, 2.4, 2.1, 2.0, 1.9])
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    (run / "metrics.jsonl").write_text("".join(json.dumps({**e, "eval/clean/loss": e["eval/loss"] + 0.1}) + "\n"
                                               for e in events))  # fmt: skip
    info = json.loads((run / "run_info.json").read_text())
    info["reference_quality"] = {"eval/clean/loss": 1.7, "measured_on": "this run's eval sets"}
    (run / "run_info.json").write_text(json.dumps(info))
    (c,) = curves(load_runs([str(run)]), "eval/clean/loss")
    ax = draw([c], [], "eval/clean/loss").axes[0]
    assert [line.get_ydata()[0] for line in ax.get_lines() if line.get_linestyle() == ":"] == [1.7]


def test_the_references_cost_is_charged_to_the_runs_that_select_with_it(tmp_path, capsys):
    """Issue 39 item 5: beside each fraction of the baseline's cost, the same with the reference's training and
    its store's scoring added to what the run paid (a run without a reference pays nothing more)."""
    from slm.analysis import curves, savings_table

    root = tmp_path / "runs"
    cost = {"train_tokens": 100, "train_time_s": 1.0, "train_flops": 1e9, "score_tokens": 400, "score_time_s": 1.0,
            "score_flops": 0.5e9, "shared": "..."}  # fmt: skip
    _fake_run(root, "base", 1.0, 0, [5, 4, 3, 2, 1.0])
    _fake_run(root, "slm", 0.5, 0, [5, 3, 2, 1.0, 0.8], info={"reference_cost": cost, "reference_eval_loss": {}})
    _fake_run(root, "random", 0.5, 0, [5, 3.5, 2.5, 1.5, 1.0], selector="random")  # reaches at step 4
    rows, note = savings_table(curves(load_runs([str(root)])))
    by = {r["run"].split(" ")[0]: r for r in rows}
    for seed, chosen in ((0, 0.4), (1, 0.45)):  # selector.ratio=auto chose per seed: one group, both named
        info = {"ratio": chosen, "ratio_auto": {"ratio": chosen}}  # the config says auto for both (0.5 here)
        _fake_run(root / "more", f"auto{seed}", 0.5, seed, [5, 3, 2, 1.0, 0.8], info=info, selector="excess_loss")
    (auto,) = curves(load_runs([str(root / "more")]))
    assert auto.group == "excess_loss auto (0.4, 0.45)" and len(auto.runs) == 2
    slm = by["excess_loss"]  # reaches the baseline's 1.0 at step 3: 300 of its 400 tokens, 6 of 8 s
    assert slm["fraction_of_baseline_tokens"] == 0.75
    assert slm["fraction_of_baseline_tokens_with_reference"] == pytest.approx((300 + 100) / 400)
    assert slm["fraction_of_baseline_time_with_reference"] == pytest.approx((6 + 1 + 1) / 8)
    assert slm["fraction_of_baseline_flops_with_reference"] == pytest.approx((4.5e9 + 1.5e9) / 8e9)
    assert by["baseline"]["fraction_of_baseline_tokens_with_reference"] == 1.0
    assert by["random"]["fraction_of_baseline_tokens_with_reference"] == by["random"]["fraction_of_baseline_tokens"]
    main([str(root), "--out", str(tmp_path / "out")])
    assert "shared by every run of a sweep" in capsys.readouterr().out
    rows, _ = savings_table(curves(load_runs([str(root / "base"), str(root / "random")])))
    assert all("fraction_of_baseline_tokens_with_reference" not in r for r in rows)  # no cost recorded: no column
