"""The Accelerate training loop. Imports slm.model, slm.parallel, slm.reference, slm.runs, slm.selection.

loop.py         Trainer: exact normalisation before backward, eval, counters, the loop, signals
step_count.py   how many tokens a step trains, counted before any forward in one all-reduce
checkpointing.py  a run's checkpoints (counters, selector state, watchers, engine) and the resume
config.py       TrainConfig (trainer.*) and the learning-rate schedule
batches.py      BatchStream (the same rows at any process count, resumable); rows to the device
block_filter.py sequence-level selection inside a step (selector.blocks)
evaluation.py   eval loss (and answer accuracy) on a packed split
step_selection.py  what each step trains and by what: ratio over the run, reference values, blocks, mask column
signals.py      stop requests honoured at the next step boundary
watchers.py     the Watcher protocol (per-step and per-eval hooks with checkpoint state); early stop on held-out
                loss, the model outgrowing its reference, an eval loss that keeps rising
selection_audit.py  a watcher: what selection kept, by what the data says of its tokens (clean, junk kind,
                source, position)
downstream.py   lm-evaluation-harness tasks at eval points (a watcher)
"""

from slm.parallel import master_weights  # its home since the loop split; importable here as before
from slm.train.batches import BatchStream, fetch, to_device
from slm.train.block_filter import BlockFilter, candidates, check_blocks
from slm.train.config import SELECTOR_NAMES, SelectorConfig, TrainConfig, lr_lambda, selects_by
from slm.train.downstream import DownstreamConfig, DownstreamTasks, harness
from slm.train.evaluation import answer_accuracy, evaluate
from slm.train.loop import NonFiniteLoss, RunInterrupted, Trainer
from slm.train.selection_audit import SelectionAudit, groupings
from slm.train.step_selection import StepSelection
from slm.train.watchers import WHEN_OUTGROWN, EarlyStop, OutgrownWatch, RisingEval, Watcher

__all__ = [
    "candidates",
    "check_blocks",
    "BatchStream",
    "BlockFilter",
    "DownstreamConfig",
    "DownstreamTasks",
    "EarlyStop",
    "NonFiniteLoss",
    "OutgrownWatch",
    "RisingEval",
    "RunInterrupted",
    "SelectionAudit",
    "SELECTOR_NAMES",
    "SelectorConfig",
    "StepSelection",
    "TrainConfig",
    "Trainer",
    "WHEN_OUTGROWN",
    "Watcher",
    "answer_accuracy",
    "evaluate",
    "fetch",
    "groupings",
    "harness",
    "lr_lambda",
    "master_weights",
    "selects_by",
    "to_device",
]
