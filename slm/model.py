"""SelectiveLM: any HF causal LM, trained only on selected tokens, with the head work skipped.

The decoder runs once on every token (unselected tokens remain context). The output layer runs
forward without grad on every valid token (selection needs the current loss), and its
grad-enabled work runs on the selected rows only. Everything happens inside ``forward()`` so
DDP, FSDP and DeepSpeed wrap the module as they would any other.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slm.head import OutputHead, score_rows, selected_rows_loss
from slm.selection import SCOPES, check_ratio, score_tokens, select_tokens

IGNORE_INDEX = -100

# Architectures whose logits are exactly ``cap(scale * (final_hidden @ W.T + b))`` with the
# final norm inside ``model.base_model``; checked against HF's own loss in the tests.
_EXACT_HEADS = {
    "gpt2", "gpt_neox", "llama", "mistral", "qwen2", "qwen3", "phi", "phi3",
    "gemma", "gemma2", "cohere", "granite", "olmo", "olmo2", "starcoder2",
}  # fmt: skip

SELECTORS = ("excess_loss", "train_loss", "reference_loss", "random")


def output_head(model: nn.Module, chunk_elements: int | None = None) -> OutputHead | None:
    """The :class:`OutputHead` that reproduces ``model``'s logits, or ``None`` if unknown."""
    cfg = model.config
    out = model.get_output_embeddings()
    if cfg.model_type not in _EXACT_HEADS or type(out) is not nn.Linear:
        return None
    scale = 1.0
    if cfg.model_type == "cohere":
        scale = float(cfg.logit_scale)
    elif cfg.model_type == "granite":
        scale = 1.0 / float(cfg.logits_scaling)
    softcap = getattr(cfg, "final_logit_softcapping", None) if cfg.model_type == "gemma2" else None
    return OutputHead(out.weight, out.bias, scale, softcap, chunk_elements)


@dataclass
class SelectiveOutput:
    loss: Tensor  # scalar; grad flows
    token_loss: Tensor  # [B, T] float32, detached, 0 where not computed
    mask: Tensor  # [B, T] bool: the tokens that received loss
    n_selected: int
    n_valid: int
    hits: Tensor | None = None  # [B, T] bool, label == arg-max prediction (with return_hits=True)


def shifted_valid(labels: Tensor) -> Tensor:
    """[B, T] bool: tokens whose loss is defined (t >= 1 and label != -100)."""
    valid = labels != IGNORE_INDEX
    valid[:, 0] = False
    return valid


class SelectiveLM(nn.Module):
    """Wrap an HF causal LM so that its loss and head gradients cover only selected tokens.

    Args:
        model: any ``AutoModelForCausalLM`` model.
        ratio: default share of valid tokens to train on (overridable per call).
        selector: score used to rank tokens: ``excess_loss`` (default; ``train_loss`` when a
            call gives no ``ref_loss``), ``train_loss``, ``reference_loss`` or ``random``.
        scope: ``sequence``, ``batch`` or ``global`` (see :func:`slm.select_tokens`).
        seed: seed of the ``random`` selector and of random tie-breaking.
        chunk_elements: logits held at once by the chunked head (rows x vocabulary); ``None``
            picks a size for the device (see :data:`slm.head.CHUNK_ELEMENTS`).
    """

    def __init__(
        self,
        model: nn.Module,
        ratio: float = 0.6,
        selector: str = "excess_loss",
        scope: str = "batch",
        seed: int = 0,
        chunk_elements: int | None = None,
    ):
        super().__init__()
        if selector not in SELECTORS:
            raise ValueError(f"selector must be one of {SELECTORS}, got {selector!r}")
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
        self.model = model
        self.ratio = check_ratio(ratio)
        self.selector = selector
        self.scope = scope
        self.chunk_elements = chunk_elements
        self.generator = torch.Generator().manual_seed(seed)
        self.exact_head = output_head(model, chunk_elements) is not None
        if not self.exact_head:
            warnings.warn(
                f"slm: no exact selective head for model_type={model.config.model_type!r}; "
                "falling back to HF's full forward (correct loss, no head savings).",
                stacklevel=2,
            )

    # -- the inner model stays an ordinary HF model ------------------------------------------
    @property
    def config(self):
        return self.model.config

    def save_pretrained(self, *args, **kwargs):
        return self.model.save_pretrained(*args, **kwargs)

    # -----------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: Tensor,
        labels: Tensor,
        attention_mask: Tensor | None = None,
        ref_loss: Tensor | None = None,
        loss_mask: Tensor | None = None,
        ratio: float | None = None,
        num_items_in_batch: Tensor | float | None = None,
        return_hits: bool = False,
        **model_kwargs,
    ) -> SelectiveOutput:
        """Loss over the selected tokens (see :class:`SelectiveOutput`).

        ``loss_mask`` trains exactly those (valid) tokens with no scoring pass. Otherwise every
        valid token is scored and the top ``ratio`` by the selector's score are trained.
        ``num_items_in_batch`` replaces the default denominator (the number of selected tokens)
        so a trainer can normalise over a whole optimizer step and all processes.
        ``return_hits=True`` (scoring path only) also reports arg-max hits, for accuracy metrics.
        """
        labels = labels.to(input_ids.device)
        if labels.shape != input_ids.shape or labels.dim() != 2:
            raise ValueError(
                f"labels {tuple(labels.shape)} must have the [B, T] shape of input_ids {tuple(input_ids.shape)}"
            )
        valid = shifted_valid(labels)
        for name, t in (("ref_loss", ref_loss), ("loss_mask", loss_mask)):
            if t is not None and t.shape != labels.shape:
                raise ValueError(
                    f"{name} has shape {tuple(t.shape)}; it must be aligned with labels {tuple(labels.shape)}"
                )
        ratio = self.ratio if ratio is None else check_ratio(ratio)

        rows = valid[:, 1:]  # row i of the flattened selection predicts labels[:, 1:][rows][i]
        targets = labels[:, 1:][rows]
        vocab = self.model.get_output_embeddings().weight.shape[0]
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
            raise ValueError(
                f"labels must be token ids in [0, {vocab}) or -100, got values in "
                f"[{int(targets.min())}, {int(targets.max())}]; is the tokenizer the model's?"
            )
        head_rows = self._rows(input_ids, attention_mask, rows, targets, model_kwargs)

        token_loss = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
        hits = None
        if loss_mask is None and (ratio < 1.0 or return_hits):
            # Selection needs the current loss of every valid token: a no-grad scoring pass.
            row_loss, row_hits = head_rows.score(return_hits)
            token_loss[:, 1:][rows] = row_loss
            if return_hits:
                hits = torch.zeros_like(valid)
                hits[:, 1:][rows] = row_hits
            mask = valid if ratio == 1.0 else self._select(token_loss, ref_loss, valid, ratio)
            loss_sum, _ = head_rows.train(mask[:, 1:][rows])
        else:
            # The trained tokens are known up front (a loss_mask, or all of them): one fused pass.
            mask = valid if loss_mask is None else loss_mask.to(valid.device).bool() & valid
            loss_sum, row_loss = head_rows.train(mask[:, 1:][rows])
            token_loss[mask] = row_loss

        n_selected = int(mask.sum())
        denom = num_items_in_batch if num_items_in_batch is not None else max(n_selected, 1)
        if torch.is_tensor(denom):
            denom = denom.to(loss_sum.device)
        return SelectiveOutput(loss_sum / denom, token_loss, mask, n_selected, int(valid.sum()), hits)

    def _select(self, token_loss: Tensor, ref_loss: Tensor | None, valid: Tensor, ratio: float) -> Tensor:
        selector = "train_loss" if self.selector == "excess_loss" and ref_loss is None else self.selector
        ref = None if ref_loss is None else ref_loss.to(token_loss.device)
        return select_tokens(score_tokens(selector, token_loss, ref, self.generator), ratio, valid, self.scope)

    def _rows(self, input_ids, attention_mask, rows, targets, model_kwargs):
        head = output_head(self.model, self.chunk_elements)
        if head is None:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, **model_kwargs).logits
            return _FullLogitRows(logits[:, :-1][rows], targets)
        out = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **model_kwargs)
        return _HeadRows(head, out.last_hidden_state[:, :-1][rows], targets)


class _HeadRows:
    """Valid rows' hidden states; scores all of them, trains a subset, never all logits at once."""

    def __init__(self, head: OutputHead, hidden: Tensor, targets: Tensor):
        self.head, self.hidden, self.targets = head, hidden, targets
        self.lse = None

    def score(self, hits: bool = False) -> tuple[Tensor, Tensor | None]:
        out = score_rows(self.head, self.hidden.detach(), self.targets, hits=hits)
        self.lse = out[1]
        return out[0], out[2] if hits else None

    def train(self, picked: Tensor) -> tuple[Tensor, Tensor]:
        lse = None if self.lse is None else self.lse[picked]
        return selected_rows_loss(self.head, self.hidden[picked], self.targets[picked], lse)


class _FullLogitRows:
    """Fallback for heads we cannot reproduce: HF's own logits, masked. Correct, not faster."""

    def __init__(self, logits: Tensor, targets: Tensor):
        self.ce = F.cross_entropy(logits.float(), targets, reduction="none")
        self.hit = logits.detach().argmax(-1) == targets

    def score(self, hits: bool = False) -> tuple[Tensor, Tensor | None]:
        return self.ce.detach(), self.hit if hits else None

    def train(self, picked: Tensor) -> tuple[Tensor, Tensor]:
        ce = self.ce[picked]
        return ce.sum(), ce.detach()


@torch.no_grad()
def token_losses(
    model: nn.Module,
    input_ids: Tensor,
    labels: Tensor,
    attention_mask: Tensor | None = None,
    chunk_elements: int | None = None,
    return_hits: bool = False,
    **model_kwargs,
):
    """Per-token next-token losses ``[B, T]`` (float32), aligned with ``labels``, 0 where invalid.

    Never materialises ``B x T x V`` logits: the head runs in row chunks (or, for an
    architecture without an exact selective head, one sequence at a time). With
    ``return_hits=True`` also returns ``[B, T]`` bool: the label is the arg-max prediction.
    """
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must match input_ids {tuple(input_ids.shape)}")
    labels = labels.to(input_ids.device)
    valid = shifted_valid(labels)
    out = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
    hits = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    head = output_head(model, chunk_elements)
    if head is None:
        for b in range(input_ids.shape[0]):
            am = None if attention_mask is None else attention_mask[b : b + 1]
            logits = model(input_ids=input_ids[b : b + 1], attention_mask=am, **model_kwargs).logits[0, :-1]
            ce = F.cross_entropy(logits.float(), labels[b, 1:].clamp(min=0), reduction="none")
            out[b, 1:] = ce * valid[b, 1:]
            hits[b, 1:] = (logits.argmax(-1) == labels[b, 1:]) & valid[b, 1:]
    else:
        hidden = model.base_model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **model_kwargs
        ).last_hidden_state
        rows = valid[:, 1:]
        loss, _, hit = score_rows(head, hidden[:, :-1][rows], labels[:, 1:][rows], hits=True)
        out[:, 1:][rows] = loss
        hits[:, 1:][rows] = hit
    return (out, hits) if return_hits else out
