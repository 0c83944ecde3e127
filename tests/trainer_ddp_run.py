"""Run by test_hf_trainer.py, alone or under torchrun: a few SGD steps of SelectiveTrainer."""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import tiny_model  # noqa: E402
from test_hf_trainer import args, collator, dataset  # noqa: E402

from slm import SelectiveTrainer  # noqa: E402

out, per_device_batch = Path(sys.argv[1]), int(sys.argv[2])
ds, tok = dataset(n=32)
model = tiny_model("llama", vocab=len(tok))
sgd = dict(optim="sgd", learning_rate=0.5, max_grad_norm=0.0)
trainer = SelectiveTrainer(model, args(out, per_device_train_batch_size=per_device_batch, **sgd), train_dataset=ds,
                           data_collator=collator(tok))  # fmt: skip
trainer.train()
if trainer.args.process_index == 0:
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out / "weights.pt")
if torch.distributed.is_initialized():  # a clean exit: gloo can abort at interpreter shutdown otherwise
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
sys.stdout.flush()
sys.stderr.flush()
# Skip interpreter teardown: a background thread of the distributed stack can abort there
# ("terminate called without an active exception") after all the work is done and saved.
os._exit(0)
