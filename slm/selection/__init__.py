"""Token selection for selective language modeling: scores -> boolean mask.

Pure torch on purpose: lift this package into any training loop. It imports nothing from
transformers, accelerate, hydra, wandb or datasets.

Per-token tensors follow Hugging Face's label alignment: entry ``t`` scores the prediction of
``labels[:, t]``; entry 0 and ``-100`` labels are invalid and never selected.

* :mod:`~slm.selection.topk` - exactly the top ``round(ratio * n_valid)`` per row, batch or the
  batch of every process; the union or intersection of two scores' top-k sets;
* :mod:`~slm.selection.running` - a threshold over the run (``scope="dataset"``);
* :mod:`~slm.selection.blocks` - whole blocks ranked and kept (sequence-level selection);
* :mod:`~slm.selection.scores` - the score functions; :mod:`~slm.selection.schedule` - the ratio over a run;
* :mod:`~slm.selection.auto_ratio` - ``ratio=auto``: the share of training text whose excess losses look clean.
"""

from slm.selection.auto_ratio import RatioEstimate, estimate_ratio
from slm.selection.blocks import BLOCK_SCORES, block_scores, select_blocks
from slm.selection.running import RunningThreshold
from slm.selection.schedule import AUTO, SCHEDULES, RatioSchedule, ratio_schedule
from slm.selection.scores import (
    NEEDS,
    SCORERS,
    excess_loss,
    loss_scores,
    random_scores,
    reference_entropy,
    reference_loss,
    score_tokens,
    train_loss,
)
from slm.selection.topk import (
    COMBINATIONS,
    SCOPES,
    TOPK_SCOPES,
    NonFiniteScores,
    check_ratio,
    count_selected,
    keep_counts,
    num_selected,
    num_to_keep,
    select_combined,
    select_tokens,
    to_device_async,
)

__all__ = [
    "AUTO",
    "BLOCK_SCORES",
    "COMBINATIONS",
    "NEEDS",
    "SCHEDULES",
    "SCOPES",
    "SCORERS",
    "TOPK_SCOPES",
    "NonFiniteScores",
    "RatioEstimate",
    "RatioSchedule",
    "RunningThreshold",
    "block_scores",
    "check_ratio",
    "count_selected",
    "estimate_ratio",
    "excess_loss",
    "loss_scores",
    "keep_counts",
    "num_selected",
    "num_to_keep",
    "random_scores",
    "ratio_schedule",
    "reference_entropy",
    "reference_loss",
    "score_tokens",
    "select_blocks",
    "select_combined",
    "select_tokens",
    "to_device_async",
    "train_loss",
]
