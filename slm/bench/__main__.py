"""``python -m slm.bench``: slm-bench where no console script is installed (scripts/gpu_check.sh)."""

import os

from slm.bench.runner import main

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
main()
