"""The Accelerate training loop. Imports slm.model, slm.parallel, slm.reference, slm.runs, slm.selection.

loop.py         Trainer: exact normalisation before backward, eval, counters, checkpoints, resume, signals
config.py       TrainConfig (trainer.*) and the learning-rate schedule
batches.py      BatchStream (the same rows at any process count, resumable); rows to the device
block_filter.py sequence-level selection inside a step (selector.blocks)
evaluation.py   eval loss (and answer accuracy) on a packed split
downstream.py   lm-evaluation-harness tasks at eval points
signals.py      stop requests honoured at the next step boundary
watches.py      what eval points watch: an early stop on held-out loss, the model outgrowing its reference
audit.py        what selection kept, by what the data says of its tokens (clean, kind of junk, source, position)
"""

from slm.train.audit import SelectionAudit, groupings
from slm.train.batches import BatchStream, fetch, to_device
from slm.train.block_filter import BlockFilter, candidates, check_blocks
from slm.train.config import SELECTOR_NAMES, SelectorConfig, TrainConfig, lr_lambda
from slm.train.downstream import DownstreamConfig, harness
from slm.train.evaluation import answer_accuracy, evaluate
from slm.train.loop import NonFiniteLoss, RunInterrupted, Trainer, master_weights
from slm.train.watches import WHEN_OUTGROWN, EarlyStop, OutgrownWatch

__all__ = [
    "candidates",
    "check_blocks",
    "BatchStream",
    "BlockFilter",
    "DownstreamConfig",
    "EarlyStop",
    "NonFiniteLoss",
    "OutgrownWatch",
    "RunInterrupted",
    "SelectionAudit",
    "SELECTOR_NAMES",
    "SelectorConfig",
    "TrainConfig",
    "Trainer",
    "WHEN_OUTGROWN",
    "answer_accuracy",
    "evaluate",
    "fetch",
    "groupings",
    "harness",
    "lr_lambda",
    "master_weights",
    "to_device",
]
