"""Run by test_hf_trainer.py, alone or under torchrun: a few SGD steps of SelectiveTrainer.

``run.py OUT BATCH``: train and save the weights; ``run.py OUT BATCH nan``: select by excess loss with
NaN reference losses on process 1 only, and report the error each process raises."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/: support and test_hf_trainer
from support.archs import tiny_model  # noqa: E402
from support.launch_exit import save_and_exit  # noqa: E402
from test_hf_trainer import args, collator, dataset  # noqa: E402

from slm import SelectiveTrainer  # noqa: E402
from slm.selection import NonFiniteScores  # noqa: E402


def main() -> None:
    out, per_device_batch = Path(sys.argv[1]), int(sys.argv[2])
    nan = sys.argv[3:] == ["nan"]
    ds, tok = dataset(n=32, with_mask=not nan)
    kw = {}
    if nan:  # process 1's copy of the data has NaN reference losses: it must not stop alone
        bad = float("nan") if os.environ.get("RANK") == "1" else 0.0
        ds = ds.map(lambda row: {"ref_loss": [bad] * len(row["input_ids"])})
        kw = dict(selection_ratio=0.5)
    model = tiny_model("llama", vocab=len(tok))
    sgd = dict(optim="sgd", learning_rate=0.5, max_grad_norm=0.0)
    trainer = SelectiveTrainer(model, args(out, per_device_train_batch_size=per_device_batch, max_steps=4, **sgd),
                               train_dataset=ds, data_collator=collator(tok), **kw)  # fmt: skip
    try:
        trainer.train()
    except NonFiniteScores as e:
        print(f"rank {trainer.args.process_index} raised: {e}", flush=True)
        os._exit(3)
    save_and_exit(out, model)


if __name__ == "__main__":  # a launch, not an import (collected or imported by mistake, it would run)
    main()
