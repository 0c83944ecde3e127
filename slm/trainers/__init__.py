"""slm's selection and selective head inside other trainers. Imports slm.model, slm.reference, slm.selection.

huggingface.py      SelectiveTrainer and SelectiveDataCollator: the transformers.Trainer drop-in
trl_integration.py  SelectiveSFTTrainer and SelectiveGRPOTrainer: TRL's trainers with slm's selection (the trl
                    extra; imported on first use of their names, so this package loads without TRL)
"""

from slm.trainers.huggingface import SelectiveDataCollator, SelectiveTrainer, StepScoreCheck

_TRL = ("SelectiveSFTTrainer", "SelectiveGRPOTrainer", "SFT_SELECTORS", "GRPO_SELECTORS", "add_selective_head")

__all__ = ["SelectiveDataCollator", "SelectiveTrainer", "StepScoreCheck", *_TRL]


def __getattr__(name: str):
    if name in _TRL:
        from slm.trainers import trl_integration

        return getattr(trl_integration, name)
    raise AttributeError(f"module 'slm.trainers' has no attribute {name!r}")
