"""slm-bench --model: the expected GPU cost of the head's kernels, from FLOPs and bytes counted by hand."""

import pytest

from slm.bench import main
from slm.bench.perf_model import ANCHORS_H200_MS, EFFICIENCY, GPUS, Kernel, head_kernels


def test_the_counts_are_the_hand_counts():
    n, h, v, k = 128, 16, 100, 32
    score, grad, dw, dh = head_kernels(n, h, v, k, block_n=64, sms=132)
    assert score.flops == 2 * n * h * v and grad.flops == 2 * k * h * v
    assert dw.flops == dh.flops == 2 * k * v * h
    assert score.bytes == n * h * 2 + 1 * v * h * 2 + 8 * n  # one wave of two row blocks reads the weight once
    assert grad.bytes == k * h * 2 + v * h * 2 + k * v * 2  # and writes the logit gradient once
    many = head_kernels(64 * 300, h, v, k, block_n=64, sms=132)[0]  # 300 row blocks: three waves
    assert many.bytes == 64 * 300 * h * 2 + 3 * v * h * 2 + 8 * 64 * 300
    masked = head_kernels(n, h, v, k, scored=k)[0]  # a loss_mask scores only the trained rows
    assert masked.flops == 2 * k * h * v


def test_expected_time_is_the_slower_of_compute_and_memory():
    tflops, tbs, _ = GPUS["H200"]
    compute_bound = Kernel("c", flops=1e12, bytes=1e6)
    memory_bound = Kernel("m", flops=1e6, bytes=1e10)
    assert compute_bound.ms("H200") == pytest.approx(1e3 * 1e12 / (tflops * 1e12 * EFFICIENCY["compute"]))
    assert memory_bound.ms("H200") == pytest.approx(1e3 * 1e10 / (tbs * 1e12 * EFFICIENCY["memory"]))


def test_slm_bench_model_prints_both_gpus_beside_the_measured_anchors(capsys):
    main(["--model"])
    out = capsys.readouterr().out
    assert "Expected on H100" in out and "Expected on H200" in out
    assert f"decoder alone {ANCHORS_H200_MS['decoder alone']:.0f} ms" in out and "CCE score-then-train 169 ms" in out
    for line in (row for row in out.splitlines() if row.startswith("| step = decoder")):
        for cell in line.split("|")[2:-1]:
            total, ratio = cell.split(" ms (")
            assert float(ratio.rstrip("x) ")) == pytest.approx(float(total) / 139, abs=0.01)


def test_the_sparse_backward_counts_scale_the_linear_backward_by_the_kept_rows():
    from slm.bench.perf_model import DECODER_SHAPES, decoder_kernels

    shape = DECODER_SHAPES["TinyLlama-1.1B"]
    h, i, kv = shape["hidden"], shape["inter"], shape["hidden"] // shape["heads"] * shape["kv"]
    weights = shape["layers"] * (2 * h * h + 2 * h * kv + 3 * h * i)
    exact = {k.name: k for k in decoder_kernels(shape, None)}
    kept = shape["tokens"] // 4
    sparse = {k.name: k for k in decoder_kernels(shape, kept)}
    assert exact["linear forward"].flops == 2 * shape["tokens"] * weights == sparse["linear forward"].flops
    assert exact["linear backward"].flops == 4 * shape["tokens"] * weights
    assert sparse["linear backward"].flops == 4 * kept * weights
    assert sparse["attention forward + backward"].flops == exact["attention forward + backward"].flops
    assert "row gathers and scatters" not in exact and sparse["row gathers and scatters"].bytes > 0


def test_slm_bench_model_prints_the_sparse_backward_table(capsys):
    main(["--model"])
    out = capsys.readouterr().out
    assert "Sparse backward, expected on H100" in out and "Sparse backward, expected on H200" in out
    rows = [r for r in out.splitlines() if r.startswith("| Qwen2.5-0.5B | 0.") or r.startswith("| TinyLlama")]
    assert len(rows) == 8 and all(float(r.split("|")[-2].strip().rstrip("x")) < 1 for r in rows)
