"""SelectiveLM: any HF causal LM trained only on selected tokens, with the head work skipped for the rest.
Imports slm.head and slm.selection.

  selective_lm.py  SelectiveLM (the forward: score, select, train the selected rows), SelectiveOutput, saving
  rows.py          which rows a step scores and trains, planned with one device sync; loss_mask/loss_weight checks
  logprobs.py      per-token log-probs whose gradients pass only through kept tokens (policy-gradient losses)
  architectures.py HF causal LMs: build one from config, find its output head, PEFT and ZeRO-3 details
  losses.py        token_losses: per-token losses (and entropies) of any HF causal LM without B x T x V
  flops.py         the matrix products a step really runs (a data-efficiency x-axis)
  sparse_backward.py  SelectiveLM(sparse_backward=...): the decoder's linear layers take gradients from kept rows only
"""

from slm.model.architectures import ModelConfig, build_model, causal_lm, register_zero3_head
from slm.model.flops import FlopModel, flop_model
from slm.model.losses import token_losses
from slm.model.rows import check_loss_mask, check_loss_weight, shifted_valid
from slm.model.selective_lm import SCORES, SELECTORS, SelectiveLM, SelectiveOutput, save_inner_pretrained

__all__ = [
    "ModelConfig",
    "FlopModel",
    "SCORES",
    "SELECTORS",
    "SelectiveLM",
    "SelectiveOutput",
    "build_model",
    "causal_lm",
    "check_loss_mask",
    "check_loss_weight",
    "flop_model",
    "register_zero3_head",
    "save_inner_pretrained",
    "shifted_valid",
    "token_losses",
]
