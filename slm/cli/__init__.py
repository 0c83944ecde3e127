"""The Hydra application: the only package that reads a DictConfig or imports hydra/omegaconf.

slm_train.py    slm-train: train(cfg, run_dir) builds settings -> data -> model -> reference -> trainer; records
slm_score.py    slm-score: store a reference's losses once; --verify a store
settings.py     validate(cfg): every setting checked before anything slow; run names; resolvers
references.py   a run's reference: none | live | stored | train | demo (trained once, cached)
preflight.py    fail fast on sources and stores that cannot be reached
common.py       CONF_DIR (slm/conf), logging, one-line errors and exit codes
"""

from slm.cli.common import CONF_DIR, one_line_errors
from slm.cli.slm_score import main_score, score, score_app, verify_stores
from slm.cli.slm_train import main_train, train, train_app

__all__ = [
    "CONF_DIR",
    "main_score",
    "main_train",
    "one_line_errors",
    "score",
    "score_app",
    "train",
    "train_app",
    "verify_stores",
]
