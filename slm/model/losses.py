"""Per-token losses (and entropies) of any HF causal LM, without a B x T x V tensor: what a
reference scores and what selection ranks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slm.head import full_logits_rows_loss, row_losses
from slm.model.architectures import causal_lm, gathered, output_head
from slm.model.rows import plan_rows


@torch.no_grad()
def token_losses(
    model: nn.Module,
    input_ids: Tensor,
    labels: Tensor,
    attention_mask: Tensor | None = None,
    chunk_elements: int | None = None,
    return_hits: bool = False,
    return_entropy: bool = False,
    head_backend: str = "auto",
    **model_kwargs,
):
    """Per-token next-token losses ``[B, T]`` (float32), aligned with ``labels``, 0 where invalid.

    Never materialises ``B x T x V`` logits: the head runs in row chunks (or, for an
    architecture without an exact selective head, one sequence at a time). With
    ``return_hits=True`` also returns ``[B, T]`` bool: the label is the arg-max prediction; with
    ``return_entropy=True`` (after it) the entropy of the model's predictive distribution.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels {tuple(labels.shape)} must match input_ids {tuple(input_ids.shape)}")
    labels = labels.to(input_ids.device)
    lm = causal_lm(model)
    head, _ = output_head(model, chunk_elements, head_backend)
    vocab = lm.get_output_embeddings().weight.shape[0] if head is None else head.vocab_size
    plan = plan_rows(labels, vocab, None, None, 1.0, "batch")  # one sync: the valid rows and the label check
    targets = labels[:, 1:].reshape(-1).index_select(0, plan.valid_pos)
    if head is None:  # one sequence of full logits at a time
        b, t = labels.shape
        loss, hit = (
            torch.zeros(b, t - 1, device=labels.device),
            torch.zeros(b, t - 1, dtype=torch.bool, device=labels.device),
        )
        ent = torch.zeros_like(loss)
        for i in range(b):
            am = None if attention_mask is None else attention_mask[i : i + 1]
            z = lm(input_ids=input_ids[i : i + 1], attention_mask=am, use_cache=False, **model_kwargs).logits[0, :-1]
            loss[i] = full_logits_rows_loss(z, labels[i, 1:].clamp(min=0))
            hit[i] = z.argmax(-1) == labels[i, 1:]
            if return_entropy:
                ent[i] = torch.distributions.Categorical(logits=z.float()).entropy()
        rows = plan.valid[:, 1:]
        parts = [F.pad(loss * rows, (1, 0)), F.pad(hit & rows, (1, 0)), F.pad(ent * rows, (1, 0))]
        return _pick(parts, return_hits, return_entropy)
    with gathered([head.weight, head.bias]):
        hidden = lm.base_model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **model_kwargs
        ).last_hidden_state[:, :-1]
        rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, plan.valid_pos)
        loss, _, hit, ent = (
            row_losses(head, rows, targets, hits=True, entropy=True)
            if return_entropy
            else (*row_losses(head, rows, targets, hits=True), None)
        )
    parts = [plan.scatter(plan.valid_pos, v) if v is not None else None for v in (loss, hit, ent)]
    return _pick(parts, return_hits, return_entropy)


def _pick(parts: list, hits: bool, entropy: bool):
    chosen = [parts[0]] + ([parts[1]] if hits else []) + ([parts[2]] if entropy else [])
    return chosen[0] if len(chosen) == 1 else tuple(chosen)
