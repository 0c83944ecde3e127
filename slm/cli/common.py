"""What both commands share: where the configs live, logging, and the one-line error and exit-code policy."""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from importlib.resources import files
from pathlib import Path

from slm import runs
from slm.data import LockLost
from slm.runs import checkpoints
from slm.train import NonFiniteLoss, RunInterrupted

log = logging.getLogger(__name__)


def _conf_dir() -> str:
    """The configs: the package ``slm.conf`` (a wheel's slm/conf, or an editable install's conf/ at the top
    of the checkout, which pyproject.toml maps to it); in a checkout that is not installed, its conf/."""
    try:
        return str(files("slm.conf"))
    except ModuleNotFoundError:
        return str(Path(__file__).resolve().parents[2] / "conf")


CONF_DIR = _conf_dir()


def run_dir_from_hydra() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def task_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task)


@contextmanager
def one_line_errors():
    """An interruption or a bad setting ends with one line on stderr and a non-zero exit.

    128 + the signal number tells a launcher (SLURM, submitit) that the job was stopped so it can
    requeue it, and stops a sweep at the interrupted job instead of launching the next one.
    ``SLM_DEBUG=1`` shows the traceback instead.
    """
    try:
        yield
    except RunInterrupted as e:
        where = e.checkpoint.parent.parent if e.checkpoint else "<run dir>"
        fail(
            e.hint
            or f"interrupted at step {e.step}; checkpoint {e.checkpoint}. Continue with trainer.resume=true "
            f"hydra.run.dir={where}",
            128 + (e.signum or 2),
            e,
        )
    except KeyboardInterrupt as e:
        fail("interrupted (Ctrl-C); caches and stores are written only when complete, so rerun to continue", 130, e)
    except (
        checkpoints.CheckpointException,
        runs.RunDirExists,
        runs.ResumeMismatch,
        NonFiniteLoss,
        LockLost,
        checkpoints.CheckpointError,
        ValueError,
        FileNotFoundError,
        ImportError,
    ) as e:
        fail(checkpoints.describe_error(e) if isinstance(e, checkpoints.CheckpointException) else str(e), 1, e)


def fail(message: str, code: int, error: BaseException):
    if os.environ.get("SLM_DEBUG"):
        raise error
    print(f"\nslm: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def check_output_dirs(argv: list[str]) -> None:
    """``hydra.run.dir=`` / ``hydra.sweep.dir=`` naming an existing file: said in one line (Hydra would
    fail creating the folder, with its own traceback)."""
    for arg in argv:
        key, _, value = arg.partition("=")
        if key.lstrip("+") in ("hydra.run.dir", "hydra.sweep.dir") and value and os.path.isfile(value):
            raise ValueError(f"{key}={value!r} is a file; name a folder for the run's outputs")
