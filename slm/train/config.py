"""The training loop's settings (``trainer.*``) and its learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class TrainConfig:
    seed: int = 0
    max_steps: int = 500
    batch_size: int = 16  # per process, per micro-batch
    grad_accum: int = 1
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 1.0
    mixed_precision: str = "auto"  # auto | no | bf16 | fp16
    head_backend: str = "auto"  # auto | torch | compiled | triton (see slm.head)
    master_dtype: str | None = "float32"  # trainable weights' dtype; None keeps the loaded dtype
    eval_every: int = 100
    eval_batch_size: int = 32
    log_every: int = 10
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    resume: bool = False
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        for name in (
            "max_steps",
            "batch_size",
            "grad_accum",
            "eval_every",
            "log_every",
            "checkpoint_every",
            "keep_checkpoints",
            "eval_batch_size",
        ):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"trainer.{name} must be >= 1, got {getattr(self, name)}")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ValueError(f"trainer.mixed_precision must be auto, no, bf16 or fp16, got {self.mixed_precision!r}")
        if self.head_backend not in ("auto", "torch", "compiled", "triton"):
            raise ValueError(f"trainer.head_backend must be auto, torch, compiled or triton, got {self.head_backend!r}")
        if self.master_dtype not in (None, "float32", "bfloat16", "float16"):
            raise ValueError(
                f"trainer.master_dtype must be float32 (default), bfloat16, float16 or null, got {self.master_dtype!r}"
            )
        if not self.lr > 0:
            raise ValueError(f"trainer.lr must be > 0, got {self.lr}")


def lr_lambda(cfg: TrainConfig):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f
