"""What each head backend promises beyond exactness: where gradients are computed, float32 logits out of
the matmul, fp16 loss scaling, compiled chunk functions without graph breaks or recompiles."""

import pytest
import torch
from support.archs import VOCAB, tiny_model
from support.hf_reference import BACKENDS, NEEDS_TRITON, assert_grads_close, grads

import slm


@NEEDS_TRITON
def test_the_triton_backend_computes_gradients_in_the_backward_so_a_second_backward_adds_them(batch):
    ids, am, labels = batch
    model = tiny_model("llama")
    out = slm.SelectiveLM(model, head_backend="triton")(input_ids=ids, labels=labels, attention_mask=am, ratio=0.5)
    out.loss.backward(retain_graph=True)
    once = [p.grad.clone() for p in model.parameters()]
    out.loss.backward()
    assert_grads_close([p.grad for p in model.parameters()], [2 * g for g in once])


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_logits_come_out_of_the_matmul_in_float32(backend):
    """Under bf16 autocast the head's matmul inputs are bf16 but its logits are not rounded to bf16."""
    from slm.head import OutputHead, row_losses

    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(64, 32, generator=g) * 3, torch.randn(VOCAB, 32, generator=g)
    t = torch.randint(0, VOCAB, (64,), generator=g)
    exact = torch.logsumexp(h.bfloat16().float() @ w.bfloat16().float().t(), dim=-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, lse = row_losses(OutputHead(w, backend=backend), h, t)
    torch.testing.assert_close(lse, exact, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_with_a_loss_scaler_keeps_rare_tokens_weight_gradients(backend):
    """The loss scale must reach the head's gradients before their float16 matmuls (as in HF)."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.lm_head.weight.mul_(12)  # peaked predictions: most tokens get tiny probabilities
    ids = torch.randint(1, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    scale = 2.0**16

    def head_grad(loss_fn):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = loss_fn()
        (loss * scale).backward()
        return model.lm_head.weight.grad / scale

    hf = head_grad(lambda: model(input_ids=ids, labels=ids).loss)
    ours = head_grad(lambda: slm.SelectiveLM(model, head_backend=backend)(input_ids=ids, labels=ids, ratio=1.0).loss)
    rows_hf, rows_ours = hf.abs().sum(1) > 0, ours.abs().sum(1) > 0
    assert rows_hf.sum() > 0.9 * VOCAB  # nearly every row gets a (tiny) gradient in HF's computation
    assert torch.equal(rows_ours, rows_hf)
    torch.testing.assert_close(ours, hf, atol=1e-6, rtol=2e-2)


def test_chunk_functions_compile_without_graph_breaks():
    from slm.head import grad_chunk, loss_chunk

    g = torch.Generator().manual_seed(0)
    raw, t = torch.randn(8, VOCAB, generator=g), torch.randint(0, VOCAB, (8,), generator=g)
    lse, scale = torch.logsumexp(raw, -1), torch.rand(8, generator=g)
    for softcap in (None, 3.0):
        for fn, args in ((loss_chunk, (raw, t, softcap, True)),
                         (grad_chunk, (raw, t, lse, scale, softcap, 0.5, torch.bfloat16, True)),
                         (grad_chunk, (raw, t, None, None, softcap, 1.0))):  # fmt: skip
            explained = torch._dynamo.explain(fn)(*args)
            assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "phi", "gemma2", "cohere", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_backend_equals_the_torch_backend(batch, arch, dtype):
    """torch.compile'd chunk math (the CUDA default), on CPU: the same losses, masks and gradients."""
    ids, am, labels = batch
    ref = torch.rand(ids.shape, generator=torch.Generator().manual_seed(0))
    results = []
    for backend in ("torch", "compiled"):
        model = tiny_model(arch)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = slm.SelectiveLM(model, head_backend=backend, chunk_elements=4 * VOCAB)(
                input_ids=ids, labels=labels, attention_mask=am, ref_loss=ref, ratio=0.5
            )
        results.append((out, grads(out.loss, model)))
    (a, ga), (b, gb) = results
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-3, rtol=1e-3)
    assert torch.equal(a.mask, b.mask)
    torch.testing.assert_close(a.loss, b.loss, **tol)
    torch.testing.assert_close(a.token_loss, b.token_loss, **tol)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, **tol)


_CUDA = pytest.param(
    "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")]
)


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", _CUDA])
def test_compiled_head_does_not_recompile_per_row_count(device):
    """A run's steps select different numbers of rows and chunks end at different sizes: one
    compiled graph per chunk function and configuration serves them all (a recompile per size would
    stall every step and, past dynamo's recompile limit, fail the run)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model, g = tiny_model("llama").to(device), torch.Generator().manual_seed(0)
    lm = slm.SelectiveLM(model, head_backend="compiled", chunk_elements=16 * VOCAB)
    graphs = []
    for step in range(14):  # fresh row counts every step: valid tokens, selected tokens, chunk tails
        ids = torch.randint(1, VOCAB, (2, 24 + step), generator=g)
        labels = ids.clone()
        labels[:, : step + 1] = -100
        ref, keep = torch.rand(ids.shape, generator=g), torch.rand(ids.shape, generator=g) < 0.5
        ids, labels, ref, keep = (t.to(device) for t in (ids, labels, ref, keep))
        for kwargs in (dict(ref_loss=ref, ratio=0.3 + 0.03 * step), dict(loss_mask=keep)):
            out = lm(input_ids=ids, labels=labels, **kwargs)
            expected = slm.SelectiveLM(model, head_backend="torch")(input_ids=ids, labels=labels, **kwargs)
            assert torch.equal(out.mask, expected.mask)
            torch.testing.assert_close(out.loss, expected.loss, atol=1e-5, rtol=1e-5)
            out.loss.backward()
        tail = torch.zeros_like(keep)  # 16 * m + 1 trained rows: a 16-row chunk would leave a 1-row tail
        tail.view(-1)[1 : 1 + 16 * (1 + step % 2) + 1] = True
        tail[:, 0] = False
        out = lm(input_ids=ids, labels=ids, loss_mask=tail)
        out.loss.backward()
        slm.token_losses(model, ids, labels, return_hits=True, chunk_elements=16 * VOCAB)
        graphs.append(counters["stats"]["unique_graphs"])
    # One graph per chunk function and configuration (scoring with and without hits, training with and
    # without a known log-sum-exp), all compiled in the first step: no later step compiles anything,
    # whatever its row counts, tails or slice offsets, and none fell back to eager at the recompile limit.
    assert graphs[-1] == graphs[0] and graphs[-1] <= 4, graphs
    torch._dynamo.reset()


def test_compiled_backend_without_a_compiler_warns_and_runs_eagerly(batch, monkeypatch):
    """A machine where torch.compile cannot build kernels (here: no working C++ compiler) still
    trains with the compiled backend asked for, on the eager chunk math, and says so once."""
    import torch._inductor.config as inductor

    from slm.head import compiled as backend

    ids, am, labels = batch
    model, ref = tiny_model("gemma2"), torch.rand(ids.shape, generator=torch.Generator().manual_seed(0))
    expected = slm.SelectiveLM(model, head_backend="torch")(input_ids=ids, labels=labels, ref_loss=ref, ratio=0.5)
    monkeypatch.setattr(backend, "_COMPILED", None)
    monkeypatch.setattr(backend, "_COMPILE_FAILED", None)
    torch._dynamo.reset()
    with inductor.patch({"cpp.cxx": ("/nonexistent/c++",), "fx_graph_cache": False}):
        with pytest.warns(UserWarning, match="compiled head backend is unavailable.*C\\+\\+ compiler"):
            out = slm.SelectiveLM(model, head_backend="compiled")(input_ids=ids, labels=labels, ref_loss=ref, ratio=0.5)
        out.loss.backward()
    assert torch.equal(out.mask, expected.mask)
    torch.testing.assert_close(out.loss, expected.loss, atol=1e-6, rtol=1e-6)
    torch._dynamo.reset()
