"""Run by test_trl_trainer.py, alone or under torchrun: a few SGD steps of SelectiveSFTTrainer (or TRL's own
SFTTrainer) on completion-only data.

``run.py OUT BATCH RATIO [trl]``: train with ``BATCH`` rows per process and save the weights and the logged
losses (process 0)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/: support and test_trl_trainer
import trl  # noqa: E402
from support.archs import tiny_model  # noqa: E402
from support.launch_exit import save_and_exit  # noqa: E402
from test_trl_trainer import _data  # noqa: E402

from slm.data import builtin_tokenizer  # noqa: E402
from slm.trainers import SelectiveSFTTrainer  # noqa: E402


def main() -> None:
    out, per_device_batch, ratio = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    theirs = sys.argv[4:] == ["trl"]
    tok = builtin_tokenizer()
    model = tiny_model("llama", seed=3, vocab=len(tok))
    args = trl.SFTConfig(
        output_dir=str(out), max_steps=4, per_device_train_batch_size=per_device_batch, optim="sgd", learning_rate=0.5,
        max_grad_norm=0.0, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0, bf16=False,
    )  # fmt: skip
    selection = {} if theirs else dict(selection_ratio=ratio, selector="train_loss", scope="sequence")
    cls = trl.SFTTrainer if theirs else SelectiveSFTTrainer
    trainer = cls(model=model, args=args, train_dataset=_data("completion"), processing_class=tok, **selection)
    trainer.train()
    evaluated = trainer.evaluate(eval_dataset=_data("completion", 11))  # 11 rows: an uneven split over processes
    save_and_exit(out, model, [e for e in trainer.state.log_history if "loss" in e] + [evaluated])


if __name__ == "__main__":  # a launch, not an import (collected or imported by mistake, it would run)
    main()
