"""The training loop's settings: ``trainer.*`` (:class:`TrainConfig`, with its learning-rate schedule)
and ``selector.*`` (:class:`SelectorConfig`). Each validates its own fields and names the full key."""

from __future__ import annotations

import math
from dataclasses import dataclass

from slm.model import SCORES, SELECTORS
from slm.model.sparse_backward import check_sparse_backward
from slm.selection import AUTO, BLOCK_SCORES, COMBINATIONS, NEEDS, SCOPES, check_ratio, ratio_schedule
from slm.train.watchers import check_outgrown

# "all": every token (selection off); "oracle": exactly the tokens the corpus does not mark as junk (its clean
# text and the text's structure: see slm.train.step_selection)
SELECTOR_NAMES = (*SELECTORS, "all", "oracle")


def selects_by(name: str, ratio, blocks: float, reference_kind: str) -> str:
    """``all`` (every token at a constant ratio 1.0), ``blocks`` (whole blocks only, every token of a kept block),
    ``oracle``, ``train_loss`` where excess loss has no reference, else the selector's ``name``. Also for
    settings not yet validated (a run name is composed before): an invalid ratio leaves ``name``."""
    if name == "oracle":  # the corpus's own clean tokens, whatever the ratio
        return name
    if ratio == AUTO:  # chosen below 1 from the data (slm.recipes.ratio_choice)
        return "train_loss" if name == "excess_loss" and reference_kind == "none" else name
    try:
        schedule = ratio_schedule(ratio)
    except ValueError:
        return name
    if name == "all" or (schedule.is_constant and schedule.start >= 1.0):
        return "blocks" if float(blocks) < 1.0 else "all"
    if name == "excess_loss" and reference_kind == "none":
        return "train_loss"
    return name


@dataclass(frozen=True)
class SelectorConfig:
    """``selector.*``: which tokens a step trains."""

    name: str = "excess_loss"  # a score of slm.selection, a combination of two, or all
    ratio: object = 0.6  # the share kept, in (0, 1], a schedule (see slm.selection.ratio_schedule), or auto
    scope: str = "batch"  # sequence | batch | global | dataset
    blocks: float = 1.0  # the share of candidate blocks a step keeps (1.0: off)
    block_score: str = "excess_loss"  # what ranks the candidate blocks
    scores: tuple = ()  # the two scores a union / intersection combines
    when_outgrown: str = "all"  # once the model reaches its reference's eval loss: all (every token) | keep
    outgrown_margin: float = 0.0  # "reaches": within this share of the reference's loss

    def __post_init__(self):
        if self.name not in SELECTOR_NAMES:
            raise ValueError(f"selector.name must be one of {SELECTOR_NAMES}, got {self.name!r}")
        if self.ratio != AUTO:
            ratio_schedule(self.ratio)  # names selector.ratio when it is not a ratio, a schedule or auto
        object.__setattr__(self, "scores", tuple(self.scores or ()))
        if self.combines and (len(self.scores) != 2 or not set(self.scores) <= set(SCORES)):
            raise ValueError(f"selector={self.name} combines two scores: selector.scores=[a,b] with a, b in {SCORES}")
        if self.scope not in SCOPES:
            raise ValueError(f"selector.scope must be one of {SCOPES}, got {self.scope!r}")
        if self.scope == "dataset" and self.combines:
            raise ValueError(
                f"selector={self.name} combines two exact top-k sets: selector.scope must be sequence, batch or global"
            )
        check_outgrown(self.when_outgrown, self.outgrown_margin)
        object.__setattr__(self, "outgrown_margin", float(self.outgrown_margin))
        check_ratio(self.blocks, "selector.blocks")
        object.__setattr__(self, "blocks", float(self.blocks))
        if self.name == "oracle" and self.blocks < 1.0:
            raise ValueError("selector=oracle trains the clean tokens of every block it reads: use selector.blocks=1.0")
        if self.block_score not in BLOCK_SCORES:
            raise ValueError(f"selector.block_score must be one of {BLOCK_SCORES}, got {self.block_score!r}")

    @property
    def combines(self) -> bool:
        return self.name in COMBINATIONS

    def selects_by(self, reference_kind: str) -> str:
        """What a run with this selector and a reference of ``reference_kind`` really selects by (see
        :func:`selects_by`). Run names, run_info.json, curve legends and the model's scorer all ask this."""
        return selects_by(self.name, self.ratio, self.blocks, reference_kind)

    def token_ratio(self, reference_kind: str):
        """The token ratio (or schedule) the model selects with: 1.0 where the run trains every token of what
        it keeps (all, blocks, oracle)."""
        return 1.0 if self.selects_by(reference_kind) in ("all", "blocks", "oracle") else self.ratio

    @property
    def selects(self) -> bool:
        """Whether tokens are selected at all (not every token at a constant ratio 1.0)."""
        if self.ratio == AUTO:
            return self.name != "all"
        schedule = ratio_schedule(self.ratio)
        return self.name == "oracle" or (self.name != "all" and not (schedule.is_constant and schedule.start >= 1.0))

    def needs(self) -> dict:
        """Which reference values the scores need: ``{"loss": bool, "entropy": bool}``."""
        names = list(self.scores) if self.combines else [self.name]
        if self.blocks < 1.0:
            names.append(self.block_score)
        columns = {NEEDS.get(n) for n in names}
        return {"loss": "ref_loss" in columns, "entropy": "ref_entropy" in columns}


@dataclass(frozen=True)
class TrainConfig:
    """``trainer.*`` (and ``reference.trainer.*``): how a run trains; frozen once validated."""

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
    sparse_backward: bool | int = False  # True / N: the decoder's (top N layers') backward over trained rows only
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
        try:
            check_sparse_backward(self.sparse_backward)
        except ValueError as e:
            raise ValueError(f"trainer.{e}") from None
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
