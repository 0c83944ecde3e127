"""The training loop: exact normalisation, eval, counters, checkpoints, resume and interruptions.

Normalisation before backward: how many tokens an optimizer step trains is known from the
labels before any forward (``num_to_keep(ratio, n_valid)`` per scope unit, or the loss mask's
sum; block selection's kept blocks are counted on the device, where they stay). The loop counts
it for the whole step on all processes (one all-reduce, the step's first read), every
micro-batch's loss is its sum divided by that count, and each engine (DDP, FSDP2, DeepSpeed)
accumulates and steps its own way (see ``slm.parallel``). The step's loss is the mean over
every token it trained. Which runs select the same tokens depends on the scope: ``global``
makes W processes x batch b select as 1 process x W*b; ``sequence`` makes micro-batches,
processes and batch sizes all equivalent; ``batch`` selects within each micro-batch.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from slm.model import SelectiveLM, flop_model
from slm.model.rows import to_host
from slm.parallel import Engine, master_weights, param_dim, resolve_mixed_precision
from slm.runs import MIN_EVAL_POINTS, Tracker, checkpoints, read_metrics
from slm.selection import NonFiniteScores, ratio_schedule
from slm.train.batches import BatchStream, fetch, to_device
from slm.train.checkpointing import resume_run, save_run_checkpoint
from slm.train.config import TrainConfig, lr_lambda
from slm.train.evaluation import evaluate
from slm.train.signals import StopSignals
from slm.train.step_count import count_step
from slm.train.step_selection import StepSelection
from slm.train.watchers import Watcher

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    pass


class RunInterrupted(Exception):
    """A signal (Ctrl-C, SIGTERM, SIGUSR1) stopped the run at a step boundary after a checkpoint."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None, hint: str | None = None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.hint = hint  # what to tell the user, when "resume this run directory" is not the way on
        super().__init__(hint or f"interrupted by signal {signum} at step {step}; checkpoint: {checkpoint}")


class Trainer:
    """Owns one training run: model, optimizer, data stream, counters, checkpoints and logs."""

    def __init__(
        self,
        accelerator,
        lm: SelectiveLM,
        train_ds,
        eval_sets,
        cfg: TrainConfig,
        tracker: Tracker | str | Path,
        name: str = "train",
        selection: StepSelection | None = None,
        watchers: Sequence[Watcher] = (),
        mode: str | None = None,
    ):
        """``eval_sets``: name -> packed split (or one split, named ``validation``); the first is
        also logged as ``eval/loss``. ``tracker``: the run's records (a :class:`Tracker`, or the run's folder
        when nothing is to be logged). ``selection``: what each step trains and by what (default: the model's
        own ratio, no reference). ``watchers``: what the run watches at steps and eval points (an early stop,
        the reference being outgrown, the selection audit, downstream tasks: see :mod:`slm.train.watchers`).
        ``mode``: the launch mode (default: the launcher's)."""
        self.tracker = tracker if isinstance(tracker, Tracker) else Tracker(tracker, enabled=False)
        self.acc, self.cfg, self.run_dir, self.name = accelerator, cfg, self.tracker.run_dir, name
        sel = self.selection = selection or StepSelection()
        self.ref, self.blocks = sel.ref, sel.blocks
        self.watchers = list(watchers)
        if not isinstance(eval_sets, dict):
            eval_sets = {"validation": eval_sets}
        self.eval_sets = {k: v.with_format("torch") for k, v in eval_sets.items()}
        self.schedule = ratio_schedule(lm.ratio if sel.ratio is None else sel.ratio)
        if not lm.fixed_count and cfg.grad_accum != 1:
            raise ValueError(
                f"selector={lm.selector} keeps a data-dependent number of tokens, so a step can be normalised "
                "exactly only when it is one micro-batch: use trainer.grad_accum=1 (and a larger trainer.batch_size)"
            )
        master_weights(lm, cfg.master_dtype)
        # Counted before sharding (FSDP2 and ZeRO-3 hide whole shapes); live references add their forward.
        self.flop_model = flop_model(lm.model, len(train_ds[0]["input_ids"]), self.ref.model, lm.sparse_weights)

        def make_optimizer(model):
            decay = [p for p in model.parameters() if p.requires_grad and param_dim(p) >= 2]
            no_decay = [p for p in model.parameters() if p.requires_grad and param_dim(p) < 2]
            groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
            return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))

        self.engine = Engine(
            accelerator,
            lm,
            make_optimizer,
            lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)),
            cfg.grad_accum,
            cfg.batch_size,
            resolve_mixed_precision(cfg.mixed_precision),
            mode=mode,
            grad_clip=cfg.grad_clip,
        )
        self.selective = lm
        if self.ref.evolve_every and self.engine.mode in ("fsdp2", "deepspeed"):
            raise ValueError(
                "reference.evolve_every copies the training model into the reference, which needs the "
                "whole model on every process: run it on one process or with DDP"
            )
        for w in self.watchers:
            w.start(self)
        columns = ["input_ids", "labels", "attention_mask", *sel.columns(train_ds.column_names)]
        columns += [c for w in self.watchers for c in w.columns if c not in columns]
        self.train_ds = train_ds.select_columns(columns).with_format("torch")
        per_micro_batch = self.blocks.candidates if self.blocks is not None else cfg.batch_size
        self.stream = BatchStream(
            len(train_ds), per_micro_batch, accelerator.num_processes, accelerator.process_index, cfg.seed
        )
        self.step, self.tokens_seen, self.tokens_selected = 0, 0, 0
        self.selection_off_step: int | None = None  # the eval step from which every token trains (a watcher's call)
        self.train_time, self.flops = 0.0, 0.0  # seconds inside training steps; estimated FLOPs (slm.flops)
        self.signals = StopSignals()

    # -- checkpoints -------------------------------------------------------------------------
    def _warn_few_eval_points(self) -> None:
        points = 1 + -(-self.cfg.max_steps // self.cfg.eval_every)  # step 0, every eval_every, the last step
        if points < MIN_EVAL_POINTS and self.name not in ("reference", "base"):  # a cached stage: not a curve
            every = max(1, self.cfg.max_steps // (MIN_EVAL_POINTS - 1))
            log.warning(
                "trainer.max_steps=%d with trainer.eval_every=%d gives %d eval points: too few for a data-efficiency "
                "curve (slm-curves marks fractions resting on fewer than %d); set trainer.eval_every=%d",
                self.cfg.max_steps,
                self.cfg.eval_every,
                points,
                MIN_EVAL_POINTS,
                every,
            )

    # -- one optimizer step ------------------------------------------------------------------
    def train_step(self) -> dict:
        return self.train_on(*self.read_step())

    def read_step(self) -> tuple[list[dict], int]:
        """The step's micro-batches as read on the host (every candidate block, stored reference columns
        included) and how many tokens they hold; the audit counts what they hold here."""
        cfg = self.cfg
        rows = [self.stream.indices(self.step * cfg.grad_accum + m) for m in range(cfg.grad_accum)]
        if self.blocks is not None and self.selection_off:  # the first blocks train unscored: the rest go unread
            rows = [idx[: self.blocks.batch_size] for idx in rows]
        selecting = not self.selection_off  # once off, the reference's stored values are not needed either
        batches = [{**fetch(self.train_ds, idx), **(self.ref.stored(idx) if selecting else {})} for idx in rows]
        candidates = sum(int(b["attention_mask"].sum()) for b in batches)  # every token this step reads
        for b in batches:  # every token read, the dropped blocks' included
            for w in self.watchers:
                w.read(b)
        return batches, candidates

    def train_on(self, batches: list[dict], candidates: int) -> dict:
        """One optimizer step on the host batches of :meth:`read_step`: what it waits for on a GPU is the
        step's count (one reduce), each forward's own read, and its end-of-step reduce."""
        cfg, engine = self.cfg, self.engine
        selecting = not self.selection_off
        if self.blocks is not None and selecting:  # sequence-level selection: the best blocks of each micro-batch
            batches = [self.blocks.keep(b, engine, self.ref) for b in batches]
        ratio = self.schedule.at(self.step, cfg.max_steps) if selecting else 1.0
        n_step, n_trained_on, n_valid, n_tok = count_step(self, batches, ratio, candidates)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.acc.device)
        nonfinite = torch.zeros((), dtype=torch.float64, device=self.acc.device)  # NaN/inf selection scores
        for m, batch in enumerate(batches):
            batch = to_device(batch, self.acc.device)
            ref = self.ref.values(batch) if selecting else {}  # selection off for good: the reference rests
            with engine.micro_step(last=m == cfg.grad_accum - 1):
                with engine.autocast():
                    try:
                        out = engine.model(
                            input_ids=batch["input_ids"],
                            labels=batch["labels"],
                            attention_mask=batch["attention_mask"],
                            ratio=ratio,
                            num_items_in_batch=1 if n_step is None else n_step,
                            loss_mask=self.selection.mask(batch),
                            **ref,
                        )
                    except NonFiniteScores as e:
                        raise self._non_finite(str(e)) from e
                loss = out.loss
                if n_step is None:  # a count known after the forward (one micro-batch per step): every
                    # process's summed on the device, so the host learns it with the step's one sync below
                    counted = out.mask[:, 1:].sum().double()
                    loss = loss / self.acc.reduce(counted.reshape(1), "sum")[0].clamp(min=1)
                engine.backward(loss)
            loss_sum += loss.detach().double()
            for w in self.watchers:
                w.trained(batch, out.mask)
            if out.n_nonfinite is not None:
                nonfinite += out.n_nonfinite
        stop = torch.tensor(float(self.signals.requested), dtype=torch.float64, device=loss_sum.device)
        counted = counted if n_step is None else torch.zeros_like(stop)
        norm = engine.clip(cfg.grad_clip or None)  # the same on every process: summed below, so shared out first
        norm = torch.zeros_like(stop) if norm is None else norm.double() / self.acc.num_processes
        # The step's closing read: its loss, any non-finite selection score, stop requests, a count known only
        # after the forward, and the gradient norm, on every process (nothing is updated before it).
        loss, bad_scores, stop, counted, grad_norm = to_host(
            self.acc.reduce(torch.stack([loss_sum, nonfinite, stop, counted, norm.to(loss_sum.device)]), "sum")
        )
        n_step = round(counted) if n_step is None else n_step
        self._stop = stop > 0
        if bad_scores:
            raise self._non_finite(
                f"{int(bad_scores)} valid token(s) had NaN or inf selection scores; check the "
                "reference losses and the model"
            )
        if not math.isfinite(loss):
            raise self._non_finite("the training loss is NaN or inf")
        stepped = engine.step()
        grad_norm = stepped if engine.mode == "deepspeed" else grad_norm
        self.step += 1
        self.tokens_seen += n_tok
        self.tokens_selected += n_step
        scoring = selecting and self.blocks is not None
        scoring_forward = n_tok if scoring and self.blocks.forwards else 0
        # a live reference reads the candidates when the block score asks it, then the kept blocks again
        asked = n_tok if scoring and self.blocks.score != "train_loss" else 0
        reference_tokens = n_trained_on + asked if selecting else 0
        self.flops += self.flop_model.step(
            n_trained_on, n_valid if ratio < 1.0 else 0, n_step, scoring_forward, reference_tokens=reference_tokens
        )
        if self.ref.maybe_evolve(self.step, self.selective.model):
            log.info("reference: refreshed from the training model at step %d", self.step)
        return {
            "train/loss": loss,
            "train/selected_frac": n_step / max(n_tok, 1),
            "train/lr": engine.lr(),
            "train/grad_norm": grad_norm,
            "train/ratio": ratio,
        }

    def _non_finite(self, what: str) -> NonFiniteLoss:
        ckpt = checkpoints.latest(self.run_dir, warn=False)
        return NonFiniteLoss(
            f"non-finite loss at step {self.step + 1} ({what}); stopped before updating the model. "
            f"Last good checkpoint: {ckpt or 'none yet'}"
        )

    def _logged_eval(self, step: int) -> dict:
        """The eval numbers metrics.jsonl holds for the last eval at or before ``step`` (on resume: reported
        if nothing is left to do; after an early stop: the best eval's)."""
        evals = [e for e in read_metrics(self.run_dir) if "eval/loss" in e and e["step"] <= step]
        return {k: v for k, v in evals[-1].items() if k.startswith("eval/")} if evals else {}

    @property
    def selection_off(self) -> bool:
        """Whether selection is off for good (every token trains from now on): a watcher turned it off, in this
        launch or before a resume (the checkpoint holds the step, whether or not that watcher is here now)."""
        return self.selection_off_step is not None or any(w.selection_off for w in self.watchers)

    @property
    def _stopped_early(self) -> bool:
        return any(w.stop for w in self.watchers)

    def _event(self, **metrics) -> dict:
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "tokens_selected": self.tokens_selected,
            "train_time_s": round(self.train_time, 3),
            "flops": self.flops,
            **metrics,
        }

    def eval(self, sets: bool = True) -> dict:
        """Every eval set (``sets``): ``eval/<name>/loss`` (``/tokens``, ``/answer_acc``), the first
        set's numbers also as ``eval/loss`` (``/tokens``, ``/answer_acc``); then what the watchers add (all
        of them at an eval point; without ``sets``, those due at this step), logged as one event."""
        res = {}
        for i, (name, ds) in enumerate(self.eval_sets.items() if sets else ()):
            one = evaluate(self.engine, ds, self.cfg.eval_batch_size)
            res.update({k.replace("eval/", f"eval/{name}/", 1): v for k, v in one.items()})
            if i == 0:
                res.update(one)
        for w in self.watchers:
            if sets or w.due(self.step):
                res.update(w.at_eval(self, dict(res)))
        if self.selection_off and self.selection_off_step is None:
            self.selection_off_step = self.step
        if res:
            self.tracker.log(self._event(**res))
        return res

    # -- the loop ----------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train to ``max_steps``; returns the final counters and eval numbers. A stop signal
        ends the current step, writes a checkpoint and raises :class:`RunInterrupted`."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        self._warn_few_eval_points()
        if cfg.resume and resume_run(self) is None:
            log.warning("trainer.resume=true but %s has no complete checkpoint; starting from scratch", self.run_dir)
        if self.step == 0:
            last_eval = self.eval()
        else:
            last_eval = self._logged_eval(self.step)
        notes = [w.bar_note for w in self.watchers if w.bar_note]
        bar = tqdm(
            total=cfg.max_steps,
            initial=self.step,
            desc=self.name + "".join(f" ({n})" for n in notes),
            dynamic_ncols=True,
            mininterval=0.5 if sys.stderr.isatty() else 15,  # a log file gets a line every 15 s
            disable=not (self.acc.is_main_process and cfg.progress),
        )
        t0, seen0 = time.perf_counter(), self.tokens_seen
        self._stop = False
        with self.signals, bar:
            while self.step < cfg.max_steps and not self._stopped_early:
                started = time.perf_counter()
                metrics = self.train_step()
                self.train_time += time.perf_counter() - started
                bar.update(1)
                tok_s = (self.tokens_seen - seen0) / max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix(
                    loss=f"{metrics['train/loss']:.3f}",
                    sel=f"{metrics['train/selected_frac']:.2f}",
                    tok_s=f"{tok_s:,.0f}",
                    refresh=False,
                )
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    self.tracker.log(self._event(**metrics, **{"train/tokens_per_s": tok_s}))
                if self.step % cfg.eval_every == 0 or self.step == cfg.max_steps:
                    last_eval = self.eval()
                elif any(w.due(self.step) for w in self.watchers):  # a watch on its own schedule
                    self.eval(sets=False)
                if self._stop:
                    path = save_run_checkpoint(self)
                    raise RunInterrupted(self.signals.signum or 0, self.step, path)
                if self.step % cfg.checkpoint_every == 0 and self.step < cfg.max_steps:
                    save_run_checkpoint(self)
        save_run_checkpoint(self)
        result = {"step": self.step, "tokens_seen": self.tokens_seen, "tokens_selected": self.tokens_selected}
        if self.selection_off_step is not None:
            result["selection_off_step"] = self.selection_off_step
        for w in self.watchers:
            result.update(w.result())
        if result.get("best_step"):  # the weights kept are the best eval's: report its numbers (at step 0, where
            last_eval = self._logged_eval(result["best_step"]) or last_eval  # nothing beat it, the final ones)
        return {**result, **last_eval}
