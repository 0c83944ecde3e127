"""The Hydra application: the only package that reads a DictConfig or imports hydra/omegaconf. It parses,
validates, calls a recipe (:mod:`slm.recipes`) and prints.

slm_train.py    slm-train: train_composed(cfg, run_dir): the config a resume continues, settings, the run
                recipe, a summary
slm_score.py    slm-score: store a reference's losses once (the store_losses recipe); --verify a store
validation.py   validate(cfg): every setting checked before anything slow, as frozen settings; run-name resolvers
preflight.py    fail fast on sources and stores that cannot be reached
common.py       CONF_DIR (conf/, installed as slm.conf), one-line errors and exit codes
"""

from slm.cli.common import CONF_DIR, one_line_errors
from slm.cli.slm_score import main_score, score, score_app, verify_stores
from slm.cli.slm_train import main_train, train_app, train_composed

__all__ = [
    "CONF_DIR",
    "main_score",
    "main_train",
    "one_line_errors",
    "score",
    "score_app",
    "train_composed",
    "train_app",
    "verify_stores",
]
