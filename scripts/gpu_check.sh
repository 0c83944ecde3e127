#!/usr/bin/env bash
# The GPU check, one command of at most 8 minutes, from the repository's root on a machine that has
# torch, transformers, triton and pytest (slm itself need not be installed, nor anything else):
#   bash scripts/gpu_check.sh OUT
# It prints what the run really uses (device, versions, head backend, float32-output matmuls), runs the
# CUDA tests, then slm-bench's tables at the Qwen2.5-0.5B shape (training steps, scoring, the sparse backward), every
# case written under OUT as it finishes; TinyLlama-1.1B's table follows when SLM_GPU_CHECK_TINYLLAMA=1.
# Liger and cut-cross-entropy join the tables when installed (the README's "GPU check" says how to
# carry their wheels to a machine without network). Without a CUDA device the tests skip what needs
# one and a tiny CPU table stands in for the GPU ones.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu_check}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0

python3 - <<'EOF' 2>&1 | tee "$out/setup.txt"
import torch

from slm.head import OutputHead, fused, resolve_backend
from slm.head.matmul import fast_path

cuda = torch.cuda.is_available()
print("device:", torch.cuda.get_device_name() if cuda else "cpu (no CUDA device)")
print("torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton

    print("triton", triton.__version__)
except ImportError:
    print("triton: not installed")
device = torch.device("cuda" if cuda else "cpu")
print("head backend (auto):", resolve_backend(OutputHead(torch.zeros(8, 8, device=device))),
      "| triton backend:", fused.unavailable(device) or "available")
if cuda:
    a = torch.zeros(4, 4, device=device, dtype=torch.bfloat16)
    for op in ("mm", "addmm"):
        print(f"{op}(out_dtype=float32) for bfloat16:", "yes" if fast_path(op, a) else "NO: float32 GEMMs")
for name in ("liger_kernel", "cut_cross_entropy"):
    try:
        __import__(name)
        print(name, "installed: joins the tables")
    except ImportError:
        print(name, "not installed: its cases are left out")
EOF
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

timeout 180 python3 -m pytest -p no:cacheprovider -q tests/head/test_gpu.py 2>&1 | tee "$out/tests.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

bench() {  # bench NAME SECONDS ARGS...: one table, its JSON rewritten after every case
    local name=$1 limit=$2
    shift 2
    timeout "$limit" python3 -m slm.bench "$@" --json "$out/$name.json" 2>&1 | grep -v Warning | tee "$out/$name.md"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
}
python3 -m slm.bench --model > "$out/expected.md" || status=1  # what the tables below should show
if python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    bench bench_qwen2.5-0.5b 200 --shape qwen2.5-0.5b --steps 10 --warmup 3
    bench scoring_qwen2.5-0.5b 60 --shape qwen2.5-0.5b --scoring --steps 10 --warmup 3
    # the sparse backward against the exact selective step and HF's, alternating steps (docs/sparse-backward.md)
    bench decoder_qwen2.5-0.5b 150 --decoder --shape qwen2.5-0.5b --steps 5 --warmup 2
    if [ "${SLM_GPU_CHECK_TINYLLAMA:-0}" = 1 ]; then
        bench bench_tinyllama-1.1b 200 --shape tinyllama-1.1b --steps 10 --warmup 3
    fi
    # TRL's SFT and GRPO trainers against slm's, at Qwen2.5-0.5B's head width (needs trl and datasets wheels)
    if python3 -c "import trl, datasets" 2>/dev/null; then
        timeout 240 python3 scripts/trl_bench.py --device cuda --vocab 151936 --hidden 896 --layers 4 --batch 4 \
            --seq 2048 2>&1 | grep -v Warning | tee "$out/trl_bench.md"
        [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    else
        echo "trl or datasets not installed: the TRL table is left out" | tee "$out/trl_bench.md"
    fi
else
    echo "no CUDA device: a tiny CPU table instead of the GPU ones" | tee "$out/no_gpu.txt"
    bench bench_tiny_cpu 300 --shape tiny --steps 2 --warmup 1
    bench decoder_tiny_cpu 300 --decoder --shape tiny --steps 1 --warmup 0 --only slm_exact_excess_0.3 slm_sparse_all_excess_0.3
fi
exit $status
