"""Recipes: what a training run and a reference store are, in Python, without Hydra. Imports slm.data,
slm.model, slm.parallel, slm.reference, slm.runs, slm.selection and slm.train; ``slm.cli`` parses and
validates a composed config, calls a recipe and prints.

settings.py            RunSettings, ScoreSettings, ReferenceConfig: the frozen settings a recipe runs with
run.py                 build_run(settings, run_dir) -> Run; train(settings, run_dir): one training run, its records
                       and its final model
cached_training.py     models trained once on their own text, cached, shared by every run: the reference, the base
base_model.py          base=train: continued pretraining from a base pretrained once on general text
ratio_choice.py        selector.ratio=auto: the ratio chosen from the data before training, recorded and resumed
references.py          a run's reference values: none | live | stored | trained; stores, eval losses, quality
store_losses.py        store_losses(settings): a reference's per-token losses stored once (what slm-score runs)

    from slm.recipes import RunSettings, train
    result = train(RunSettings(...), "outputs/my-run")
"""

from slm.recipes.base_model import continue_from_base
from slm.recipes.cached_training import HELDOUT, hold_out, train_reference, train_stage
from slm.recipes.references import describe_quality, reference_quality, reference_source, trained_quality
from slm.recipes.run import Run, build_run, train
from slm.recipes.settings import (
    BASE_KINDS,
    REFERENCE_KINDS,
    BaseConfig,
    ConvergeConfig,
    ReferenceConfig,
    RunSettings,
    ScoreSettings,
    config_hash,
    resolve_block_size,
    resolve_reference_budget,
    resolve_tokenizer_text,
    typed,
)
from slm.recipes.store_losses import StoredLosses, store_losses

__all__ = [
    "BASE_KINDS",
    "HELDOUT",
    "REFERENCE_KINDS",
    "BaseConfig",
    "ConvergeConfig",
    "ReferenceConfig",
    "Run",
    "RunSettings",
    "ScoreSettings",
    "StoredLosses",
    "build_run",
    "continue_from_base",
    "config_hash",
    "describe_quality",
    "hold_out",
    "reference_quality",
    "reference_source",
    "resolve_block_size",
    "resolve_reference_budget",
    "resolve_tokenizer_text",
    "store_losses",
    "train",
    "train_reference",
    "train_stage",
    "trained_quality",
    "typed",
]
