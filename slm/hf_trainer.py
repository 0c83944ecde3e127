"""SelectiveTrainer: a drop-in ``transformers.Trainer`` whose loss_mask really skips head work.

Batches with a ``loss_mask`` column train exactly those tokens; otherwise tokens are selected by
``selection_ratio`` on the excess loss (with a ``ref_loss`` column) or the current loss. The
output layer's grad-enabled work runs only on the trained tokens (see :class:`slm.SelectiveLM`).

Normalisation follows the Trainer's ``num_items_in_batch`` contract: the count of *trained*
tokens over the accumulated micro-batches (and all processes with
``average_tokens_across_devices``), known before the forward because top-k keeps a fixed number.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer

from slm.model import SelectiveLM, shifted_valid
from slm.selection import check_ratio, num_to_keep

_COLUMNS = {"loss_mask": False, "ref_loss": 0.0}  # extra per-token columns and their padding value


class SelectiveDataCollator:
    """Wrap any HF collator so ``loss_mask`` / ``ref_loss`` columns are padded like ``labels``.

    The wrapped collator pads ``input_ids``/``labels`` as usual; the extra columns are padded on
    the same side to the same length (``False`` / ``0.0``).
    """

    def __init__(self, collator, padding_side: str = "right"):
        self.collator = collator
        self.padding_side = getattr(getattr(collator, "tokenizer", None), "padding_side", padding_side)

    def __call__(self, features: list[dict]) -> dict:
        extra = {k: [f[k] for f in features] for k in _COLUMNS if k in features[0]}
        batch = self.collator([{k: v for k, v in f.items() if k not in _COLUMNS} for f in features])
        length = batch["input_ids"].shape[1]
        for k, rows in extra.items():
            out = torch.full((len(rows), length), _COLUMNS[k], dtype=torch.bool if k == "loss_mask" else torch.float32)
            for i, r in enumerate(rows):
                r = torch.as_tensor(r, dtype=out.dtype)
                if self.padding_side == "left":
                    out[i, length - len(r) :] = r
                else:
                    out[i, : len(r)] = r
            batch[k] = out
        return batch


class SelectiveTrainer(Trainer):
    """``transformers.Trainer`` that computes the output layer and loss only on trained tokens.

    Args (beyond ``Trainer``'s):
        selection_ratio: share of valid tokens to train on when a batch has no ``loss_mask``
            (``None``: every batch must bring a ``loss_mask``).
        selector: ``excess_loss`` (needs a ``ref_loss`` column to differ from ``train_loss``),
            ``train_loss``, ``reference_loss`` or ``random``.
        scope: ``sequence`` or ``batch`` (per micro-batch).
    """

    def __init__(self, model=None, *args, selection_ratio: float | None = None, selector: str = "excess_loss",
                 scope: str = "batch", **kwargs):  # fmt: skip
        if scope not in ("sequence", "batch"):
            raise ValueError(f"SelectiveTrainer supports scope='sequence' or 'batch', got {scope!r}")
        self.selection_ratio = None if selection_ratio is None else check_ratio(selection_ratio, "selection_ratio")
        if model is not None and not isinstance(model, SelectiveLM):
            model = SelectiveLM(model, ratio=self.selection_ratio or 1.0, selector=selector, scope=scope)
        training_args = kwargs.get("args") or (args[0] if args else None)
        if training_args is not None and training_args.ddp_find_unused_parameters is None:
            # Trainer assumes unused parameters for a model that is not a PreTrainedModel; every
            # parameter of SelectiveLM gets a gradient each step (zeros when nothing is selected).
            training_args.ddp_find_unused_parameters = False
        super().__init__(model, *args, **kwargs)
        self._scope = scope
        self.model_accepts_loss_kwargs = True  # we normalise by num_items_in_batch ourselves
        self._selected = torch.zeros(2, dtype=torch.float64)  # trained tokens, valid tokens since last log

    # -- counting (before the forward, so the Trainer can normalise the accumulated step) --------
    def _trained_tokens(self, batch: dict) -> torch.Tensor:
        valid = shifted_valid(batch["labels"])
        if "loss_mask" in batch:
            return (batch["loss_mask"].bool() & valid).sum()
        if self.selection_ratio is None:
            raise ValueError(
                "SelectiveTrainer: this batch has no loss_mask column and selection_ratio is not set. Add a "
                "loss_mask column (train exactly those tokens) or pass selection_ratio=0.6 (top-k by excess "
                "loss with a ref_loss column, else by the current loss)."
            )
        per_unit = valid.sum(dim=1) if self._scope == "sequence" else valid.sum().reshape(1)
        return torch.tensor(sum(num_to_keep(self.selection_ratio, int(n)) for n in per_unit))

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device):
        if not batch_samples or "labels" not in batch_samples[0]:
            return None
        n = sum(self._trained_tokens(b) for b in batch_samples).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            n = self.accelerator.gather(n).sum()
        return n

    # -- loss ----------------------------------------------------------------------------------
    def compute_loss(self, model, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch=None):
        if "labels" not in inputs:
            raise ValueError("SelectiveTrainer needs a labels column (use a language-modeling collator)")
        training = model.training
        if training and "loss_mask" not in inputs:
            self._trained_tokens(inputs)  # raises the clear error when nothing says what to train
        out = model(
            input_ids=inputs["input_ids"],
            labels=inputs["labels"],
            attention_mask=inputs.get("attention_mask"),
            loss_mask=inputs.get("loss_mask"),
            ref_loss=inputs.get("ref_loss"),
            ratio=None if training else 1.0,
            num_items_in_batch=num_items_in_batch if training else None,
        )
        loss = out.loss
        if training:
            self._selected += torch.tensor([out.n_selected, out.n_valid], dtype=torch.float64)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # DDP averages gradients; the count is global
        return (loss, out) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Eval loss: over the loss_mask tokens if given, else over all valid tokens."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # -- logging and compute accounting ----------------------------------------------------------
    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs and self._selected[1] > 0:
            sel = self.accelerator.reduce(self._selected.to(self.args.device), "sum")
            logs["selected_frac"] = round((sel[0] / sel[1]).item(), 4)
            self._selected.zero_()
        super().log(logs, *args, **kwargs)

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """Training FLOPs of this micro-batch, counting the output-layer work actually done.

        ``Trainer`` assumes 6 x params x tokens whatever is masked. Here: 6 x (non-embedding,
        non-head params) x tokens for the decoder, plus, per trained token, 6 x H x V for the
        head's backward (logits recomputed, then two gradient matmuls), plus 2 x H x V per scored
        token (every valid token when selecting, the trained ones with a loss_mask).
        """
        inner = self.accelerator.unwrap_model(self.model).model
        head = inner.get_output_embeddings().weight
        hv = head.shape[0] * head.shape[1]
        body = inner.num_parameters(exclude_embeddings=True)
        if head is not inner.get_input_embeddings().weight:  # an untied head counts in num_parameters
            body -= hv
        tokens = int(inputs["input_ids"].numel())
        trained = int(self._trained_tokens(inputs))
        scored = trained if "loss_mask" in inputs else int(shifted_valid(inputs["labels"]).sum())
        return 6 * body * tokens + 6 * hv * trained + 2 * hv * scored

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """Save the inner HF model (``from_pretrained``-ready) and the processing class."""
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        self.accelerator.unwrap_model(self.model).model.save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, f"{output_dir}/training_args.bin")
