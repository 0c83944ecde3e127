"""What a run leaves on disk: its folder, its records and its checkpoints. Read by the training loop
and by ``slm-curves`` alike; imports nothing else from slm.

  directory.py    a run folder: claim it (never overwrite a finished run by accident), the config a resume
                  may change, run_info.json / result.json
  tracking.py     metrics.jsonl always, W&B unless logger=none (offline without an account); read_metrics
  checkpoints.py  checkpoint folders that are complete or absent; the latest intact one
"""

from slm.runs.checkpoints import CheckpointError
from slm.runs.directory import (
    CONFIG,
    RESULT,
    RUN_FILES,
    RUN_INFO,
    ResumeMismatch,
    RunDirExists,
    claim,
    flatten,
    read_json,
    resume_config,
    write_json,
)
from slm.runs.tracking import METRICS_FILE, MIN_EVAL_POINTS, Tracker, read_metrics

__all__ = [
    "CONFIG",
    "CheckpointError",
    "METRICS_FILE",
    "MIN_EVAL_POINTS",
    "RESULT",
    "RUN_FILES",
    "RUN_INFO",
    "ResumeMismatch",
    "RunDirExists",
    "Tracker",
    "claim",
    "flatten",
    "read_json",
    "read_metrics",
    "resume_config",
    "write_json",
]
