"""slm-curves and the analysis notebook on real (tiny) runs."""

import json
import os

import pytest
from helpers import compose_train

from slm.cli import train
from slm.curves import Curve, load_runs, main, savings_table, tokens_to_reach
from slm.tracking import read_metrics


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
    from slm.curves import curves

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

    nb = nbformat.read(os.path.join(os.path.dirname(__file__), "..", "notebooks", "analysis.ipynb"), as_version=4)
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
