"""SelectiveTrainer: a drop-in ``transformers.Trainer`` whose loss_mask really skips head work.

Batches with a ``loss_mask`` column train exactly those tokens (``loss_weight``: with per-token
weights); otherwise tokens are selected by ``selection_ratio`` on the excess loss (with a
``ref_loss`` column) or the current loss. The output layer's grad-enabled work runs only on the
trained tokens (see :class:`slm.SelectiveLM`).

Normalisation follows the Trainer's ``num_items_in_batch`` contract: the count of *trained*
tokens (or the weights' sum) over the accumulated micro-batches (and all processes with
``average_tokens_across_devices``), known before the forward because top-k keeps a fixed number.
A window with nothing to train contributes a zero gradient.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from transformers import Trainer

from slm.model import SelectiveLM, check_loss_mask, check_loss_weight, flop_model, save_inner_pretrained, shifted_valid
from slm.selection import NonFiniteScores, check_ratio, num_selected

log = logging.getLogger(__name__)

# per-token columns and their padding
_COLUMNS = {"loss_mask": False, "ref_loss": 0.0, "ref_entropy": 0.0, "loss_weight": 0.0}
_NOT_FOR_THE_DECODER = ("labels", "return_hits", *_COLUMNS)


class SelectiveDataCollator:
    """Pad ``loss_mask`` / ``ref_loss`` / ``ref_entropy`` / ``loss_weight`` columns like ``labels``.

    Two ways to build batches:

    * ``SelectiveDataCollator(collator)`` wraps any HF collator (which makes ``labels``); the extra
      columns are padded on the same side to the same length.
    * ``SelectiveDataCollator(tokenizer=tok)`` pads with the tokenizer and sets ``labels`` to the
      input ids with -100 on padding *positions* only, so a tokenizer whose pad token is its end
      token (Phi-2, Llama) keeps the end tokens it trains on (``DataCollatorForLanguageModeling``
      sets -100 on every token equal to the pad id).

    A padding-free collator (``DataCollatorWithFlattening``: one row of concatenated sequences)
    gets the extra columns concatenated the same way. The padding side is the tokenizer's at the
    time of each call. A ``loss_mask`` (or ``loss_weight``) token whose label is -100 cannot be
    trained: warned once.
    """

    def __init__(self, collator=None, padding_side: str = "right", tokenizer=None):
        if (collator is None) == (tokenizer is None):
            raise ValueError("SelectiveDataCollator takes a collator or a tokenizer (exactly one of them)")
        self.collator, self.tokenizer = collator, tokenizer
        self._padding_side = padding_side  # used when there is no tokenizer to ask
        self._warned = False

    @property
    def padding_side(self) -> str:
        """The tokenizer's padding side now (it may be changed after the collator is built)."""
        tok = self.tokenizer or getattr(self.collator, "tokenizer", None)
        return getattr(tok, "padding_side", None) or self._padding_side

    def _base(self, features: list[dict]) -> dict:
        if self.collator is not None:
            return self.collator(features)
        batch = self.tokenizer.pad(features, return_tensors="pt")
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return batch

    def __call__(self, features: list[dict]) -> dict:
        extra = {k: [f[k] for f in features] for k in _COLUMNS if k in features[0]}
        batch = self._base([{k: v for k, v in f.items() if k not in _COLUMNS} for f in features])
        length = batch["input_ids"].shape[1]
        if batch["input_ids"].shape[0] == 1 and len(features) > 1:  # sequences concatenated into one row
            lengths = [len(f["input_ids"]) for f in features]
            if sum(lengths) != length:
                raise ValueError(
                    f"SelectiveDataCollator: {type(self.collator).__name__} made one row of {length} "
                    f"tokens from sequences of {sum(lengths)}; only plain concatenation is supported"
                )
            for k, rows in extra.items():
                if [len(r) for r in rows] != lengths:
                    raise ValueError(f"SelectiveDataCollator: the {k} column must have one value per input id")
                dtype = torch.bool if k == "loss_mask" else torch.float32
                batch[k] = torch.cat([torch.as_tensor(r, dtype=dtype) for r in rows])[None]
            self._check_trainable(batch)
            return batch
        for k, rows in extra.items():
            out = torch.full((len(rows), length), _COLUMNS[k], dtype=torch.bool if k == "loss_mask" else torch.float32)
            for i, r in enumerate(rows):
                r = torch.as_tensor(r, dtype=out.dtype)
                if self.padding_side == "left":
                    out[i, length - len(r) :] = r
                else:
                    out[i, : len(r)] = r
            batch[k] = out
        self._check_trainable(batch)
        return batch

    def _check_trainable(self, batch: dict) -> None:
        marked = batch.get("loss_mask")
        if marked is None and "loss_weight" in batch:
            marked = batch["loss_weight"] > 0
        if marked is None or self._warned:
            return
        lost = marked[:, 1:] & (batch["labels"][:, 1:] == -100)
        if lost.any():
            self._warned = True
            warnings.warn(
                f"SelectiveDataCollator: {int(lost.sum())} loss_mask token(s) have label -100 and will not be "
                "trained. If your tokenizer's pad token is its end token, DataCollatorForLanguageModeling "
                "masks every end token: use SelectiveDataCollator(tokenizer=tok) instead, which masks padding "
                "positions only.",
                stacklevel=2,
            )


class StepScoreCheck:
    """NaN/inf selection scores counted over a step's micro-batches; on its last one (before its backward,
    so nothing is updated) the count is reduced over every process and all of them raise: a process that
    raised alone would leave the others waiting in a collective."""

    def __init__(self):
        self.count = None  # a device scalar

    def add(self, trainer, n_nonfinite, where: str) -> None:
        if n_nonfinite is not None:
            self.count = n_nonfinite.double() if self.count is None else self.count + n_nonfinite
        if not trainer.accelerator.sync_gradients:
            return
        local = self.count if self.count is not None else torch.zeros((), dtype=torch.float64)
        self.count = None
        bad = int(trainer.accelerator.reduce(local.reshape(1).to(trainer.args.device), "sum").item())
        if bad:
            raise NonFiniteScores(
                f"{type(trainer).__name__}: {bad} valid token(s) had NaN or inf selection scores at step "
                f"{trainer.state.global_step + 1}; check {where} and the model (stopped before the update)"
            )


class SelectiveTrainer(Trainer):
    """``transformers.Trainer`` that computes the output layer and loss only on trained tokens.

    Args (beyond ``Trainer``'s):
        selection_ratio: share of valid tokens to train on when a batch has no ``loss_mask``
            (``None``: every batch must bring a ``loss_mask`` or ``loss_weight``).
        selector: ``excess_loss`` (default; needs a ``ref_loss`` column to differ from
            ``train_loss``), ``train_loss``, ``reference_loss``, ``reference_entropy`` (a
            ``ref_entropy`` column, from ``slm-score entropy=true``) or ``random``. ``union`` and
            ``intersection`` are refused: how many tokens they train is known only after the
            forward, and Trainer normalises by a count taken before it (``slm-train`` has them).
        scope: ``sequence`` or ``batch`` (default; per micro-batch).
        sparse_backward: ``True`` or N: the decoder's (top N layers') linear layers take their
            gradients from the trained tokens' rows only (see :mod:`slm.model.sparse_backward`).

    A model already wrapped in :class:`slm.SelectiveLM` is the single source of its ratio, selector
    and scope; passing different ones here is an error.
    """

    def __init__(
        self,
        model=None,
        *args,
        selection_ratio: float | None = None,
        selector: str | None = None,
        scope: str | None = None,
        sparse_backward: bool | int | None = None,
        **kwargs,
    ):
        given = dict(selection_ratio=selection_ratio, selector=selector, scope=scope, sparse_backward=sparse_backward)
        if isinstance(model, SelectiveLM):
            actual = {
                "selection_ratio": model.ratio,
                "selector": model.selector,
                "scope": model.scope,
                "sparse_backward": model.sparse_backward,
            }
            clash = {k: (v, actual[k]) for k, v in given.items() if v is not None and v != actual[k]}
            if clash:
                names = ", ".join(f"{k}={a!r} but the model has {b!r}" for k, (a, b) in clash.items())
                raise ValueError(f"SelectiveTrainer: {names}; set them in one place (the SelectiveLM or here)")
            self._require_mask = False
            model.check_scores = "deferred"  # checked here, at the end of each step on every process
        else:
            self._require_mask = selection_ratio is None
            ratio = 1.0 if selection_ratio is None else check_ratio(selection_ratio, "selection_ratio")
            if model is not None:
                model = SelectiveLM(
                    model,
                    ratio=ratio,
                    selector=selector or "excess_loss",
                    scope=scope or "batch",
                    check_scores="deferred",
                    sparse_backward=sparse_backward or False,
                )
        if model is not None and model.scope == "global":
            raise ValueError("SelectiveTrainer supports scope='sequence' or 'batch' (not 'global')")
        if model is not None and not model.fixed_count:
            raise ValueError(
                f"SelectiveTrainer: selector={model.selector!r} with scope={model.scope!r} trains a number of tokens "
                "known only after the forward, and Trainer normalises each step by a count taken before it "
                "(num_items_in_batch). Use slm-train for union/intersection and scope='dataset', or one score with "
                "an exact top-k scope here."
            )
        training_args = kwargs.get("args") or (args[0] if args else None)
        if training_args is not None and training_args.ddp_find_unused_parameters is None:
            # Trainer assumes unused parameters for a model that is not a PreTrainedModel; every
            # trainable parameter of SelectiveLM gets a gradient each step (zeros when nothing is selected).
            training_args.ddp_find_unused_parameters = False
        super().__init__(model, *args, **kwargs)
        if self.args.label_smoothing_factor:
            raise ValueError(
                f"SelectiveTrainer: label_smoothing_factor={self.args.label_smoothing_factor} is not implemented by "
                "the selective head (it trains plain cross-entropy on the selected tokens, and Trainer's label "
                "smoother would need every token's logits); set label_smoothing_factor=0"
            )
        if self.compute_loss_func is not None:
            raise ValueError(
                "SelectiveTrainer: compute_loss_func would never be called: the loss is computed inside the model, "
                "over the trained tokens only, from hidden states (no logits exist to pass it). Drop "
                "compute_loss_func, or weight tokens with a loss_weight column"
            )
        self.model_accepts_loss_kwargs = True  # we normalise by num_items_in_batch ourselves
        self._selected = torch.zeros(2, dtype=torch.float64)  # trained tokens, valid tokens since last log
        self._score_check = StepScoreCheck()
        self._flops = None  # the model's FlopModel, made on first use

    def _lm(self) -> SelectiveLM:
        return self.accelerator.unwrap_model(self.model)

    # -- counting (before the forward, so the Trainer can normalise the accumulated step) --------
    def _trained_tokens(self, batch: dict) -> torch.Tensor:
        """Tokens (or weight) this micro-batch trains, from host-side columns only."""
        valid = shifted_valid(batch["labels"])
        if "loss_weight" in batch:
            return (check_loss_weight(batch["loss_weight"]) * valid.to(batch["loss_weight"].device)).sum()
        if "loss_mask" in batch:
            return (check_loss_mask(batch["loss_mask"]) & valid.to(batch["loss_mask"].device)).sum()
        if self._require_mask:
            raise ValueError(
                "SelectiveTrainer: this batch has no loss_mask column and selection_ratio is not set. Add a "
                "loss_mask column (train exactly those tokens) or pass selection_ratio=0.6 (top-k by excess "
                "loss with a ref_loss column, else by the current loss)."
            )
        lm = self._lm()
        return torch.tensor(num_selected(valid, lm.ratio, lm.scope))

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device):
        if not batch_samples or "labels" not in batch_samples[0]:
            return None
        n = sum(self._trained_tokens(b).double().cpu() for b in batch_samples).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            n = self.accelerator.gather(n.reshape(1)).sum()
        return n

    # -- loss ----------------------------------------------------------------------------------
    def compute_loss(self, model, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch=None):
        if "labels" not in inputs:
            raise ValueError("SelectiveTrainer needs a labels column (use a language-modeling collator)")
        training = model.training
        if training and "loss_mask" not in inputs and "loss_weight" not in inputs:
            self._trained_tokens(inputs)  # raises the clear error when nothing says what to train
        decoder_inputs = {k: v for k, v in inputs.items() if k not in _NOT_FOR_THE_DECODER}  # position_ids, ...
        out = model(
            labels=inputs["labels"],
            return_hits=bool(inputs.get("return_hits", False)),
            loss_mask=inputs.get("loss_mask"),
            loss_weight=inputs.get("loss_weight"),
            ref_loss=inputs.get("ref_loss"),
            ref_entropy=inputs.get("ref_entropy"),
            ratio=None if training else 1.0,
            num_items_in_batch=num_items_in_batch if training else None,
            **decoder_inputs,
        )
        loss = out.loss
        if training:
            self._selected += torch.tensor([out.n_selected, out.n_valid], dtype=torch.float64)
            self._check_scores(out.n_nonfinite)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # DDP averages gradients; the count is global
        return (loss, out) if return_outputs else loss

    def _check_scores(self, n_nonfinite) -> None:
        if self._lm().ratio < 1.0:  # else nothing is selected by score (a loss_mask trains what it marks)
            self._score_check.add(self, n_nonfinite, "the ref_loss column")

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Eval loss: over the loss_mask tokens if given, else over all valid tokens. With
        ``compute_metrics`` the predictions are ``(token_loss, hits)``: ``[B, T]`` float32 per-token
        losses (entry ``t`` predicts ``labels[:, t]``; 0 where not evaluated) and ``[B, T]`` int
        arg-max hits (1 where the model's top prediction is the label); no logits exist."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            if prediction_loss_only:
                return self.compute_loss(model, inputs).detach(), None, None
            loss, out = self.compute_loss(model, {**inputs, "return_hits": True}, return_outputs=True)
        return loss.detach(), (out.token_loss, out.hits.long()), inputs["labels"]

    # -- logging and compute accounting ----------------------------------------------------------
    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:  # every process joins the reduce, whether or not it saw valid tokens
            sel = self.accelerator.reduce(self._selected.to(self.args.device), "sum")
            if sel[1] > 0:
                logs["selected_frac"] = round((sel[0] / sel[1]).item(), 4)
            self._selected.zero_()
        super().log(logs, *args, **kwargs)

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """Training FLOPs of this micro-batch, counting the output-layer work actually done
        (:mod:`slm.flops`): ``Trainer`` assumes 6 x params x tokens whatever is masked; here the head
        costs 6 x H x V per trained token, plus 2 x H x V per valid token when selecting by score
        (the no-grad loss pass; a loss_mask needs none)."""
        if self._flops is None:
            self._flops = flop_model(self._lm().model, inputs["input_ids"].shape[1], sparse=self._lm().sparse_weights)
        valid = shifted_valid(inputs["labels"])
        marked = inputs.get("loss_mask", inputs.get("loss_weight"))
        if marked is not None:  # the trained tokens are known: no loss pass
            trained, scored = int(((marked > 0) & valid.to(marked.device)).sum()), 0
        else:
            trained = int(self._trained_tokens(inputs))
            scored = int(valid.sum()) if self._lm().ratio < 1.0 else 0
        return int(self._flops.step(int(inputs["input_ids"].numel()), scored, trained))

    # -- saving and loading: the inner HF model, as from_pretrained expects it -------------------
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """Save the inner HF model (``from_pretrained``-ready) and the processing class.

        ``state_dict`` is what the Trainer gathered for sharded runs (ZeRO-3 16-bit weights, FSDP
        full state dict); its keys are the wrapper's, ``model.`` + the inner model's."""
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        lm = self._lm()
        save_inner_pretrained(
            lm, state_dict if state_dict is not None else lm.state_dict(), output_dir, self.processing_class
        )
        torch.save(self.args, f"{output_dir}/training_args.bin")

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model=self._lm().model if model is None else model)

    def _issue_warnings_after_load(self, load_result: Any) -> None:
        inner = self._lm().model
        seen, aliases = set(), set()
        for name, p in inner.named_parameters(remove_duplicate=False):
            (aliases.add(name) if id(p) in seen else seen.add(id(p)))
        missing = set(load_result.missing_keys) - aliases
        if missing:
            log.warning("There were missing keys in the checkpoint model loaded: %s", sorted(missing))
        if load_result.unexpected_keys:
            log.warning("There were unexpected keys in the checkpoint model loaded: %s", load_result.unexpected_keys)
        if hasattr(inner, "tie_weights"):
            inner.tie_weights()

    def _load_best_model(self) -> None:
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._load_best_model()
        self._load_from_checkpoint(self.state.best_model_checkpoint)
