"""slm-bench runs every case on one model and reports ratios to the baselines of the same run."""

import json

import pytest
import torch
from support.hf_reference import NEEDS_TRITON

import slm.bench.workloads as bench_cases
from slm.bench import BASELINE, FLOOR, SPARSE_CASES, build_workload, cases, main


def test_bench_table_and_json(tmp_path, capsys):
    main(["--shape", "tiny", "--steps", "2", "--warmup", "1", "--json", str(tmp_path / "b.json")])
    printed = capsys.readouterr().out
    res = json.loads((tmp_path / "b.json").read_text())["cases"]
    expected = {BASELINE, FLOOR, "slm_loss_mask_0.3", "slm_loss_mask_0.6", "slm_excess_1.0", "slm_excess_0.6",
                "slm_excess_0.3", "torch_linear_ce_mask_0.6"}  # fmt: skip
    assert set(res) == expected  # Liger and CCE join on CUDA only
    assert res[BASELINE]["time_ratio"] == 1.0 and res[BASELINE]["mem_ratio"] == 1.0
    assert res[FLOOR]["floor_ratio"] == 1.0
    for name, r in res.items():
        assert r["ms"] > 0 and r["peak_mib"] >= 0 and r["tokens_per_s"] > 0
        assert r["floor_ratio"] == r["ms"] / res[FLOOR]["ms"]
        assert f"| {name} |" in printed


def test_the_masked_cases_compute_the_baselines_loss():
    """The comparison is like with like: every case that trains the baseline's 60% mask gets its loss."""
    model, ids, ref_loss, mask = build_workload("tiny", "cpu", torch.float32, None, None)
    run = cases(model, ids, ref_loss, mask, ["torch"])
    expected = run[BASELINE]().item()
    for name in ("slm_loss_mask_0.6", "torch_linear_ce_mask_0.6"):
        assert run[name]().item() == pytest.approx(expected, rel=1e-5), name


def test_a_failing_case_is_reported_and_the_others_still_run(tmp_path, capsys, monkeypatch):
    real = bench_cases._library_cases

    def with_a_broken_library(*args):
        return {**real(*args), "broken_library": lambda: (_ for _ in ()).throw(RuntimeError("no kernel image"))}

    monkeypatch.setattr(bench_cases, "_library_cases", with_a_broken_library)
    main(["--shape", "tiny", "--steps", "1", "--warmup", "1", "--only", "broken_library", "--json",
          str(tmp_path / "b.json")])  # fmt: skip
    printed = capsys.readouterr().out
    res = json.loads((tmp_path / "b.json").read_text())
    assert res["cases"]["broken_library"] == {"error": "RuntimeError: no kernel image"}
    assert res["cases"][FLOOR]["ms"] > 0 and "floor_ratio" in res["cases"][BASELINE]
    assert "| broken_library | failed: RuntimeError: no kernel image |" in printed
    assert "head backends measured: torch" in res["setup"] and "torch 2." in printed


@NEEDS_TRITON  # the triton cases run its kernels (in Triton's interpreter on CPU)
def test_every_head_backend_gets_its_own_cases():
    model, ids, ref_loss, mask = build_workload("tiny", "cpu", torch.float32, 1, 16)
    names = set(cases(model, ids, ref_loss, mask, ["torch", "triton"]))
    for backend in ("torch", "triton"):
        assert {f"slm_{backend}_loss_mask_0.3", f"slm_{backend}_excess_0.6", f"slm_{backend}_excess_1.0"} <= names
    run = cases(model, ids, ref_loss, mask, ["torch", "triton"])  # the same step on both backends
    a, b = run["slm_torch_excess_0.3"](), run["slm_triton_excess_0.3"]()
    assert a.item() == pytest.approx(b.item(), rel=1e-5)


@pytest.mark.slow  # about twenty fresh processes
def test_scoring_and_sparse_mask_tables(tmp_path, capsys):
    main(["--shape", "tiny", "--scoring", "--steps", "2", "--warmup", "1", "--json", str(tmp_path / "s.json")])
    scoring = json.loads((tmp_path / "s.json").read_text())["cases"]
    assert set(scoring) == {"slm_token_losses", "hf_full_logits"}
    # --quick: batches 1 and 2 of the default 1-8, 3 steps (one run serves both checks: it costs fresh processes)
    main(["--shape", "tiny", "--sparse-mask", "--quick", "--json", str(tmp_path / "m.json")])
    sparse = json.loads((tmp_path / "m.json").read_text())["batches"]
    assert set(sparse) == {"1", "2"}
    for rows in sparse.values():
        assert set(rows) == set(SPARSE_CASES)
        assert all(r["peak_mib"] >= 0 and r["accumulating_peak_mib"] >= 0 for r in rows.values())
    printed = capsys.readouterr().out
    assert "peak MiB, accumulating" in printed and "should take about" in printed
    assert "x batches [1, 2], 4 steps each" in printed  # 1 warm-up + 3
