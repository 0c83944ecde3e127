"""Deprecated path: the transformers.Trainer drop-in lives in :mod:`slm.trainers.huggingface` (also
``from slm.trainers import SelectiveTrainer``). This module re-exports it for one release."""

import warnings

from slm.trainers.huggingface import SelectiveDataCollator, SelectiveTrainer, StepScoreCheck

__all__ = ["SelectiveDataCollator", "SelectiveTrainer", "StepScoreCheck"]

warnings.warn(
    "slm.hf_trainer moved to slm.trainers (from slm.trainers import SelectiveTrainer, SelectiveDataCollator); "
    "the old path goes away in the next release",
    DeprecationWarning,
    stacklevel=2,
)
