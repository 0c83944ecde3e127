"""Recipes: what a training run and a reference store are, in Python, without Hydra. Imports slm.data,
slm.model, slm.parallel, slm.reference, slm.runs, slm.selection and slm.train; ``slm.cli`` parses and
validates a composed config, calls a recipe and prints.

settings.py            RunSettings, ScoreSettings, ReferenceConfig: the frozen settings a recipe runs with
run.py                 build_run(settings, run_dir) -> Run; train(settings, run_dir): one training run, its records
                       and its final model
reference_training.py  the reference's own recipe: trained once on its text, cached, shared by every run
references.py          a run's reference values: none | live | stored | trained; stores, eval losses, quality
store_losses.py        store_losses(settings): a reference's per-token losses stored once (what slm-score runs)

    from slm.recipes import RunSettings, train
    result = train(RunSettings(...), "outputs/my-run")
"""

from slm.recipes.reference_training import HELDOUT, hold_out, train_reference
from slm.recipes.references import describe_quality, reference_quality, reference_source, trained_quality
from slm.recipes.run import Run, build_run, train
from slm.recipes.settings import (
    REFERENCE_KINDS,
    ConvergeConfig,
    ReferenceConfig,
    RunSettings,
    ScoreSettings,
    config_hash,
    resolve_block_size,
    typed,
)
from slm.recipes.store_losses import StoredLosses, store_losses

__all__ = [
    "HELDOUT",
    "REFERENCE_KINDS",
    "ConvergeConfig",
    "ReferenceConfig",
    "Run",
    "RunSettings",
    "ScoreSettings",
    "StoredLosses",
    "build_run",
    "config_hash",
    "describe_quality",
    "hold_out",
    "reference_quality",
    "reference_source",
    "resolve_block_size",
    "store_losses",
    "train",
    "train_reference",
    "trained_quality",
    "typed",
]
