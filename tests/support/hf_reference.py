"""The independent reference the exactness tests compare against: HF's own per-token loss from full
logits and its parameter gradients; and the head backends each test runs on."""

import pytest
import torch
import torch.nn.functional as F

from slm.head import fused
from support.archs import ARCHS


def hf_token_ce(model, ids, labels, am=None):
    """Per-token CE from HF's full logits, aligned with labels (0 where invalid); grad flows."""
    logits = model(input_ids=ids, attention_mask=am).logits[:, :-1].float()
    tgt = labels[:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.clamp(min=0).reshape(-1), reduction="none")
    ce = ce.view_as(tgt) * (tgt != -100)
    return F.pad(ce, (1, 0))


def grads(loss, model):
    return [
        g if g is not None else torch.zeros_like(p)
        for p, g in zip(model.parameters(), torch.autograd.grad(loss, list(model.parameters()), allow_unused=True))
    ]


# Every exactness test against HF runs on each head backend available on CPU: torch; compiled in the
# slow suite (its one-off compilation); triton under Triton's interpreter (TRITON_INTERPRET=1, set in
# conftest.py).
HAVE_TRITON = fused.unavailable(torch.device("cpu")) is None


NEEDS_TRITON = pytest.mark.skipif(not HAVE_TRITON, reason="Triton is not installed")


BACKENDS = ["torch", pytest.param("compiled", marks=pytest.mark.slow), pytest.param("triton", marks=NEEDS_TRITON)]


def _arch_backends():
    for arch in ARCHS:
        yield pytest.param(arch, "torch", id=f"{arch}-torch")
        yield pytest.param(arch, "compiled", id=f"{arch}-compiled", marks=pytest.mark.slow)
        yield pytest.param(arch, "triton", id=f"{arch}-triton", marks=NEEDS_TRITON)


ARCH_BACKENDS = list(_arch_backends())


def assert_grads_close(ga, gb):
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-4)


def plain_eval_loss(model_dir, eval_set) -> float:
    """Mean next-token cross-entropy over every valid token, with plain torch on full logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ds = eval_set.with_format("torch")
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ds), 8):
            rows = ds[i : i + 8]
            logits = model(input_ids=rows["input_ids"], attention_mask=rows["attention_mask"]).logits
            targets = rows["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).double(), targets.flatten(), ignore_index=-100, reduction="sum"
            )
            total, count = total + float(loss), count + int((targets != -100).sum())
    return total / count
