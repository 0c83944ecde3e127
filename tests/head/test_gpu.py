"""On a CUDA device (skipped elsewhere; scripts/gpu_check.sh runs them with slm-bench's GPU tables)."""

import pytest
import torch
import torch.nn.functional as F
from support.archs import VOCAB, tiny_model

import slm
from slm.model import shifted_valid

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
BACKENDS = ["torch", "compiled", "triton"]  # every backend on the GPU (on CPU the compiled one is slow-marked)


def _batch(device):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (4, 64), generator=g)
    labels = ids.clone()
    labels[1, -9:] = -100
    return ids.to(device), labels.to(device)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi", "gemma2", "cohere"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_autocast_matches_hf_full_logits(arch, backend):
    ids, labels = _batch("cuda")
    model = tiny_model(arch).cuda()
    keep = shifted_valid(labels) & (torch.arange(64, device="cuda") % 3 == 0)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = slm.SelectiveLM(model, head_backend=backend)(input_ids=ids, labels=labels, loss_mask=keep)
        ours = torch.autograd.grad(out.loss, list(model.parameters()), allow_unused=True)
        logits = model(input_ids=ids).logits[:, :-1].float()
        ce = F.cross_entropy(logits.transpose(1, 2), labels[:, 1:].clamp(min=0), reduction="none")
        ref = (ce * keep[:, 1:]).sum() / keep[:, 1:].sum()
        theirs = torch.autograd.grad(ref, list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(out.loss, ref, atol=2e-2, rtol=2e-2)
    for a, b in zip(ours, theirs):
        if a is not None and b is not None:
            torch.testing.assert_close(a.float(), b.float(), atol=3e-2, rtol=5e-2)


def test_the_default_cuda_backend_and_the_float32_output_matmuls_are_the_fast_ones():
    """What the GPU check must not pass by accident: Triton where installed, and both float32-output
    products of bf16 inputs on the device (never float32 GEMMs)."""
    from slm.head import OutputHead, fused, resolve_backend
    from slm.head.matmul import fast_path

    head = OutputHead(torch.zeros(8, 8, device="cuda"))
    assert resolve_backend(head) == ("triton" if fused.unavailable(torch.device("cuda")) is None else "compiled")
    a = torch.zeros(4, 4, device="cuda", dtype=torch.bfloat16)
    assert fast_path("mm", a) and fast_path("addmm", a), f"torch {torch.__version__} lacks out_dtype=float32 matmuls"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("selector", ["excess_loss", "random", "loss_mask"])
def test_one_device_sync_per_forward_on_cuda(backend, selector):
    from support.probes import HostSyncs

    ids, labels = _batch("cuda")
    model = tiny_model("llama").cuda()
    scope = "sequence" if selector == "random" else "batch"  # random: a seeded tie-break order from the host
    lm = slm.SelectiveLM(model, check_scores="deferred", head_backend=backend, selector=selector.replace("loss_mask",
                         "excess_loss"), scope=scope)  # fmt: skip
    ref = torch.rand(ids.shape, device="cuda")
    kwargs = dict(ref_loss=ref, ratio=0.6) if selector != "loss_mask" else dict(loss_mask=labels % 3 == 0)
    lm(input_ids=ids, labels=labels, **kwargs).loss.backward()  # one-time work: compiling, tuning, probes
    with HostSyncs() as decoder:
        model.base_model(input_ids=ids, use_cache=False)
    with HostSyncs() as forward:
        out = lm(input_ids=ids, labels=labels, **kwargs)
    assert sorted(forward.ops) == sorted(decoder.ops + ["copy to cpu"])
    with HostSyncs() as backward:
        out.loss.backward()
    assert backward.ops == []


def test_chunks_are_multiples_of_128_rows_on_cuda():
    from slm.head import OutputHead

    head = OutputHead(torch.zeros(151936, 896, device="cuda", dtype=torch.bfloat16))
    for kind in ("score", "train"):
        assert head.chunk_rows(kind) % 128 == 0


def test_head_weight_gradient_accumulates_over_many_chunks_on_cuda():
    """bf16 chunks add their weight gradients into one float32 buffer (in place, where CUDA's
    addmm(out_dtype=) allows): eight 128-row chunks give what one chunk gives."""
    ids = torch.randint(1, VOCAB, (4, 257), generator=torch.Generator().manual_seed(2)).cuda()
    model = tiny_model("llama").cuda()
    grads = []
    for rows in (128, 2048):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = slm.SelectiveLM(model, chunk_elements=rows * VOCAB)(input_ids=ids, labels=ids, ratio=1.0)
        grads.append(torch.autograd.grad(out.loss, model.lm_head.weight)[0])
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-4)
