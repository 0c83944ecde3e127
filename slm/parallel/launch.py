"""The launch: the mode the environment asks for, the precision, the Accelerator, building models under it."""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager

import torch
from torch import nn

log = logging.getLogger(__name__)
MODES = ("single", "ddp", "fsdp2", "deepspeed")


PRECISIONS = ("no", "bf16", "fp16")


def env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def requested_mode() -> str:
    """The launch mode the environment asks for (what ``accelerate launch`` or ``torchrun`` set)."""
    if env_flag("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    if env_flag("ACCELERATE_USE_FSDP"):
        if os.environ.get("FSDP_VERSION", "1") != "2":
            raise ValueError(
                "slm runs FSDP version 2 only (FSDP1 cannot keep the output layer whole for the selective head): "
                "set fsdp_version: 2 in the accelerate config (see accelerate_configs/fsdp.yaml)"
            )
        return "fsdp2"
    return "ddp" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "single"


def resolve_mixed_precision(setting: str) -> str:
    """``auto``: the launch config's choice, else bf16 on a GPU that has it, else none (CPU)."""
    if setting != "auto":
        if setting not in PRECISIONS:
            raise ValueError(f"trainer.mixed_precision must be auto, no, bf16 or fp16, got {setting!r}")
        return setting
    env = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if env in PRECISIONS:
        return env
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def make_accelerator(mixed_precision: str, grad_accum: int = 1):
    """An Accelerator for the requested mode, on GPU when there is one, else on CPU (gloo)."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    mode = requested_mode()
    kwargs: dict = {"cpu": not torch.cuda.is_available()}
    if not torch.cuda.is_available():
        # Say so before anything imports DeepSpeed (Accelerate does when saving), or it warns that it guessed.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if mode == "deepspeed" and not torch.cuda.is_available():
        # DeepSpeed runs on CPU too (its CPU accelerator, gloo): what the tests use.
        kwargs = {"cpu": False, "kwargs_handlers": [InitProcessGroupKwargs(backend="gloo")]}
    # Autocast and loss scaling are the Engine's, except under DeepSpeed, whose engine Accelerate configures.
    precision = mixed_precision if mode == "deepspeed" else "no"
    return Accelerator(
        mixed_precision=precision, gradient_accumulation_steps=grad_accum, step_scheduler_with_optimizer=False, **kwargs
    )


@contextmanager
def model_init(trained: bool = True):
    """Build a model as the launch config asks: under ZeRO-3, transformers builds every model inside
    DeepSpeed's ``zero.Init`` (partitioned at creation, initialised differently) unless told not to.
    Only a trained model with ``zero3_init_flag: true`` is built that way; a frozen reference never
    is (no engine would gather its weights)."""
    hf_ds = sys.modules.get("transformers.integrations.deepspeed")  # loaded by Accelerate's DeepSpeed plugin
    if hf_ds is None:
        yield
        return
    ref = getattr(hf_ds, "_hf_deepspeed_config_weak_ref", None)
    config = ref() if ref is not None else None
    if config is None or (trained and env_flag("ACCELERATE_DEEPSPEED_ZERO3_INIT")):
        yield
        return
    hf_ds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_ds.set_hf_deepspeed_config(config)


def param_dim(p: torch.Tensor) -> int:
    """A parameter's number of dimensions, also when ZeRO-3 has partitioned it to a flat shard."""
    return len(getattr(p, "ds_shape", p.shape))


def quiet_other_processes(acc) -> None:
    """transformers, accelerate and datasets say only what matters; on every process but the main one, slm and
    the rest say only warnings."""
    import transformers

    transformers.logging.set_verbosity_error()
    for name in ("accelerate", "datasets"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if not acc.is_main_process:  # one process speaks; the slm.* loggers inherit from "slm"
        import datasets

        datasets.disable_progress_bars()
        logging.getLogger().setLevel(logging.WARNING)
        logging.getLogger("slm").setLevel(logging.WARNING)


def export_slurm_distributed_env() -> None:
    """Under a multi-task submitit/SLURM job, set RANK, WORLD_SIZE, MASTER_ADDR, ... for Accelerate."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "RANK" not in os.environ:
        try:
            from submitit.helpers import TorchDistributedEnvironment

            TorchDistributedEnvironment().export()
        except (ImportError, RuntimeError) as e:  # not inside a submitit job: leave the environment alone
            log.warning("SLURM_NTASKS>1 but the distributed environment could not be set from submitit: %s", e)


def master_weights(lm: nn.Module, dtype: str | None) -> None:
    """Trainable weights in ``dtype`` (float32 by default) whatever dtype the model loaded in."""
    if dtype is None:
        low = [n for n, p in lm.named_parameters() if p.requires_grad and p.dtype != torch.float32]
        if low:
            log.warning(
                "trainer.master_dtype=null: %d trainable tensors train directly in their low-precision "
                "dtype (updates smaller than their rounding step are lost)",
                len(low),
            )
        return
    target = getattr(torch, dtype)
    for p in lm.parameters():
        if p.requires_grad and p.dtype != target:
            p.data = p.data.to(target)
