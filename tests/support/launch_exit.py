"""The end of a script that tests launch under torchrun: save what the test compares, then exit cleanly."""

import json
import os
import sys
from pathlib import Path

import torch


def save_and_exit(out: Path, model: torch.nn.Module, log: list | None = None) -> None:
    """On process 0, ``out/weights.pt`` (and ``out/log.json`` when ``log`` is given); then leave without the
    interpreter's teardown, where a background thread of the distributed stack can abort ("terminate called
    without an active exception") after all the work is done and saved."""
    if int(os.environ.get("RANK", "0")) == 0:
        out.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, out / "weights.pt")
        if log is not None:
            (out / "log.json").write_text(json.dumps(log))
    if torch.distributed.is_initialized():  # a clean exit: gloo can abort at interpreter shutdown otherwise
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
