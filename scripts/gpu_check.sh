#!/usr/bin/env bash
# One GPU check, under ten minutes: the gpu-marked tests, then slm-bench's GPU tables.
#   bash scripts/gpu_check.sh [OUT_DIR]      (OUT_DIR: where the tables go; default gpu_check/)
# Install first: pip install -e ".[dev,gpu]" (Liger and cut-cross-entropy join the benchmark when present).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu_check}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu.txt"
status=0
timeout 150 python -m pytest -m gpu -p no:cacheprovider -q 2>&1 | tail -15 | tee "$out/tests.txt" || status=1
# Each case's numbers are printed as it finishes, so a table cut short by its time limit keeps them.
for shape in qwen2.5-0.5b tinyllama-1.1b; do
    timeout 180 slm-bench --shape "$shape" --steps 20 --warmup 5 --json "$out/bench_$shape.json" \
        2>&1 | grep -v Warning | tee "$out/bench_$shape.md" || status=1
done
timeout 60 slm-bench --shape qwen2.5-0.5b --scoring --steps 20 --warmup 5 --json "$out/scoring.json" \
    2>&1 | grep -v Warning | tee "$out/scoring.md" || status=1
exit $status
