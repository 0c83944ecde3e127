"""slm-bench: one training step of each head strategy against HF's, time and peak memory as ratios.
Imports slm.head and slm.model only (it runs where only torch, transformers, triton and pytest are).

  runner.py       timing, memory, tables, main (slm-bench and python -m slm.bench)
  workloads.py    model shapes and the cases of each table
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
