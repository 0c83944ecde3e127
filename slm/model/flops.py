"""Training FLOPs of what a step actually computed (a data-efficiency x-axis beside tokens and time).

Per token of a block of ``seq`` tokens, forward plus backward (PaLM's accounting, Chowdhery et al.
2022, appendix B): ``6 x body`` for the decoder's weights (``body``: every parameter but the input
embedding and the output layer) and ``12 x layers x width x seq`` for attention. The output layer
(``head`` = vocabulary x width weights) is counted where it runs: ``2 x head`` per token of the
no-grad loss pass (every valid token when selecting by score), ``6 x head`` per trained token
(logits recomputed, then the hidden-state and weight gradients). A live reference adds its forward
(``2 x its weights``) per token it reads (with sequence selection, every candidate block a block
score asks it about, and again the kept ones); candidate blocks scored by the training model cost a
no-grad forward: a third of the decoder's terms plus the loss pass. With a sparse backward
(:mod:`slm.model.sparse_backward`) the ``sparse`` weights of the chosen layers' linear layers run
their backward (``4 x`` per token) on the trained rows only. Estimates, not
measurements: element-wise work and norms are left out, as in the usual ``6 N D``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from slm.model.architectures import causal_lm, whole_numel


@dataclass(frozen=True)
class FlopModel:
    body: int  # decoder parameters other than the input embedding and the output layer
    head: int  # vocabulary x width
    layers: int
    width: int
    seq: int
    reference: int = 0  # a live reference's parameters (0: stored scores or none)
    sparse: int = 0  # weights whose backward covers the trained rows only (sparse_backward)

    @property
    def attention(self) -> int:
        return 12 * self.layers * self.width * self.seq

    def step(
        self, tokens: int, scored: int, trained: int, forward_only: int = 0, reference_tokens: int | None = None
    ) -> float:
        """FLOPs of a step that ran the decoder forward and backward on ``tokens`` tokens, scored
        ``scored`` rows without grad, trained ``trained`` rows through the head, ran ``forward_only``
        further tokens through a no-grad forward (candidate blocks scored by the training model), and
        ran a live reference on ``reference_tokens`` tokens (default: the ``tokens`` trained on)."""
        flops = (6 * self.body + self.attention) * tokens + 2 * self.head * scored + 6 * self.head * trained
        flops -= 4 * self.sparse * (tokens - min(trained, tokens))
        flops += self.forward(forward_only)
        flops += 2 * self.reference * (tokens if reference_tokens is None else reference_tokens)
        return float(flops)

    def forward(self, tokens: int) -> float:
        """FLOPs of a no-grad forward over ``tokens`` tokens, the output layer included (a third of training's
        decoder terms plus the loss pass): what scoring a store costs."""
        return float((2 * self.body + self.attention // 3 + 2 * self.head) * tokens)


def flop_model(model: nn.Module, seq: int, reference: nn.Module | None = None, sparse: int = 0) -> FlopModel:
    """The :class:`FlopModel` of an HF causal LM (or a PEFT model of one) for blocks of ``seq`` tokens;
    ``sparse``: how many of its weights a sparse backward covers (``SelectiveLM.sparse_weights``)."""

    lm = causal_lm(model)
    emb, out = lm.get_input_embeddings().weight, lm.get_output_embeddings().weight
    params = {id(p): p for p in lm.parameters()}  # a tied head is one parameter
    head = whole_numel(out)
    body = sum(whole_numel(p) for p in params.values()) - whole_numel(emb) - (0 if out is emb else head)
    cfg = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", 0)
    ref = 0 if reference is None else sum(whole_numel(p) for p in {id(p): p for p in reference.parameters()}.values())
    return FlopModel(body, head, int(layers), int(getattr(out, "ds_shape", out.shape)[1]), int(seq), ref, int(sparse))
