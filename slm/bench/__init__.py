"""slm-bench: one training step of each head strategy against HF's, time and peak memory as ratios.
Imports slm.head and slm.model only (it runs where only torch, transformers, triton and pytest are).

  runner.py       timing, memory, tables, main (slm-bench and python -m slm.bench)
  workloads.py    model shapes and the cases of each table
  perf_model.py   expected GPU milliseconds of the head's kernels from FLOPs and bytes (slm-bench --model)
  kernel_resources.py  the Triton kernels compiled for GPU targets on any machine: registers, spills, shared
                  memory per config and flag set (scripts/kernel_compile_check.py)
"""

from slm.bench.runner import main
from slm.bench.workloads import BASELINE, FLOOR, SHAPES, SPARSE_CASES, build_workload, cases

__all__ = [
    "BASELINE",
    "FLOOR",
    "SHAPES",
    "SPARSE_CASES",
    "build_workload",
    "cases",
    "main",
]
