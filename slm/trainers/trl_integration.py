"""SelectiveSFTTrainer: TRL's ``SFTTrainer`` whose output layer trains only the tokens it keeps.

TRL builds the batches as it always does (completion-only and assistant-only masks become labels of
-100, packing and padding-free rows with ``position_ids``), counts the trained tokens of each
optimizer step over its micro-batches and processes (``num_items_in_batch``) and normalises by that
count. This trainer keeps all of it and changes one thing: the model's loss is slm's selective head
(:class:`slm.SelectiveLM`). At ``selection_ratio=1.0`` it trains exactly TRL's tokens, with TRL's
loss and gradients. Below 1.0 it scores every token TRL would train without gradients, keeps the top
share by an slm score (the excess loss over a reference model given by ``reference=``, as Token
Cleaning does; the model's own loss; random), and runs the gradient-carrying head only on those;
``num_items_in_batch`` then counts the kept tokens. TRL's ``entropy`` and ``mean_token_accuracy``
are computed over every token TRL would train, from the loss pass (``token_metrics=False``
skips that pass at ratio 1.0, where nothing else needs it).

SelectiveGRPOTrainer: TRL's ``GRPOTrainer`` whose ``top_entropy_quantile`` share of completion tokens
(chosen by TRL's entropy rule, or by an slm score) is the only part of the batch the gradient-carrying
head runs on.

Needs ``pip install -e ".[trl]"``.
"""

from __future__ import annotations

import functools
import types
from typing import Any

import torch
from trl import GRPOTrainer, SFTTrainer

from slm.model import SelectiveLM, shifted_valid, token_losses
from slm.reference import freeze, load_reference
from slm.selection import (
    RunningThreshold,
    check_ratio,
    excess_loss,
    loss_scores,
    num_selected,
    random_scores,
    select_tokens,
)
from slm.trainers.huggingface import StepScoreCheck

SFT_SELECTORS = loss_scores()  # the loss it computes per token, and a reference's
_NOT_FOR_THE_DECODER = ("labels", "use_cache", "ref_loss")


def add_selective_head(model: torch.nn.Module, selective: SelectiveLM) -> None:
    """Route ``model(..., slm_head=True, ...)`` through ``selective`` (its SelectiveOutput), and
    ``model(..., slm_keep=rule, ...)`` through :meth:`SelectiveLM.kept_logprobs`; otherwise the forward is
    the one it had (generation, TRL's own calls). A call through a DDP or FSDP
    wrapper of ``model`` reaches this forward, so their gradient hooks see the selective loss."""
    original = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, slm_head: bool = False, slm_keep=None, **kwargs):
        if slm_keep is not None:  # per-token log-probs with gradients through the kept tokens only
            return selective.kept_logprobs(keep=slm_keep, **kwargs)
        if not slm_head:
            return original(*args, **kwargs)
        return selective(**kwargs)

    model.forward = types.MethodType(forward, model)


class SelectiveSFTTrainer(SFTTrainer):
    """``trl.SFTTrainer`` with slm's token selection and selective head.

    Args (beyond ``SFTTrainer``'s):
        selection_ratio: the share of the tokens TRL would train that this trainer trains (1.0: all).
        selector: ``excess_loss`` (needs ``reference``), ``train_loss``, ``reference_loss`` (the tokens
            the reference finds easiest; needs ``reference``) or ``random``.
        scope: ``batch`` (top-k over each micro-batch) or ``sequence`` (top-k within each row).
        reference: a causal LM (a model, or a path / hub name) sharing the tokenizer, scored live
            without gradients on every training batch.
        token_metrics: log TRL's ``entropy`` and ``mean_token_accuracy`` (from the loss pass).
        sparse_backward: ``True`` or N: the decoder's (top N layers') linear layers, LoRA adapters
            included, take their gradients from the trained tokens' rows only (the prompt's rows and
            the unselected ones give none; see :mod:`slm.model.sparse_backward`).
    """

    def __init__(
        self,
        model=None,
        args=None,
        *pos,
        selection_ratio: float = 1.0,
        selector: str = "excess_loss",
        scope: str = "batch",
        reference=None,
        token_metrics: bool = True,
        sparse_backward: bool | int = False,
        **kwargs,
    ):
        ratio = check_ratio(selection_ratio, "selection_ratio")
        if selector not in SFT_SELECTORS:
            raise ValueError(f"SelectiveSFTTrainer: selector must be one of {SFT_SELECTORS}, got {selector!r}")
        if scope not in ("batch", "sequence"):
            raise ValueError(f"SelectiveSFTTrainer: scope must be 'batch' or 'sequence', got {scope!r}")
        if ratio < 1.0 and selector in ("excess_loss", "reference_loss") and reference is None:
            raise ValueError(
                f"SelectiveSFTTrainer: selector={selector!r} ranks tokens against a reference: pass reference=<a "
                "model or path sharing the tokenizer>, or selector='train_loss'"
            )
        super().__init__(model, args, *pos, **kwargs)
        if self.args.loss_type != "nll":
            raise ValueError(
                f"SelectiveSFTTrainer: loss_type={self.args.loss_type!r} reweights every token by its probability; "
                "the selective head trains plain cross-entropy (loss_type='nll')"
            )
        if self.args.label_smoothing_factor or self.compute_loss_func is not None:
            raise ValueError(
                "SelectiveSFTTrainer: label smoothing and compute_loss_func need every token's logits, which the "
                "selective head never builds"
            )
        inner = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        self.selective = SelectiveLM(
            inner, ratio=ratio, selector=selector, scope=scope, check_scores="deferred", sparse_backward=sparse_backward
        )
        add_selective_head(inner, self.selective)
        self.reference = _frozen(reference, self.args.device) if reference is not None else None
        self.token_metrics = token_metrics
        self.model_accepts_loss_kwargs = True  # the loss is normalised by num_items_in_batch here
        self._score_check = StepScoreCheck()

    # -- counting: the tokens each micro-batch trains, from host-side labels, before any forward ------
    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device):
        if not batch_samples or "labels" not in batch_samples[0]:
            return None
        lm = self.selective
        n = sum(int(num_selected(shifted_valid(b["labels"]), lm.ratio, lm.scope)) for b in batch_samples)
        n = torch.tensor(n, device=device)  # an integer count, as Trainer's own (the loss stays in its dtype)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            n = self.accelerator.gather(n.reshape(1)).sum()
        return n

    # -- loss ---------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch=None):
        training = self.model.training
        mode = "train" if training else "eval"
        decoder = {k: v for k, v in inputs.items() if k not in _NOT_FOR_THE_DECODER}
        selecting = training and self.selective.ratio < 1.0
        ref_loss = self._reference_losses(inputs, decoder) if selecting else None
        metrics = self.token_metrics or not training
        out = model(
            slm_head=True,
            labels=inputs["labels"],
            ref_loss=ref_loss,
            ratio=None if training else 1.0,
            num_items_in_batch=num_items_in_batch if training else None,
            return_hits=metrics,
            return_entropy=metrics,
            **decoder,
        )
        loss = out.loss
        if training:
            if self.selective.ratio < 1.0:
                self._score_check.add(self, out.n_nonfinite, "the reference")
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # DDP averages gradients; the count is global
        if metrics:  # over every token TRL would train, as TRL logs them
            gather = self.accelerator.gather_for_metrics
            n_valid = gather(torch.as_tensor(out.n_valid, device=loss.device)).sum()
            entropy, correct = gather(out.entropy.sum()).sum(), gather(out.hits.sum()).sum()
            self._metrics[mode]["entropy"].append((entropy / n_valid).item() if n_valid > 0 else 0.0)
            self._metrics[mode]["mean_token_accuracy"].append((correct / n_valid).item() if n_valid > 0 else 0.0)
        if training:
            self._metrics[mode]["selected_frac"].append(out.n_selected / max(out.n_valid, 1))
            self._count_tokens(inputs)
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return (loss, out) if return_outputs else loss

    def _reference_losses(self, inputs: dict, decoder: dict) -> torch.Tensor | None:
        if self.reference is None:
            return None
        kwargs = {k: v for k, v in decoder.items() if k not in ("input_ids", "attention_mask")}
        with torch.no_grad():
            return token_losses(
                self.reference, inputs["input_ids"], inputs["labels"], inputs.get("attention_mask"), **kwargs
            )

    def _count_tokens(self, inputs: dict) -> None:
        """TRL's ``num_tokens``: every input token of the run so far (padding aside)."""
        if "attention_mask" in inputs:
            local = inputs["attention_mask"].sum()
        else:
            local = torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
        self._total_train_tokens += self.accelerator.gather_for_metrics(local).sum().item() // self._tp_size

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Eval loss over every token TRL evaluates. With ``compute_metrics`` the predictions are what slm has
        instead of logits (none exist), as :class:`slm.trainers.SelectiveTrainer` gives them: ``(token_loss,
        hits)``, ``[B, T]`` float32 per-token losses (entry ``t`` predicts ``labels[:, t]``; 0 where not
        evaluated) and ``[B, T]`` int arg-max hits."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            if prediction_loss_only:
                return self.compute_loss(model, inputs).detach(), None, None
            loss, out = self.compute_loss(model, inputs, return_outputs=True)
        return loss.detach(), (out.token_loss, out.hits.long()), inputs["labels"]


def _frozen(reference, device) -> torch.nn.Module:
    if isinstance(reference, str):
        return load_reference(reference, device=device)
    return freeze(reference.to(device))


GRPO_LOSSES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")
# TRL's own rule, and the registry's per-token scores but reference_loss (which ranks by the reference alone:
# the policy's own tokens are what GRPO selects among)
GRPO_SELECTORS = ("entropy", *(n for n in loss_scores() if n != "reference_loss"))


class SelectiveGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` whose token selection (``top_entropy_quantile``) runs through slm's selective head.

    TRL scores every completion token with gradients and then multiplies the policy loss of all but the
    highest-entropy share by zero. Here one no-grad loss pass gives every completion token's
    log-probability and entropy (what the importance ratio, clipping and the mask need), the tokens are
    picked, and the gradient-carrying head runs on those tokens only. With the default ``selector="entropy"``
    TRL's own rule picks them (the same tokens, loss and gradients as TRL: tested equal). Settings whose
    gradient reaches every token are refused: a KL term (``beta``), sequence-level importance sampling, the
    entropy bonus, and the losses that mix tokens in their weights (``vespo``, ``luspo``).

    Args (beyond ``GRPOTrainer``'s; the share kept is ``args.top_entropy_quantile``):
        selector: what ranks the completion tokens: ``entropy`` (TRL's rule), ``train_loss`` (the policy's
            own -log p: the tokens it finds least likely), ``excess_loss`` (that minus a ``reference`` model's
            loss on the same token), ``random``.
        scope: ``batch`` (the top share of each micro-batch's completion tokens), ``sequence`` (of each
            completion) or ``dataset`` (a threshold over the run, :class:`slm.selection.RunningThreshold`);
            ``entropy`` takes TRL's own scope.
        reference: a causal LM (a model, or a path / hub name) sharing the tokenizer, for ``excess_loss``.
    """

    def __init__(self, *args, selector: str = "entropy", scope: str = "batch", reference=None, **kwargs):
        if selector not in GRPO_SELECTORS:
            raise ValueError(f"SelectiveGRPOTrainer: selector must be one of {GRPO_SELECTORS}, got {selector!r}")
        if scope not in ("batch", "sequence", "dataset"):
            raise ValueError(f"SelectiveGRPOTrainer: scope must be 'batch', 'sequence' or 'dataset', got {scope!r}")
        if selector == "entropy" and scope != "batch":
            raise ValueError("SelectiveGRPOTrainer: selector='entropy' is TRL's rule, with TRL's scope (scope='batch')")
        if (selector == "excess_loss") != (reference is not None):
            raise ValueError(
                "SelectiveGRPOTrainer: selector='excess_loss' ranks tokens against a reference: pass reference=<a "
                "model or path sharing the tokenizer> with it (and only with it)"
            )
        super().__init__(*args, **kwargs)
        if not self.top_entropy_quantile < 1.0:
            raise ValueError("SelectiveGRPOTrainer: set top_entropy_quantile < 1 (the share of tokens it trains)")
        refused = {
            "beta != 0 (its KL term has a gradient at every token)": self.beta != 0.0,
            "importance_sampling_level='sequence' (every token's ratio enters each)": (
                self.importance_sampling_level != "token"
            ),
            "an entropy bonus (its gradient reaches every token's entropy)": self._entropy_bonus_enabled,
            f"loss_type={self.loss_type!r} (supported: {', '.join(GRPO_LOSSES)})": self.loss_type not in GRPO_LOSSES,
            "a model with a router loss": self.aux_loss_enabled,
        }
        bad = [what for what, hit in refused.items() if hit]
        if bad:
            raise ValueError(f"SelectiveGRPOTrainer: not with {'; '.join(bad)}; use trl.GRPOTrainer for those")
        inner = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        self.selective = SelectiveLM(inner, ratio=1.0)
        add_selective_head(inner, self.selective)
        self.selector, self.scope = selector, scope
        self.reference = _frozen(reference, self.args.device) if reference is not None else None
        self.threshold = RunningThreshold() if scope == "dataset" else None
        self._completion_mask = None
        self._kept = None  # the completion tokens an slm rule kept, for TRL's loss to mask with

    def get_high_entropy_mask(self, entropies, mask, threshold):
        """TRL's mask of the trained tokens: an slm rule's choice where one ran, else TRL's entropy rule."""
        if self._kept is not None:
            return self._kept.to(entropies.dtype)
        return super().get_high_entropy_mask(entropies, mask, threshold)

    def _rank(self, logp, valid, input_ids, attention_mask, labels) -> torch.Tensor:
        """The kept tokens by an slm score over ``valid`` (the completion tokens, aligned with ``labels``)."""
        share = self.top_entropy_quantile
        if self.selector == "random":
            scores = random_scores(logp, self.selective.generator)
        elif self.selector == "train_loss":
            scores = -logp
        else:
            with torch.no_grad():
                ref_loss = token_losses(self.reference, input_ids, labels, attention_mask)
            scores = excess_loss(-logp, ref_loss.to(logp.device))
        if self.threshold is not None:
            return self.threshold.select(scores, valid, share)
        return select_tokens(scores, share, valid, self.scope)

    def _compute_loss(self, model, inputs):
        mask = inputs["completion_mask"]
        self._completion_mask = mask if "tool_mask" not in inputs else mask * inputs["tool_mask"]
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self._completion_mask, self._kept = None, None

    def _get_per_token_logps_and_entropies(
        self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, compute_entropy=False,
        compute_aux_loss=False, **multimodal,
    ):  # fmt: skip
        ours = (
            self._completion_mask is not None
            and torch.is_grad_enabled()
            and compute_entropy
            and not compute_aux_loss
            and all(v is None for v in multimodal.values())
        )
        if not ours:  # generation-time scoring, the reference model, eval: TRL's own
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, compute_aux_loss,
                **multimodal,
            )  # fmt: skip
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        labels[:, :-logits_to_keep] = -100
        completion = self._completion_mask

        def keep(logp, entropy, valid):  # on the loss pass's log-probs and entropies
            if self.selector != "entropy":
                on = torch.zeros_like(valid)
                on[:, -logits_to_keep:] = completion.bool()
                return self._rank(logp, on & valid, input_ids, attention_mask, labels)
            top = self.get_high_entropy_mask(entropy[:, -logits_to_keep:], completion, 1 - self.top_entropy_quantile)
            kept = torch.zeros_like(valid)
            kept[:, -logits_to_keep:] = top
            return kept

        with self.accelerator.autocast():
            logp, entropy, kept = model(
                input_ids=input_ids, attention_mask=attention_mask, labels=labels, slm_keep=keep
            )
        if self.selector != "entropy":
            self._kept = kept[:, -logits_to_keep:]
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["selected_frac"].append(float(kept.sum() / completion.sum().clamp(min=1)))
        return logp[:, -logits_to_keep:], entropy[:, -logits_to_keep:], None
