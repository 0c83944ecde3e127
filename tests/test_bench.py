"""slm-bench runs every case on one model and reports ratios to the HF baseline of the same run."""

import json

from slm.bench import BASELINE, main


def test_bench_table_and_json(tmp_path, capsys):
    main(["--shape", "tiny", "--steps", "2", "--warmup", "1", "--json", str(tmp_path / "b.json")])
    printed = capsys.readouterr().out
    res = json.loads((tmp_path / "b.json").read_text())["cases"]
    expected = {BASELINE, "backbone_only (floor)", "slm_loss_mask_0.3", "slm_excess_1.0", "slm_excess_0.6",
                "slm_excess_0.3"}  # fmt: skip
    assert set(res) == expected
    assert res[BASELINE]["time_ratio"] == 1.0 and res[BASELINE]["mem_ratio"] == 1.0
    for name, r in res.items():
        assert r["ms"] > 0 and r["peak_mib"] >= 0 and r["tokens_per_s"] > 0
        assert f"| {name} |" in printed
