"""SelectiveLM: any HF causal LM, trained only on selected tokens, with the head work skipped.

The decoder runs once on every token (unselected tokens remain context). The output layer runs
forward without grad on every valid token (selection needs the current loss), and its
grad-enabled work runs on the selected rows only. Everything happens inside ``forward()`` so
DDP, FSDP and DeepSpeed wrap the module as they would any other, and the wrapper forwards what
those engines and ``transformers.Trainer`` read from the model it wraps.
"""

from __future__ import annotations

import inspect
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers.utils import ModelOutput

from slm.head import BACKENDS
from slm.model.architectures import causal_lm, check_no_router_loss, head_support, output_head, zero3_ready
from slm.model.logprobs import kept_logprobs
from slm.model.rows import FullLogitRows, HeadRows, RowPlan, plan_rows
from slm.model.sparse_backward import KeptRows, SparseBackward, check_sparse_backward
from slm.selection import (
    COMBINATIONS,
    SCOPES,
    SCORERS,
    RunningThreshold,
    check_ratio,
    num_to_keep,
    score_tokens,
    select_combined,
    select_tokens,
)

SCORES = tuple(SCORERS)  # one registry: slm.selection's score functions
SELECTORS = (*SCORES, *COMBINATIONS)  # the combinations join two scores' top-k sets

# Keyword arguments a padding-free collator (DataCollatorWithFlattening) adds for flash attention.
_PACKING_KWARGS = {"cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx"}
# HF loss options that SelectiveLM does not implement: refused with the reason, never ignored.
_UNSUPPORTED = {
    "shift_labels": "SelectiveLM takes HF-aligned labels (shifted inside, like model(labels=...)); convert "
    "pre-shifted labels with labels = torch.nn.functional.pad(shift_labels[:, :-1], (1, 0), value=-100)",
    "ignore_index": "only -100 marks ignored labels (HF's convention); map your ignore value to -100",
    "label_smoothing": "label smoothing is not implemented by the selective head",
    "reduction": "the loss is always the (weighted) mean over trained tokens; use out.token_loss for per-token losses",
    "logits_to_keep": "SelectiveLM never materialises logits",
    "past_key_values": "SelectiveLM is for training; it runs without a cache",
    "inputs_embeds": "SelectiveLM needs input_ids (labels are aligned with them)",
}


@dataclass
class SelectiveOutput(ModelOutput):
    """What :class:`SelectiveLM` returns. An HF ``ModelOutput`` (a dict) so that FSDP2 and ZeRO-3
    find the loss tensor and hook their backward passes onto it."""

    loss: Tensor | None = None  # scalar; grad flows
    token_loss: Tensor | None = None  # [B, T] float32, detached, 0 where not computed
    mask: Tensor | None = None  # [B, T] bool: the tokens that received loss
    n_selected: int | None = None
    n_valid: int | None = None
    hits: Tensor | None = None  # [B, T] bool, label == arg-max prediction (with return_hits=True)
    entropy: Tensor | None = None  # [B, T] float32, the predictive distribution's entropy (return_entropy=True)
    n_nonfinite: Tensor | None = None  # with check_scores="deferred": NaN/inf selection scores (device scalar)


class SelectiveLM(nn.Module):
    """Wrap an HF causal LM so that its loss and head gradients cover only selected tokens.

    Args:
        model: any ``AutoModelForCausalLM`` model, or a PEFT (LoRA) model of one.
        ratio: default share of valid tokens to train on (overridable per call).
        selector: score used to rank tokens: ``excess_loss`` (default; ``train_loss`` when a
            call gives no ``ref_loss``), ``train_loss``, ``reference_loss``, ``reference_entropy``
            (keep what the reference is most certain about; needs ``ref_entropy``) or ``random``;
            or ``union`` / ``intersection`` of the top-k sets of the two scores in ``combine``.
        combine: the two scores of ``union`` / ``intersection``, e.g.
            ``("excess_loss", "reference_entropy")``.
        scope: ``sequence``, ``batch`` or ``global`` (an exact top-k per unit, see
            :func:`slm.select_tokens`), or ``dataset`` (a threshold over the run:
            :class:`slm.selection.RunningThreshold`; how many tokens a batch trains then depends on
            its scores).
        seed: seed of the ``random`` selector and of random tie-breaking.
        chunk_elements: logits held at once by the chunked head (rows x vocabulary); ``None``
            picks a size for the device and pass (see :data:`slm.head.CHUNK_ELEMENTS`).
        head_backend: ``auto`` (``triton`` on CUDA where Triton is installed, else ``compiled``;
            ``torch`` elsewhere), ``torch``, ``compiled`` (the chunk's element-wise math fused by
            ``torch.compile``) or ``triton`` (fused kernels that keep logits on chip and compute
            the selected rows' gradients in the backward; see :mod:`slm.head.fused`).
        check_scores: ``eager`` raises :class:`slm.selection.NonFiniteScores` at once (a device
            sync); ``deferred`` reports their count in ``out.n_nonfinite`` for the caller to check
            with its own end-of-step sync (what ``slm-train`` does).
        sparse_backward: ``False`` (the exact backward, default), ``True`` or an int N: the linear
            layers of every (or the top N) decoder layer compute their gradients over the trained
            tokens' rows only, dropping the gradient that reaches parameters through unselected
            positions as keys and values (see :mod:`slm.model.sparse_backward` for exactly what).
            Dense decoders only; mixtures of experts are refused.

    A forward waits for the device once (the row counts and input checks, see :mod:`slm.model.rows`);
    with ``scope="global"`` the cross-process gather adds its own.
    """

    main_input_name = "input_ids"

    def __init__(
        self,
        model: nn.Module,
        ratio: float = 0.6,
        selector: str = "excess_loss",
        scope: str = "batch",
        seed: int = 0,
        chunk_elements: int | None = None,
        head_backend: str = "auto",
        check_scores: str = "eager",
        combine: tuple[str, str] | None = None,
        sparse_backward: bool | int = False,
    ):
        super().__init__()
        if selector in ("union", "intersection"):
            if combine is None or len(combine) != 2 or not set(combine) <= set(SCORES):
                raise ValueError(f"selector={selector!r} combines two scores: combine=(a, b) with a, b in {SCORES}")
            combine = tuple(combine)
        elif combine is not None:
            raise ValueError(f"combine= goes with selector='union' or 'intersection', not {selector!r}")
        if combine is not None and scope == "dataset":
            raise ValueError(
                "selector='union'/'intersection' combine two exact top-k sets: use scope='sequence', "
                "'batch' or 'global' with them"
            )
        self.combine = combine
        if head_backend not in BACKENDS:
            raise ValueError(f"head_backend must be one of {BACKENDS}, got {head_backend!r}")
        if check_scores not in ("eager", "deferred"):
            raise ValueError(f"check_scores must be 'eager' or 'deferred', got {check_scores!r}")
        if selector not in SELECTORS:
            raise ValueError(f"selector must be one of {SELECTORS}, got {selector!r}")
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
        self.model = model
        self.ratio = check_ratio(ratio)
        self.selector = selector
        self.scope = scope
        self.threshold = RunningThreshold() if scope == "dataset" else None
        self.chunk_elements = chunk_elements
        self.head_backend = head_backend
        self.check_scores = check_scores
        self.generator = torch.Generator().manual_seed(seed)
        self._decoder_kwargs = self._accepted_kwargs()
        depth = check_sparse_backward(sparse_backward)
        self.sparse_backward = sparse_backward
        self._sparse = None if depth is False else SparseBackward(model, depth)
        why = head_support(model)
        self._fallback_warned = why is not None
        if why is not None:
            warnings.warn(
                f"slm: {why}; falling back to HF's full forward (correct loss, no head savings).", stacklevel=2
            )

    # -- the wrapper looks like the model it wraps (FSDP auto-wrap, Accelerate, Trainer, PEFT) ------
    @property
    def config(self):
        return causal_lm(self.model).config

    @property
    def exact_head(self) -> bool:
        """Whether the next forward runs the selective head (False: HF's full logits)."""
        return head_support(self.model) is None

    @property
    def _no_split_modules(self):
        return getattr(causal_lm(self.model), "_no_split_modules", None)

    def get_input_embeddings(self) -> nn.Module:
        return causal_lm(self.model).get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return causal_lm(self.model).get_output_embeddings()

    def tie_weights(self, *args, **kwargs):
        return causal_lm(self.model).tie_weights(*args, **kwargs)

    # transformers 5 renamed gradient checkpointing to activation checkpointing; both names work.
    def activation_checkpointing_enable(self, *args, **kwargs):
        return _call_either(
            self.model, "activation_checkpointing_enable", "gradient_checkpointing_enable", *args, **kwargs
        )

    def activation_checkpointing_disable(self):
        return _call_either(self.model, "activation_checkpointing_disable", "gradient_checkpointing_disable")

    gradient_checkpointing_enable = activation_checkpointing_enable
    gradient_checkpointing_disable = activation_checkpointing_disable

    @property
    def is_activation_checkpointing(self) -> bool:
        lm = causal_lm(self.model)
        if hasattr(lm, "is_activation_checkpointing"):
            return bool(lm.is_activation_checkpointing)
        return bool(getattr(lm, "is_gradient_checkpointing", False))

    is_gradient_checkpointing = is_activation_checkpointing

    @property
    def supports_gradient_checkpointing(self) -> bool:
        return bool(getattr(causal_lm(self.model), "supports_gradient_checkpointing", False))

    def enable_input_require_grads(self):
        return self.model.enable_input_require_grads()

    def num_parameters(self, *args, **kwargs) -> int:
        return causal_lm(self.model).num_parameters(*args, **kwargs)

    def save_pretrained(self, *args, **kwargs):
        return self.model.save_pretrained(*args, **kwargs)

    def _accepted_kwargs(self) -> set[str]:
        decoder = causal_lm(self.model).base_model
        params = inspect.signature(decoder.forward).parameters
        named = {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        return (named | _PACKING_KWARGS) - {"input_ids", "attention_mask", "labels", "use_cache"} - set(_UNSUPPORTED)

    def _check_call(self, kwargs: dict) -> None:
        """What this forward cannot do exactly is an error: a router loss, unknown or unsupported arguments."""
        check_no_router_loss(self.model)
        for name in kwargs:
            if name in _UNSUPPORTED:
                raise TypeError(f"SelectiveLM.forward() does not take {name}=: {_UNSUPPORTED[name]}")
        unknown = sorted(set(kwargs) - self._decoder_kwargs)
        if unknown:
            raise TypeError(
                f"SelectiveLM.forward() got unexpected keyword argument(s) {unknown}; besides its own arguments it "
                f"passes these to the decoder: {sorted(self._decoder_kwargs)}"
            )

    # -----------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Tensor,
        labels: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        ref_loss: Tensor | None = None,
        ref_entropy: Tensor | None = None,
        loss_mask: Tensor | None = None,
        loss_weight: Tensor | None = None,
        ratio: float | None = None,
        num_items_in_batch: Tensor | float | None = None,
        return_hits: bool = False,
        return_entropy: bool = False,
        **model_kwargs,
    ) -> SelectiveOutput:
        """Loss over the selected tokens (see :class:`SelectiveOutput`).

        ``loss_mask`` (bool) trains exactly those (valid) tokens with no loss pass;
        ``loss_weight`` (float >= 0) does the same with per-token weights: the loss is
        ``sum(w * loss) / sum(w)``. Otherwise every valid token is scored and the top ``ratio``
        by the selector's score are trained. ``num_items_in_batch`` replaces the denominator (the
        number of trained tokens, or the weights' sum) so a trainer can normalise over a whole
        optimizer step and all processes; 0 means "nothing trained" (the loss is 0, never inf).
        ``return_hits=True`` also reports arg-max hits, for accuracy metrics, and ``return_entropy=True``
        each valid token's predictive entropy (both from the no-grad loss pass). Other keyword
        arguments (``position_ids``, packing arguments) go to the decoder; unknown ones raise.
        """
        self._check_call(model_kwargs)
        if position_ids is not None:
            model_kwargs["position_ids"] = position_ids
        labels = _check_inputs(
            input_ids,
            labels,
            attention_mask,
            ref_loss=ref_loss,
            ref_entropy=ref_entropy,
            loss_mask=loss_mask,
            loss_weight=loss_weight,
        )
        if loss_mask is not None and loss_weight is not None:
            raise ValueError("pass loss_mask or loss_weight, not both (loss_weight > 0 marks the trained tokens)")
        if ref_loss is not None and ref_loss.dtype in (torch.bfloat16, torch.float16):
            _warn_low_precision_ref(ref_loss.dtype)
        ratio = self.ratio if ratio is None else check_ratio(ratio)

        exact = self._exact() and zero3_ready(self)  # else this call runs HF's own forward
        out_layer = self.get_output_embeddings().weight
        vocab = getattr(out_layer, "ds_shape", out_layer.shape)[0]  # the whole vocabulary, also when sharded
        embedding = self.get_input_embeddings()
        n_inputs = getattr(embedding.weight, "ds_shape", embedding.weight.shape)[0] if embedding is not None else None
        plan = plan_rows(  # the forward's one sync
            labels, vocab, loss_mask, loss_weight, ratio, self.scope, input_ids=input_ids, input_vocab=n_inputs
        )
        sparse_rows = KeptRows(input_ids.numel()) if self._sparse is not None and torch.is_grad_enabled() else None
        with self._sparse.recording(sparse_rows) if sparse_rows is not None else nullcontext():
            rows = self._rows(exact, input_ids, attention_mask, plan, labels, model_kwargs)

        hits = entropy = n_nonfinite = None
        if plan.known is None or return_hits or return_entropy:
            # Selection needs the current loss of every valid token: a no-grad loss pass.
            row_loss, row_hits, row_entropy = rows.score(return_hits, return_entropy)
            token_loss = plan.scatter(plan.valid_pos, row_loss)
            if return_hits:
                hits = plan.scatter(plan.valid_pos, row_hits)
            if return_entropy:
                entropy = plan.scatter(plan.valid_pos, row_entropy)
            if plan.known is None:
                mask, pos, n_nonfinite = self._select(token_loss, ref_loss, ref_entropy, plan, ratio)
            else:
                mask, pos = plan.known, plan.known_pos
                token_loss = token_loss * mask
            loss_sum, _ = rows.train(plan.rows_of(pos), plan.weights_at(pos))
        else:
            # The trained tokens are known up front (a loss_mask, weights, or all): one fused pass.
            mask, pos = plan.known, plan.known_pos
            loss_sum, row_loss = rows.train(plan.rows_of(pos), plan.weights_at(pos))
            token_loss = plan.scatter(pos, row_loss)
        if sparse_rows is not None:  # before any backward: the decoder's linear layers read them there
            sparse_rows.keep(pos, input_ids.shape[1])

        n_selected = pos.numel()
        if num_items_in_batch is not None:
            denom = num_items_in_batch
        else:
            denom = n_selected if plan.weights is None else plan.weights_at(pos).sum()
        return SelectiveOutput(
            loss=loss_sum / _nonzero(denom, loss_sum.device),
            token_loss=token_loss,
            mask=mask,
            n_selected=n_selected,
            n_valid=plan.n_valid,
            hits=hits,
            entropy=entropy,
            n_nonfinite=n_nonfinite,
        )

    def kept_logprobs(
        self, input_ids: Tensor, labels: Tensor, keep, attention_mask: Tensor | None = None, **model_kwargs
    ) -> tuple[Tensor, Tensor, Tensor]:
        """``(log p, entropy, kept)``, each ``[B, T]`` aligned with ``labels``: every valid token's
        log-probability and predictive entropy from a no-grad loss pass, with gradients reaching the
        model only through the tokens ``keep(logp, entropy, valid) -> [B, T] bool`` keeps (see
        :mod:`slm.model.logprobs`). For losses that are any function of per-token log-probabilities."""
        self._check_call(model_kwargs)
        labels = _check_inputs(input_ids, labels, attention_mask)
        why = head_support(self.model)
        if why is not None:
            raise ValueError(f"SelectiveLM.kept_logprobs needs the selective head: {why}")
        vocab, n_inputs = self.get_output_embeddings().weight.shape[0], self.get_input_embeddings().weight.shape[0]
        plan = plan_rows(labels, vocab, None, None, 1.0, "batch", input_ids=input_ids, input_vocab=n_inputs)
        rows = self._rows(True, input_ids, attention_mask, plan, labels, model_kwargs)
        return kept_logprobs(rows.head, rows.hidden, rows.targets, plan, keep)

    def _exact(self) -> bool:
        """Whether this call can run the selective head (else HF's full logits, warned once)."""
        why = head_support(self.model)
        if why is not None and not self._fallback_warned:
            self._fallback_warned = True
            warnings.warn(
                f"slm: {why}; falling back to HF's full logits from now on (correct loss, no head savings).",
                stacklevel=3,
            )
        return why is None

    def _select(
        self, token_loss: Tensor, ref_loss: Tensor | None, ref_entropy: Tensor | None, plan: RowPlan, ratio: float
    ):
        """(mask, flat positions of the selected rows, count of non-finite scores or None)."""
        dev = token_loss.device
        ref, ent = (None if t is None else t.to(dev) for t in (ref_loss, ref_entropy))
        eager = self.check_scores == "eager"
        kw = dict(counts=plan.counts, check_finite=eager)
        if self.combine is not None:
            scores = [score_tokens(name, token_loss, ref, self.generator, ent) for name in self.combine]
            mask = select_combined(self.selector, *scores, ratio, plan.valid, self.scope, **kw)
        else:
            selector = "train_loss" if self.selector == "excess_loss" and ref is None else self.selector
            scores = [score_tokens(selector, token_loss, ref, self.generator, ent)]
            if self.threshold is not None:  # its count is read once, then the positions need no further wait
                mask, kept = self.threshold.select_counted(scores[0], plan.valid, ratio, eager, plan.n_valid)
                return mask, plan.positions(mask, kept), self._nonfinite(scores, plan, eager)
            mask = select_tokens(scores[0], ratio, plan.valid, self.scope, **kw)
        nonfinite = self._nonfinite(scores, plan, eager)
        if plan.counts is None or not self.fixed_count:  # the count is known only after selecting
            return mask, mask[:, 1:].reshape(-1).nonzero().squeeze(1), nonfinite
        k = sum(num_to_keep(ratio, n) for n in plan.counts)
        return mask, plan.positions(mask, k), nonfinite

    @staticmethod
    def _nonfinite(scores: list[Tensor], plan: RowPlan, eager: bool) -> Tensor | None:
        """How many valid tokens have a NaN or inf score, as a device count (None: checked eagerly)."""
        return None if eager else sum((~torch.isfinite(s) & plan.valid).sum() for s in scores)

    @property
    def sparse_weights(self) -> int:
        """How many parameters run their backward on the trained rows only (0: the exact backward)."""
        return 0 if self._sparse is None else self._sparse.weights()

    @property
    def fixed_count(self) -> bool:
        """Whether how many tokens a batch trains is known from its labels alone (not for unions,
        intersections, or a threshold over the run)."""
        return self.combine is None and self.scope != "dataset"

    def selection_state(self) -> dict:
        """What selection carries from step to step beyond its seed (a checkpoint keeps it)."""
        return {} if self.threshold is None else {"threshold": self.threshold.state_dict()}

    def load_selection_state(self, state: dict) -> None:
        if self.threshold is not None and "threshold" in state:
            self.threshold.load_state_dict(state["threshold"])

    def _rows(self, exact: bool, input_ids, attention_mask, plan: RowPlan, labels, model_kwargs):
        lm = causal_lm(self.model)
        targets = labels[:, 1:].reshape(-1).index_select(0, plan.valid_pos)
        if not exact:
            logits = lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **model_kwargs).logits
            return FullLogitRows(logits[:, :-1].reshape(-1, logits.shape[-1]).index_select(0, plan.valid_pos), targets)
        out = lm.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **model_kwargs)
        # After the decoder: under FSDP2 the head's unit is gathered by then (or now, see output_head).
        head, why = output_head(self.model, self.chunk_elements, self.head_backend)
        if head is None:
            raise RuntimeError(f"slm: the selective head could not run: {why}")
        hidden = out.last_hidden_state[:, :-1]
        return HeadRows(head, hidden.reshape(-1, hidden.shape[-1]).index_select(0, plan.valid_pos), targets)


def _check_inputs(input_ids, labels, attention_mask, **per_token) -> Tensor:
    """Every input's type and shape, each error naming the argument; ``labels`` on the ids' device."""
    for name, t in (
        ("input_ids", input_ids),
        ("labels", labels),
        ("attention_mask", attention_mask),
        *per_token.items(),
    ):
        if t is not None and not torch.is_tensor(t):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    if input_ids.numel() == 0:
        raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}): a batch needs at least one token")
    for name, t in (("input_ids", input_ids), ("labels", labels)):
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer token ids (torch.long), got {t.dtype}")
    if labels.shape != input_ids.shape:
        raise ValueError(
            f"labels {tuple(labels.shape)} must have the [B, T] shape of input_ids {tuple(input_ids.shape)}"
        )
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}; it must be the [B, T] shape of "
            f"input_ids {tuple(input_ids.shape)}"
        )
    for name, t in per_token.items():
        if t is not None and t.shape != labels.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}; it must be aligned with labels {tuple(labels.shape)}")
    return labels.to(input_ids.device)


def _call_either(obj, name: str, old_name: str, *args, **kwargs):
    return getattr(obj, name if hasattr(obj, name) else old_name)(*args, **kwargs)


def _nonzero(denom, device) -> Tensor | float:
    """The denominator, with 0 replaced by 1: a step that trains nothing has loss 0, not 0/0."""
    if torch.is_tensor(denom):
        denom = denom.to(device)
        return torch.where(denom == 0, torch.ones_like(denom), denom)
    return denom or 1


_warned_dtypes: set = set()


def _warn_low_precision_ref(dtype) -> None:
    if dtype not in _warned_dtypes:
        _warned_dtypes.add(dtype)
        warnings.warn(
            f"slm: ref_loss arrived in {dtype}: selection ranks on rounded reference losses. Pass float32 (a "
            "mixed-precision wrapper that casts forward inputs, e.g. FSDP's cast_forward_inputs, rounds it)",
            stacklevel=3,
        )


def save_inner_pretrained(lm: nn.Module, state_dict: dict, out_dir: Path, tokenizer=None) -> None:
    """Write ``lm``'s inner HF model (or PEFT adapter) with ``state_dict`` (keys of ``lm``)."""
    inner = getattr(lm, "model", lm)
    prefix = "model." if inner is not lm else ""
    state_dict = dict(state_dict)
    # A gathered state dict holds a tied head and embedding as two equal copies: make them one
    # tensor again, so save_pretrained stores it once (as a single-process save does).
    first: dict[int, str] = {}
    for name, param in lm.named_parameters(remove_duplicate=False):
        if id(param) in first and name in state_dict and first[id(param)] in state_dict:
            state_dict[name] = state_dict[first[id(param)]]
        first.setdefault(id(param), name)
    sd = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    inner.save_pretrained(str(out_dir), state_dict=sd)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
