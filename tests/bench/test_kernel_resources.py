"""The head's Triton kernels compile for real GPU targets on this CPU-only machine, fit their shared memory
and spill nothing, in every autotune config (scripts/kernel_compile_check.py; the full matrix is slow);
and the check itself fails on a config that spills. Each runs in its own process: the compile needs
TRITON_INTERPRET unset, which the rest of the suite sets."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "kernel_compile_check.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=3000)


def test_every_autotune_config_compiles_for_h100_and_a100_without_spills(tmp_path):
    from slm.head.fused import AUTOTUNE_CONFIGS

    done = _run(str(SCRIPT), "--out", str(tmp_path / "check.md"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [r for r in (tmp_path / "check.md").read_text().splitlines() if r.startswith("| loss_kernel")
            or r.startswith("| grad_kernel")]  # fmt: skip
    assert len(rows) == 2 * 2 * len(AUTOTUNE_CONFIGS["16-bit"])  # two kernels, sm_80 and sm_90a, bf16
    assert all(r.endswith("| 0 | 0 | ok |") for r in rows)
    assert any("sm_90a" in r for r in rows) and any("sm_80" in r for r in rows)


def test_the_check_fails_on_a_config_that_spills():
    """(64, 128, 64) with 4 warps was an autotune config before this check: 612 bytes of spill stores on sm_90a."""
    code = (
        "from slm.bench.kernel_resources import Case, compile_case, flag_sets\n"
        "flags = flag_sets('loss_kernel', 'bf16', False)[0]\n"
        "r = compile_case(Case('loss_kernel', (64, 128, 64, 4, 3), 'bf16', flags, 90))\n"
        "print(r.spill_stores, r.problem)"
    )
    done = _run("-c", code)
    assert done.returncode == 0, done.stderr[-3000:]
    spilled, problem = done.stdout.split(" ", 1)
    assert int(spilled) > 0 and problem.startswith("spills")


@pytest.mark.slow
def test_every_kernel_config_and_flag_set_compiles_for_a100_and_h100_without_spills(tmp_path):
    """Every flag set on A100 and H100 for bf16 (fp16 compiles the same code with the same configs) and float32."""
    args = ("--full", "--arch", "80", "--arch", "90", "--dtype", "bf16", "--dtype", "fp32")
    done = _run(str(SCRIPT), *args, "--out", str(tmp_path / "full.md"))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
