"""What ``slm-bench`` measures: model shapes, and the cases of each table as zero-argument callables
(a training step's loss to backpropagate, or a no-grad loss pass) on one model and one batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from slm.model import SelectiveLM, token_losses
from slm.selection import select_tokens

SHAPES = {
    # name: (model_type, config kwargs, batch, seq)
    "tiny": (
        "llama",
        dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            vocab_size=2000,
        ),
        2,
        32,
    ),
    "cpu": (
        "llama",
        dict(
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=32000,
        ),
        4,
        256,
    ),
    "phi2-1layer": (
        "phi",
        dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=1, num_attention_heads=32, vocab_size=51200),
        1,
        512,
    ),
    "qwen2.5-0.5b": (
        "qwen2",
        dict(
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            vocab_size=151936,
            tie_word_embeddings=True,
        ),
        8,
        2048,
    ),
    # decoder-dominated shapes for the sparse backward (--decoder): the head is a small share of the step
    "llama-768x12": (
        "llama",
        dict(
            hidden_size=768,
            intermediate_size=2048,
            num_hidden_layers=12,
            num_attention_heads=12,
            num_key_value_heads=12,
            vocab_size=32000,
        ),
        4,
        512,
    ),
    "tinyllama-1.1b": (
        "llama",
        dict(
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
            vocab_size=32000,
        ),
        8,
        2048,
    ),
}

# Qwen2.5-0.5B's layers, 4 of its 24 (its head is then half the matmul work)
SHAPES["qwen2.5-0.5b-layers4"] = ("qwen2", dict(SHAPES["qwen2.5-0.5b"][1], num_hidden_layers=4), 2, 512)

BASELINE = "hf_full_logits_masked"
FLOOR = "backbone_only (floor)"
SPARSE_CASES = ("selective_loss_mask", "hand_written_masked_loss", "hf_plain_loss")
EXACT = "slm_exact"


def build_workload(shape: str, device: str, dtype: torch.dtype, batch: int | None, seq: int | None):
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, kwargs, b, t = SHAPES[shape]
    b, t = batch or b, seq or t
    cfg = AutoConfig.for_model(model_type, max_position_embeddings=max(t, 2048), **kwargs)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).to(device=device, dtype=dtype).train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (b, t), generator=g).to(device)
    ref_loss = (torch.rand(b, t, generator=g) * 8).to(device)
    mask = lambda r: (torch.rand(b, t, generator=torch.Generator().manual_seed(1)) < r).to(device)
    return model, ids, ref_loss, mask


def _masked_ce(logits, ids, keep):
    """The hand-written loss a loss_mask user writes: full logits, per-token CE, masked mean."""
    logits = logits[:, :-1].float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    keep = keep[:, 1:].reshape(-1)
    return (ce * keep).sum() / keep.sum()


def _tag(backend: str, backends: list[str]) -> str:
    return "slm" if len(backends) == 1 else f"slm_{backend}"


def cases(model, ids, ref_loss, mask, backends: list[str]) -> dict:
    """name -> zero-argument callable returning a scalar loss to backpropagate. slm's cases run on
    each head backend in ``backends`` (named ``slm_<backend>_...`` when there are several);
    selection scores are checked the way a trainer does, in its own end-of-step sync."""

    m3, m6 = mask(0.3), mask(0.6)
    out = {
        BASELINE: lambda: _masked_ce(model(input_ids=ids).logits, ids, m6),
        FLOOR: lambda: model.base_model(input_ids=ids).last_hidden_state.float().square().mean(),
    }
    for backend in backends:
        lm, tag = SelectiveLM(model, head_backend=backend, check_scores="deferred"), _tag(backend, backends)
        out[f"{tag}_loss_mask_0.3"] = lambda lm=lm: lm(input_ids=ids, labels=ids, loss_mask=m3).loss
        out[f"{tag}_loss_mask_0.6"] = lambda lm=lm: lm(input_ids=ids, labels=ids, loss_mask=m6).loss
        for r in (1.0, 0.6, 0.3):
            out[f"{tag}_excess_{r}"] = lambda r=r, lm=lm: lm(input_ids=ids, labels=ids, ref_loss=ref_loss, ratio=r).loss
    out.update(_library_cases(model, ids, ref_loss, m3, m6))
    return out


def decoder_cases(model, ids, ref_loss, mask) -> dict:
    """The sparse backward's table: HF's full logits + masked loss; slm's exact selective step; the sparse
    backward over every decoder layer and over the top half; at ratios 0.3 and 0.6 (excess-loss
    selection) and with a loss_mask of 0.3."""
    n_layers = model.config.num_hidden_layers
    m3 = mask(0.3)
    lms = {
        EXACT: SelectiveLM(model, check_scores="deferred"),
        "slm_sparse_all": SelectiveLM(model, check_scores="deferred", sparse_backward=True),
        "slm_sparse_top_half": SelectiveLM(model, check_scores="deferred", sparse_backward=max(1, n_layers // 2)),
    }
    out = {BASELINE: lambda: _masked_ce(model(input_ids=ids).logits, ids, mask(0.6))}
    for r in (0.6, 0.3):
        for tag, lm in lms.items():
            out[f"{tag}_excess_{r}"] = lambda r=r, lm=lm: lm(input_ids=ids, labels=ids, ref_loss=ref_loss, ratio=r).loss
    for tag in (EXACT, "slm_sparse_all"):
        out[f"{tag}_loss_mask_0.3"] = lambda lm=lms[tag]: lm(input_ids=ids, labels=ids, loss_mask=m3).loss
    return out


def sparse_cases(model, ids) -> dict:
    """2 of every 512 tokens trained: what the Phi-2 user's SelectiveTrainer step runs, and the two
    losses it replaces."""

    keep = torch.zeros_like(ids, dtype=torch.bool)
    keep[:, 1 :: max(2, ids.shape[1] // 2)] = True  # two tokens per row
    lm = SelectiveLM(model)
    fns = (
        lambda: lm(input_ids=ids, labels=ids, loss_mask=keep).loss,
        lambda: _masked_ce(model(input_ids=ids).logits, ids, keep),
        lambda: model(input_ids=ids, labels=ids.masked_fill(~keep, -100)).loss,
    )
    return dict(zip(SPARSE_CASES, fns))


def scoring_cases(model, ids, backends: list[str]) -> dict:
    """No-grad per-token losses of every token: slm's loss pass against CCE's and HF's logits."""

    out = {
        "hf_full_logits": lambda: _masked_ce(model(input_ids=ids).logits, ids, torch.ones_like(ids, dtype=torch.bool)),
    }
    for backend in backends:
        name = "slm_token_losses" + ("" if len(backends) == 1 else f"_{backend}")
        out[name] = lambda b=backend: token_losses(model, ids, ids, head_backend=b)
    if ids.device.type == "cuda":
        try:
            from cut_cross_entropy import linear_cross_entropy

            W = model.get_output_embeddings().weight
            hidden = lambda: model.base_model(input_ids=ids).last_hidden_state[:, :-1].reshape(-1, W.shape[1])
            out["cce_forward"] = lambda: linear_cross_entropy(
                hidden(), W, ids[:, 1:].reshape(-1), reduction="none", impl="cce", filter_eps=None
            )
        except ImportError:
            pass
    return out


def _library_cases(model, ids, ref_loss, m3, m6) -> dict:
    """torch's own linear_cross_entropy (any device) and, on CUDA, Liger and Apple's CCE, each used
    the best way it allows (CCE with exact gradients: filter_eps=None). The masked ones train the
    same tokens as the HF baseline (60%) or as slm's loss_mask 0.3 case."""

    extra = {}
    W = model.get_output_embeddings().weight
    hidden = lambda: model.base_model(input_ids=ids).last_hidden_state[:, :-1].reshape(-1, W.shape[1])
    tgt = ids[:, 1:].reshape(-1)
    masked_tgt = tgt.masked_fill(~m6[:, 1:].reshape(-1), -100)
    if hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions"):  # torch >= 2.13
        opts = torch.nn.LinearCrossEntropyOptions()  # the chunked path, never the full logits
        extra["torch_linear_ce_mask_0.6"] = lambda: F.linear_cross_entropy(hidden(), W, masked_tgt, options=opts)
    if ids.device.type != "cuda":
        return extra
    try:
        from cut_cross_entropy import linear_cross_entropy

        exact = dict(impl="cce", filter_eps=None)

        def cce_score_then_train():  # score all rows without grad, then CCE on the selected rows
            h = hidden()
            with torch.no_grad():
                tl = linear_cross_entropy(h.detach(), W.detach(), tgt, reduction="none", **exact)
            scores = F.pad(tl.view(ids.shape[0], -1), (1, 0)) - ref_loss
            sel = select_tokens(scores, 0.6)[:, 1:].reshape(-1)
            return linear_cross_entropy(h, W, tgt.masked_fill(~sel, -100), reduction="mean", **exact)

        extra["cce_score_then_train_0.6"] = cce_score_then_train
        extra["cce_mask_0.3"] = lambda: linear_cross_entropy(
            hidden(), W, tgt.masked_fill(~m3[:, 1:].reshape(-1), -100), **exact
        )
    except ImportError:
        pass
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        extra["liger_flce_mask_0.6"] = lambda: liger_fused_linear_cross_entropy(hidden(), W, masked_tgt)
    except ImportError:
        pass
    return extra
