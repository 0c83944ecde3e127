"""The triton backend checks itself on first use (per device, compute dtype, bias and soft-cap): on a compile or
resource error or a mismatch with float32 math, head_backend=auto warns once and runs the compiled backend for
the rest of the process, and an explicit head_backend=triton raises naming why. Failures are injected here; the
kernels themselves run under Triton's CPU interpreter."""

import warnings

import pytest
import torch

from slm.head import fused, resolve_backend
from slm.head.output import OutputHead

pytestmark = pytest.mark.skipif(fused.unavailable(torch.device("cpu")) is not None, reason="Triton is not installed")


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    monkeypatch.setattr(fused, "_CHECKED", {})  # each test is a new process as far as the check knows
    monkeypatch.setattr(fused, "_WARNED", set())


def _head(dtype=torch.float32, bias=False, softcap=None, backend="triton"):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 16, generator=g).to(dtype)
    return OutputHead(w, torch.randn(40, generator=g) if bias else None, softcap=softcap, backend=backend)


@pytest.mark.parametrize(("dtype", "bias", "softcap"), [(torch.float32, False, None), (torch.bfloat16, True, 3.0)])
def test_the_real_kernels_pass_their_first_use_check(dtype, bias, softcap):
    head = _head(dtype, bias, softcap)
    assert fused.self_check(head) is None
    assert fused.auto_backend(head) == "triton" and resolve_backend(head) == "triton"


def _broken_loss_pass(*args, **kwargs):
    raise RuntimeError("out of resource: shared memory, Required: 262144, Hardware limit: 232448")


def _wrong_gradients(*args, **kwargs):
    grads = real_backward(*args, **kwargs)
    return tuple(None if g is None else g * 1.5 for g in grads)


real_backward = fused._backward


@pytest.mark.parametrize(
    ("target", "fake", "said"),
    [("loss_pass", _broken_loss_pass, "RuntimeError: out of resource"), ("_backward", _wrong_gradients, "gradient")],
)
def test_a_failing_check_makes_auto_fall_back_with_one_warning_and_explicit_triton_raise(
    monkeypatch, target, fake, said
):
    monkeypatch.setattr(fused, target, fake)
    head = _head()
    with pytest.warns(RuntimeWarning, match=f"failed its first-use check.*{said}.*compiled backend instead"):
        assert fused.auto_backend(head) == "compiled"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per process, not at every forward
        assert fused.auto_backend(head) == "compiled"
    with pytest.raises(ValueError, match=f"head_backend=triton: .*{said}"):
        resolve_backend(head)


def test_the_check_is_made_once_per_combination(monkeypatch):
    calls = []
    real = fused._compare
    monkeypatch.setattr(fused, "_compare", lambda head, dtype: calls.append(dtype) or real(head, dtype))
    for _ in range(3):
        fused.self_check(_head())
    fused.self_check(_head(torch.bfloat16))
    assert calls == [torch.float32, torch.bfloat16]


real_loss_pass = fused.loss_pass


def _broken_hits(head, hidden, targets, hits=False, entropy=False):
    if hits:
        raise RuntimeError("out of resource: registers (the HITS variant)")
    return real_loss_pass(head, hidden, targets, hits, entropy)


def _entropy_10_percent_off(head, hidden, targets, hits=False, entropy=False):
    loss, lse, hit, ent = real_loss_pass(head, hidden, targets, hits, entropy)
    return loss, lse, hit, None if ent is None else ent * 1.1


@pytest.mark.parametrize(("fake", "said"), [(_broken_hits, "RuntimeError: out of resource: registers"),
                                            (_entropy_10_percent_off, "entropy")])  # fmt: skip
def test_the_check_covers_every_variant_a_process_launches(monkeypatch, fake, said):
    """Issue 37 item 15: evals launch the kernel with hits, GRPO and entropy scores with entropy: a failing or
    wrong variant makes auto fall back before any of them runs, not a raw error (or wrong entropies) later."""
    monkeypatch.setattr(fused, "loss_pass", fake)
    head = _head()
    with pytest.warns(RuntimeWarning, match=f"failed its first-use check.*{said}"):
        assert fused.auto_backend(head) == "compiled"
