"""Run by test_trl_trainer.py under torchrun: 3 steps of SelectiveGRPOTrainer (or TRL's own GRPOTrainer) with
top_entropy_quantile 0.2, generation on CPU.

``run.py OUT [trl]``: train and save the weights and the logged numbers (process 0)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/: support and test_trl_trainer
import trl  # noqa: E402
from support.launch_exit import save_and_exit  # noqa: E402
from test_trl_trainer import _grpo  # noqa: E402

from slm.trainers import SelectiveGRPOTrainer  # noqa: E402


def main() -> None:
    out = Path(sys.argv[1])
    cls = trl.GRPOTrainer if sys.argv[2:] == ["trl"] else SelectiveGRPOTrainer
    logged, model = _grpo(out.parent, cls, out.name, per_device_train_batch_size=2)
    save_and_exit(out, model, logged)


if __name__ == "__main__":  # a launch, not an import (collected or imported by mistake, it would run)
    main()
