"""The Accelerate training loop: exact normalisation, eval, counters, checkpoints and resume.

Normalisation: each micro-batch's loss is a *sum* over its selected tokens; after the last
micro-batch of an optimizer step the gradients are divided by the number of tokens selected in
the whole step on all processes (times the world size, undoing DDP's average). So 2 processes x
batch b, 1 process x batch 2b and 2 accumulation steps x b give the same update whenever they
select the same tokens.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from slm.model import SelectiveLM, shifted_valid, token_losses
from slm.selection import NonFiniteScores
from slm.tracking import Tracker, read_metrics

log = logging.getLogger(__name__)


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
    mixed_precision: str = "no"  # no | bf16 | fp16
    eval_every: int = 100
    eval_batch_size: int = 32
    log_every: int = 10
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    resume: bool = False
    progress: bool = True

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "grad_accum", "eval_every", "log_every", "checkpoint_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"trainer.{name} must be >= 1, got {getattr(self, name)}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"trainer.mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}")


class BatchStream:
    """Deterministic, resumable batches: global micro-batch ``j`` is a fixed slice of an endless
    stream of seeded per-epoch permutations; process ``r`` takes the ``r``-th share of it.

    The global batch of W processes x b rows is the same rows as 1 process x W*b, so runs with
    different process counts see identical data.
    """

    def __init__(self, n: int, batch_size: int, world: int, rank: int, seed: int):
        if n == 0:
            raise ValueError("the training split is empty")
        self.n, self.b, self.world, self.rank, self.seed = n, batch_size, world, rank, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g)}
        return self._perms[epoch]

    def indices(self, j: int) -> list[int]:
        start = (j * self.world + self.rank) * self.b
        return [int(self._perm(p // self.n)[p % self.n]) for p in range(start, start + self.b)]


def fetch(ds, idx: list[int], device) -> dict:
    rows = ds[idx]
    return {k: torch.as_tensor(v).to(device) for k, v in rows.items()}


def answer_accuracy(answer_mask: torch.Tensor, hits: torch.Tensor, valid: torch.Tensor) -> tuple[int, int]:
    """(correct, total) answers: runs of answer tokens, correct when every token is the arg-max.

    Answers cut by a block boundary (a token without a prediction) are not counted.
    """
    ans = answer_mask.bool()
    start = ans & ~torch.nn.functional.pad(ans[:, :-1], (1, 0), value=False)
    run = torch.cumsum(start.flatten().long(), 0) * ans.flatten()  # 0 = not an answer token
    n_runs = int(start.sum())
    if n_runs == 0:
        return 0, 0
    ok_valid = torch.ones(n_runs + 1, dtype=torch.long, device=ans.device)
    ok_hit = torch.ones_like(ok_valid)
    ok_valid.scatter_reduce_(0, run, valid.flatten().long(), "amin")
    ok_hit.scatter_reduce_(0, run, hits.flatten().long(), "amin")
    counted = ok_valid[1:].bool()
    return int((counted & ok_hit[1:].bool()).sum()), int(counted.sum())


@torch.no_grad()
def evaluate(accelerator, lm: nn.Module, ds, batch_size: int) -> dict:
    """Loss over all valid tokens of ``ds`` and, if it has ``answer_mask``, answer accuracy."""
    lm.eval()
    rank, world = accelerator.process_index, accelerator.num_processes
    sums = torch.zeros(4, dtype=torch.float64, device=accelerator.device)  # loss, tokens, correct, answers
    mine = list(range(rank, len(ds), world))
    # Every process runs the same number of forwards (FSDP gathers weights inside each one): a
    # process out of rows runs row 0 with every label ignored, which adds nothing to the sums.
    n_batches = math.ceil(math.ceil(len(ds) / world) / batch_size)
    for i in range(n_batches):
        b = fetch(ds, mine[i * batch_size : (i + 1) * batch_size] or [0], accelerator.device)
        if i * batch_size >= len(mine):
            b["labels"] = torch.full_like(b["labels"], -100)
        with accelerator.autocast():
            out = lm(input_ids=b["input_ids"], labels=b["labels"], attention_mask=b["attention_mask"],
                     ratio=1.0, return_hits=True)  # fmt: skip
        sums[0] += out.token_loss.sum().double()
        sums[1] += out.n_valid
        if "answer_mask" in b:
            correct, total = answer_accuracy(b["answer_mask"], out.hits, shifted_valid(b["labels"]))
            sums[2] += correct
            sums[3] += total
    sums = accelerator.reduce(sums, "sum")
    lm.train()
    res = {"eval/loss": (sums[0] / sums[1].clamp(min=1)).item(), "eval/tokens": int(sums[1])}
    if sums[3] > 0:
        res["eval/answer_acc"] = (sums[2] / sums[3]).item()
    return res


def lr_lambda(cfg: TrainConfig):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class RefSource:
    """Where reference losses come from: none, a ``ref_loss`` column, or a live model."""

    kind: str = "none"  # none | stored | live
    model: nn.Module | None = None
    scores_dir: str | None = None  # where a stored column came from

    def losses(self, batch: dict):
        if self.kind == "stored":
            return batch["ref_loss"]
        if self.kind == "live":
            return token_losses(self.model, batch["input_ids"], batch["labels"], batch["attention_mask"])
        return None


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / "checkpoints" / "latest"
    return run_dir / "checkpoints" / pointer.read_text().strip() if pointer.exists() else None


class Trainer:
    """Owns one training run: model, optimizer, data stream, counters, checkpoints and logs."""

    def __init__(self, accelerator, lm: SelectiveLM, train_ds, val_ds, cfg: TrainConfig, run_dir,
                 ref: RefSource | None = None, tracker: Tracker | None = None, name: str = "train"):  # fmt: skip
        self.acc, self.cfg, self.run_dir, self.name = accelerator, cfg, Path(run_dir), name
        self.ref = ref or RefSource()
        self.val_ds = val_ds
        self.selective = lm
        self.tracker = tracker or Tracker(run_dir, enabled=False)
        decay = [p for n, p in lm.named_parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for n, p in lm.named_parameters() if p.requires_grad and p.dim() < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr,
            betas=tuple(cfg.betas),
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
        self.lm, self.opt, self.sched = accelerator.prepare(lm, opt, sched)
        columns = ["input_ids", "labels", "attention_mask"] + (["ref_loss"] if self.ref.kind == "stored" else [])
        self.train_ds = train_ds.select_columns(columns)
        self.stream = BatchStream(len(train_ds), cfg.batch_size, accelerator.num_processes,
                                  accelerator.process_index, cfg.seed)  # fmt: skip
        self.step, self.tokens_seen, self.tokens_selected = 0, 0, 0

    # -- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        ckpt_root = self.run_dir / "checkpoints"
        name = f"step_{self.step:07d}"
        self.acc.save_state(str(ckpt_root / name))
        if self.acc.is_main_process:
            state = {"step": self.step, "tokens_seen": self.tokens_seen, "tokens_selected": self.tokens_selected,
                     "selector_rng": self.selective.generator.get_state().tolist()}  # fmt: skip
            (ckpt_root / name / "slm_state.json").write_text(json.dumps(state))
            (ckpt_root / "latest").write_text(name)
            old = sorted(p for p in ckpt_root.glob("step_*") if p.name != name)
            for p in old[: max(0, len(old) - self.cfg.keep_checkpoints + 1)]:
                shutil.rmtree(p, ignore_errors=True)
        self.acc.wait_for_everyone()
        return ckpt_root / name

    def load_checkpoint(self, path: Path) -> None:
        self.acc.load_state(str(path))
        state = json.loads((path / "slm_state.json").read_text())
        self.step, self.tokens_seen, self.tokens_selected = (
            state["step"],
            state["tokens_seen"],
            state["tokens_selected"],
        )
        self.selective.generator.set_state(torch.tensor(state["selector_rng"], dtype=torch.uint8))
        log.info("resumed from %s at step %d", path, self.step)

    # -- one optimizer step ------------------------------------------------------------------
    def train_step(self) -> dict:
        cfg, acc = self.cfg, self.acc
        sums = torch.zeros(3, dtype=torch.float64, device=acc.device)  # loss sum, selected, tokens
        for m in range(cfg.grad_accum):
            batch = fetch(self.train_ds, self.stream.indices(self.step * cfg.grad_accum + m), acc.device)
            ref = self.ref.losses(batch)
            sync = nullcontext() if m == cfg.grad_accum - 1 else acc.no_sync(self.lm)
            with sync, acc.autocast():
                try:
                    # num_items_in_batch=1: a sum; the step's global count divides the grads below.
                    out = self.lm(
                        input_ids=batch["input_ids"],
                        labels=batch["labels"],
                        attention_mask=batch["attention_mask"],
                        ref_loss=ref,
                        num_items_in_batch=1,
                    )
                except NonFiniteScores as e:
                    raise self._non_finite(str(e)) from e
                acc.backward(out.loss)
            sums += torch.tensor([out.loss.item(), out.n_selected, int(batch["attention_mask"].sum())],
                                 dtype=torch.float64, device=acc.device)  # fmt: skip
        loss_sum, n_sel, n_tok = acc.reduce(sums, "sum").tolist()
        if not math.isfinite(loss_sum):
            raise self._non_finite("the training loss is NaN or inf")
        scale = acc.num_processes / max(n_sel, 1)
        for p in self.lm.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
        grad_norm = acc.clip_grad_norm_(self.lm.parameters(), cfg.grad_clip) if cfg.grad_clip else None
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += int(n_tok)
        self.tokens_selected += int(n_sel)
        return {"train/loss": loss_sum / max(n_sel, 1), "train/selected_frac": n_sel / max(n_tok, 1),
                "train/lr": self.sched.get_last_lr()[0],
                "train/grad_norm": float(grad_norm) if grad_norm is not None else None}  # fmt: skip

    def _non_finite(self, what: str) -> NonFiniteLoss:
        ckpt = latest_checkpoint(self.run_dir)
        return NonFiniteLoss(
            f"non-finite loss at step {self.step + 1} ({what}); stopped before updating the model. "
            f"Last good checkpoint: {ckpt or 'none yet'}"
        )

    def _last_logged_eval(self) -> dict:
        """On resume: the eval numbers already in metrics.jsonl (reported if nothing is left to do)."""
        evals = [e for e in read_metrics(self.run_dir) if "eval/loss" in e and e["step"] <= self.step]
        return {k: v for k, v in evals[-1].items() if k.startswith("eval/")} if evals else {}

    def _event(self, **metrics) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "tokens_selected": self.tokens_selected,
                **metrics}  # fmt: skip

    def eval(self) -> dict:
        res = evaluate(self.acc, self.lm, self.val_ds, self.cfg.eval_batch_size)
        self.tracker.log(self._event(**res))
        return res

    # -- the loop ----------------------------------------------------------------------------
    def fit(self) -> dict:
        from tqdm.auto import tqdm

        cfg = self.cfg
        ckpt = latest_checkpoint(self.run_dir) if cfg.resume else None
        if cfg.resume and ckpt is None:
            log.warning("trainer.resume=true but %s has no checkpoint; starting from scratch", self.run_dir)
        if ckpt is not None:
            self.load_checkpoint(ckpt)
        last_eval = self.eval() if self.step == 0 else self._last_logged_eval()
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc=self.name, dynamic_ncols=True,
                   mininterval=0.5 if sys.stderr.isatty() else 15,  # a log file gets a line every 15 s
                   disable=not (self.acc.is_main_process and cfg.progress))  # fmt: skip
        t0, seen0 = time.perf_counter(), self.tokens_seen
        try:
            while self.step < cfg.max_steps:
                metrics = self.train_step()
                bar.update(1)
                tok_s = (self.tokens_seen - seen0) / max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", sel=f"{metrics['train/selected_frac']:.2f}",
                                tok_s=f"{tok_s:,.0f}", refresh=False)  # fmt: skip
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    self.tracker.log(self._event(**metrics, **{"train/tokens_per_s": tok_s}))
                if self.step % cfg.eval_every == 0 or self.step == cfg.max_steps:
                    last_eval = self.eval()
                if self.step % cfg.checkpoint_every == 0 and self.step < cfg.max_steps:
                    self.save_checkpoint()
        except KeyboardInterrupt:
            bar.close()
            path = self.save_checkpoint()
            log.warning("interrupted at step %d; checkpoint saved to %s (continue with trainer.resume=true)",
                        self.step, path)  # fmt: skip
            return {"interrupted": True, "step": self.step, **last_eval}
        bar.close()
        self.save_checkpoint()
        return {"step": self.step, "tokens_seen": self.tokens_seen, "tokens_selected": self.tokens_selected,
                **last_eval}  # fmt: skip
