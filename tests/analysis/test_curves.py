"""slm-curves and the analysis notebook on real (tiny) runs."""

import json
import os

import pytest
from support.compose import compose_train

from slm.analysis import Curve, load_runs, main, savings_table, tokens_to_reach
from slm.cli import train
from slm.runs import read_metrics


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    for ratio in ("1.0", "0.5"):
        for seed in (0, 1):
            cfg = compose_train(root / "cache", f"selector.ratio={ratio}", f"seed={seed}", "trainer.eval_every=2")
            train(cfg, root / "sweep" / f"r{ratio}-s{seed}")
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
    os.environ["SLM_SWEEP_DIR"], os.environ["SLM_NOTEBOOK_OUT"] = str(sweep), str(tmp_path)
    try:
        NotebookClient(nb, timeout=300, kernel_name="python3").execute()
    finally:
        del os.environ["SLM_SWEEP_DIR"], os.environ["SLM_NOTEBOOK_OUT"]
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    (hist,) = [c for c in nb.cells if c.cell_type == "code" and "ax.hist(" in c.source]
    assert any("image/png" in o.get("data", {}) for o in hist.outputs)  # the histogram is shown
    assert any("text/html" in o.get("data", {}) and "background:#b7f0b1" in o["data"]["text/html"] for o in outputs)
    assert (tmp_path / "curves.png").exists()


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


def _fake_run(root, name, ratio, seed, losses, max_steps=4, selector=None, width=32):
    """A run folder as slm-train writes it, with a chosen eval curve (tokens 100 per step)."""
    from omegaconf import OmegaConf

    run = root / name
    run.mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"seed": seed, "selector": {"name": selector or "excess_loss", "ratio": ratio},
                                     "trainer": {"max_steps": max_steps}, "model": {"width": width}}),
                   run / "config.yaml")  # fmt: skip
    sel = selector or ("all" if ratio == 1.0 else "excess_loss")
    (run / "run_info.json").write_text(json.dumps({"selector": sel, "ratio": ratio, "seed": seed}))
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
