"""python -m slm.analysis.fidelity: the sparse backward's gradient against the exact one, per parameter group."""

import pytest

from slm.analysis import fidelity


@pytest.mark.slow  # packs the real-text corpus into a fresh cache (about 30 s)
def test_the_report_compares_every_group_and_the_head_is_exact(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SLM_CACHE", str(tmp_path))
    monkeypatch.setattr(fidelity, "TRAIN_STEPS", 3)
    fidelity.main([])
    out = capsys.readouterr().out
    rows = {r.split("|")[1].strip(): r.split("|")[2:-1] for r in out.splitlines() if r.startswith("| ")}
    assert list(rows) == ["parameters", "embedding", "layer 0", "layer 1", "final norm + head", "total"]
    assert [c.strip() for c in rows["parameters"]] == ["all, 0.3", "top 1, 0.3", "all, 0.6", "top 1, 0.6"]
    cells = {g: [tuple(float(x) for x in c.split(" / ")) for c in v] for g, v in rows.items() if g != "parameters"}
    assert all(cos == 1.0 and rel == 0.0 for cos, rel in cells["final norm + head"])  # above every chosen layer
    for cos, rel in cells["total"]:
        assert 0.5 < cos < 1.0 and 0.0 < rel < 1.0  # something is dropped, the direction is kept
    # the top layer alone drops less below it than both layers do
    assert cells["layer 0"][1][1] < cells["layer 0"][0][1] and cells["layer 0"][3][1] < cells["layer 0"][2][1]
