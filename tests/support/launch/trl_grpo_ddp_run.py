"""Run by test_trl_trainer.py under torchrun: 3 steps of SelectiveGRPOTrainer (or TRL's own GRPOTrainer) with
top_entropy_quantile 0.2, generation on CPU.

``run.py OUT [trl]``: train and save the weights and the logged numbers (process 0)."""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/: support and test_trl_trainer
import trl  # noqa: E402
from test_trl_trainer import _grpo  # noqa: E402

from slm.trl_trainer import SelectiveGRPOTrainer  # noqa: E402

out = Path(sys.argv[1])
cls = trl.GRPOTrainer if sys.argv[2:] == ["trl"] else SelectiveGRPOTrainer
logged, model = _grpo(out.parent, cls, out.name, per_device_train_batch_size=2)
if int(os.environ.get("RANK", "0")) == 0:
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out / "weights.pt")
    (out / "log.json").write_text(json.dumps(logged))
if torch.distributed.is_initialized():  # a clean exit: gloo can abort at interpreter shutdown otherwise
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)  # skip interpreter teardown (see trainer_ddp_run.py)
