"""What a training checkpoint holds and how each launch mode writes and reads it.

Single process, DDP and FSDP2 write model and optimizer state with ``torch.distributed.checkpoint``
(DCP) into ``dcp/``: every process writes only the tensors (or, under FSDP2, the shards) it
holds, nothing is gathered, and the state is keyed by parameter name, so a checkpoint written by
any of these modes at any process count loads into any other (DCP reshards on load). DeepSpeed
writes its own sharded engine checkpoint (through Accelerate), which resumes at the process count
that wrote it. Beside them: the LR schedule and loss scale (main process) and each process's RNG.

``slm_state.json`` (written by :mod:`slm.runs.checkpoints`) records the format and the process count,
so a checkpoint that cannot load under this launch is refused naming why.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DCP_DIR = "dcp"
FORMATS = {"dcp": "torch.distributed.checkpoint (single process, DDP or FSDP2)", "deepspeed": "DeepSpeed's engine"}


def checkpoint_format(mode: str) -> str:
    return "deepspeed" if mode == "deepspeed" else "dcp"


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


@contextmanager
def _quiet():
    """DCP warns that it assumes one process when there is no process group: that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        warnings.filterwarnings("ignore", message=".*overwrit.*")
        yield


def _dcp_kwargs() -> dict:
    # Without a process group DCP reads and writes as one process (it warns that it assumes so).
    return {} if _distributed() else {"no_dist": True}


def save_model_and_optimizer(lm: torch.nn.Module, opt, path: Path) -> None:
    """Every process writes what it holds of ``lm`` and ``opt`` (keyed by parameter name) into ``path/dcp``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(lm, opt)
    with _quiet():
        dcp.save(
            {"model": model_sd, "optim": optim_sd},
            storage_writer=dcp.FileSystemWriter(str(path / DCP_DIR)),
            **_dcp_kwargs(),
        )


def load_model_and_optimizer(lm: torch.nn.Module, opt, path: Path) -> None:
    """Load ``path/dcp`` into ``lm`` and ``opt`` as they are sharded now (any process count)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(lm, opt)  # initialises the optimizer's state to load into
    state = {"model": model_sd, "optim": optim_sd}
    with _quiet():
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(path / DCP_DIR)), **_dcp_kwargs())
    set_state_dict(lm, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


class CheckpointRefused(ValueError):
    """A checkpoint this launch cannot load (another format or process count): said before anything is read."""


def check_loadable(saved: dict, mode: str, processes: int, folder: Path) -> None:
    """Refuse, naming why, a checkpoint this launch cannot load (before anything is read)."""
    fmt = saved.get("format")
    if fmt is None:
        raise CheckpointRefused(
            f"{folder} was written by an earlier version of slm (full state dicts, before sharded checkpoints); "
            "this version cannot resume it. Start a new run (or train with that version to the end)"
        )
    want = checkpoint_format(mode)
    if fmt != want:
        raise CheckpointRefused(
            f"{folder} holds a {FORMATS.get(fmt, fmt)} checkpoint, but this launch runs {FORMATS[want]}; resume "
            "with the launch config that wrote it"
        )
    if fmt == "deepspeed" and saved.get("processes") != processes:
        raise CheckpointRefused(
            f"{folder} is a DeepSpeed checkpoint of {saved.get('processes')} processes and this launch has "
            f"{processes}: DeepSpeed resumes its ZeRO checkpoints at the process count that wrote them. Relaunch with "
            f"{saved.get('processes')} processes (or convert it with DeepSpeed's ds_to_universal.py)"
        )


def save_small_state(path: Path, rank: int, sched, scaler) -> None:
    """The LR schedule and loss scale (main process), and this process's RNG state."""
    if rank == 0:
        torch.save(sched.state_dict(), path / "scheduler.pt")
        if scaler is not None:
            torch.save(scaler.state_dict(), path / "scaler.pt")
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, path / f"rng_{rank}.pt")


def load_small_state(path: Path, rank: int, sched, scaler) -> None:
    sched.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    if scaler is not None and (path / "scaler.pt").exists():
        scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
    rng_file = path / f"rng_{rank}.pt"
    if rng_file.exists():  # absent when resuming with more processes than saved: fresh RNG there
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
