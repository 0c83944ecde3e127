"""Deprecated path: the TRL trainers live in :mod:`slm.trainers.trl_integration` (also
``from slm.trainers import SelectiveSFTTrainer``). This module re-exports them for one release."""

import warnings

from slm.trainers.trl_integration import (
    GRPO_SELECTORS,
    SFT_SELECTORS,
    SelectiveGRPOTrainer,
    SelectiveSFTTrainer,
    add_selective_head,
)

__all__ = ["GRPO_SELECTORS", "SFT_SELECTORS", "SelectiveGRPOTrainer", "SelectiveSFTTrainer", "add_selective_head"]

warnings.warn(
    "slm.trl_trainer moved to slm.trainers (from slm.trainers import SelectiveSFTTrainer, SelectiveGRPOTrainer); "
    "the old path goes away in the next release",
    DeprecationWarning,
    stacklevel=2,
)
