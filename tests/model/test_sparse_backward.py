"""The sparse backward against its plain reference: HF's full-logits masked loss with every chosen
linear layer's output gradient zeroed by hand at the rows that predict no trained token; and
against the exact backward where nothing is dropped."""

import pytest
import torch
from support.archs import ARCH_KWARGS, VOCAB, tiny_model
from support.hf_reference import BACKENDS, grads, hf_token_ce
from torch.utils.flop_counter import FlopCounterMode

import slm
from slm.model import shifted_valid
from slm.model.sparse_backward import decoder_layers, mask_output_gradients

MOE = {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "phimoe", "granitemoe", "minimax", "glm4_moe",
       "hunyuan_v1_moe", "flex_olmo"}  # fmt: skip
DENSE = [a for a in ARCH_KWARGS if a not in MOE]


def kept_rows(mask):
    """[B * T] bool: the hidden rows that predict a trained token (row t predicts label t + 1)."""
    rows = torch.zeros_like(mask)
    rows[:, :-1] = mask[:, 1:]
    return rows.reshape(-1)


def reference_grads(model, ids, labels, am, mask, depth=None, params=None):
    """HF's masked loss, its chosen layers' linear output gradients zeroed at unkept rows by hand."""
    layers = decoder_layers(model)
    layers = layers if depth is None else layers[-depth:]
    with mask_output_gradients(layers, kept_rows(mask)):
        ce = hf_token_ce(model, ids, labels, am)
        loss = ce[mask].sum() / mask.sum()
        return loss, grads_of(loss, model, params)


def grads_of(loss, model, params=None):
    if params is None:
        return grads(loss, model)
    return list(torch.autograd.grad(loss, params))


def assert_close_all(ours, theirs, **tol):
    tol = tol or dict(atol=2e-6, rtol=1e-4)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, **tol)


def some_mask(labels, share=0.35, seed=3):
    chosen = torch.rand(labels.shape, generator=torch.Generator().manual_seed(seed)) < share
    return chosen & shifted_valid(labels)


@pytest.mark.parametrize("arch", DENSE)
def test_sparse_grads_equal_the_masked_reference_on_every_dense_architecture(arch, batch):
    ids, am, labels = batch
    mask = some_mask(labels)
    model = tiny_model(arch)
    out = slm.SelectiveLM(model, sparse_backward=True)(input_ids=ids, labels=labels, attention_mask=am, loss_mask=mask)
    assert torch.equal(out.mask, mask)
    ref_loss, theirs = reference_grads(model, ids, labels, am, mask)
    torch.testing.assert_close(out.loss, ref_loss, atol=1e-6, rtol=1e-5)
    ours = grads(out.loss, model)
    assert_close_all(ours, theirs)
    exact = grads(slm.SelectiveLM(model)(input_ids=ids, labels=labels, attention_mask=am, loss_mask=mask).loss, model)
    assert any(not torch.allclose(a, b, atol=1e-5) for a, b in zip(ours, exact)), "the mode dropped nothing"


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2", "phi", "gemma2", "falcon", "bloom", "gpt_neox"])
def test_nothing_dropped_is_the_exact_backward_bit_for_bit(arch):
    """Every token trained, no ignored label: the rows left out are sequence ends, whose gradient is zero."""
    ids = torch.randint(1, VOCAB, (3, 12), generator=torch.Generator().manual_seed(1))
    model = tiny_model(arch)
    exact = grads(slm.SelectiveLM(model)(input_ids=ids, labels=ids, ratio=1.0).loss, model)
    sparse = grads(slm.SelectiveLM(model, sparse_backward=True)(input_ids=ids, labels=ids, ratio=1.0).loss, model)
    for a, b in zip(sparse, exact, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("depth", [1, 2])
def test_top_n_layers_match_the_reference_applied_to_those_layers(depth, batch):
    ids, am, labels = batch
    mask = some_mask(labels)
    model = tiny_model("llama", vocab=VOCAB)
    lm = slm.SelectiveLM(model, sparse_backward=depth)
    ours = grads(lm(input_ids=ids, labels=labels, attention_mask=am, loss_mask=mask).loss, model)
    _, theirs = reference_grads(model, ids, labels, am, mask, depth=depth)
    assert_close_all(ours, theirs)
    _, all_layers = reference_grads(model, ids, labels, am, mask)
    if depth == 1:  # the lower layer runs its exact backward: its key/value paths still carry gradient
        assert any(not torch.allclose(a, b, atol=1e-6) for a, b in zip(ours, all_layers))


def test_excess_loss_selection_trains_the_selected_rows(batch):
    """With selection inside the forward, the rows are those selected: compare with the reference on out.mask."""
    ids, am, labels = batch
    model = tiny_model("qwen2")
    ref_loss = slm.token_losses(tiny_model("qwen2", seed=7), ids, labels, attention_mask=am)
    lm = slm.SelectiveLM(model, sparse_backward=True)
    out = lm(input_ids=ids, labels=labels, attention_mask=am, ref_loss=ref_loss, ratio=0.4)
    _, theirs = reference_grads(model, ids, labels, am, out.mask)
    assert_close_all(grads(out.loss, model), theirs)


def test_lora_adapters_alone_get_the_reference_gradients(batch):
    peft = pytest.importorskip("peft")
    ids, am, labels = batch
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    model = peft.get_peft_model(tiny_model("llama"), config)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    trainable = [p for p in model.parameters() if p.requires_grad]
    mask = some_mask(labels)
    out = slm.SelectiveLM(model, sparse_backward=True)(input_ids=ids, labels=labels, attention_mask=am, loss_mask=mask)
    ours = torch.autograd.grad(out.loss, trainable)
    _, theirs = reference_grads(model, ids, labels, am, mask, params=trainable)
    assert_close_all(ours, theirs)
    recording = [m for m in model.modules() if type(m).__name__.startswith("SparseBackward")]
    frozen = [m for m in recording if not m.weight.requires_grad]
    assert frozen, "the frozen base layers record too: their input gradient covers the kept rows only"


def test_activation_checkpointing_recomputes_with_the_same_rows(batch):
    ids, am, labels = batch
    mask = some_mask(labels)
    plain = tiny_model("llama").train()
    expected = grads(slm.SelectiveLM(plain, sparse_backward=True)(input_ids=ids, labels=labels, attention_mask=am,
                                                                  loss_mask=mask).loss, plain)  # fmt: skip
    model = tiny_model("llama").train()
    lm = slm.SelectiveLM(model, sparse_backward=True)
    lm.activation_checkpointing_enable()
    assert lm.is_activation_checkpointing
    got = grads(lm(input_ids=ids, labels=labels, attention_mask=am, loss_mask=mask).loss, model)
    assert_close_all(got, expected)


def test_autocast_bf16_follows_the_reference_under_autocast(batch):
    ids, am, labels = batch
    mask = some_mask(labels)
    model = tiny_model("phi")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = slm.SelectiveLM(model, sparse_backward=True)(input_ids=ids, labels=labels, attention_mask=am,
                                                           loss_mask=mask)  # fmt: skip
        ours = grads(out.loss, model)
        _, theirs = reference_grads(model, ids, labels, am, mask)
    for a, b in zip(ours, theirs, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=2e-2, rtol=5e-2)


def test_autocast_with_nothing_dropped_is_the_exact_autocast_backward():
    ids = torch.randint(1, VOCAB, (2, 10), generator=torch.Generator().manual_seed(2))
    model = tiny_model("llama")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        exact = grads(slm.SelectiveLM(model)(input_ids=ids, labels=ids, ratio=1.0).loss, model)
        sparse = grads(slm.SelectiveLM(model, sparse_backward=True)(input_ids=ids, labels=ids, ratio=1.0).loss, model)
    for a, b in zip(sparse, exact, strict=True):
        assert torch.equal(a, b)


def test_accumulated_micro_batches_sum_their_own_rows(batch):
    """Two forward/backward pairs into .grad: each backward uses the rows of its own forward."""
    ids, am, labels = batch
    masks = [some_mask(labels, seed=s) for s in (3, 4)]
    model = tiny_model("llama")
    lm = slm.SelectiveLM(model, sparse_backward=True)
    for mask in masks:
        lm(input_ids=ids, labels=labels, attention_mask=am, loss_mask=mask).loss.backward()
    ours = [p.grad.clone() for p in model.parameters()]
    theirs = [sum(g) for g in zip(*(reference_grads(model, ids, labels, am, m)[1] for m in masks))]
    assert_close_all(ours, theirs)


def test_backward_matmuls_cover_the_kept_rows_only():
    """The saving is real work not done: the decoder layers' backward FLOPs shrink with the kept share."""
    ids = torch.randint(1, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    mask = some_mask(ids, share=0.25)
    model = tiny_model("llama")

    def backward_flops(sparse):
        out = slm.SelectiveLM(model, sparse_backward=sparse)(input_ids=ids, labels=ids, loss_mask=mask)
        with FlopCounterMode(display=False) as counter:
            out.loss.backward()
        model.zero_grad()
        return counter.get_total_flops()

    exact, sparse = backward_flops(False), backward_flops(True)
    rows = kept_rows(mask).sum().item() / ids.numel()
    layers = sum(p.numel() for layer in decoder_layers(model) for p in layer.parameters() if p.dim() == 2)
    linear_exact = 2 * 2 * ids.numel() * layers  # weight and input gradient of every decoder linear
    assert exact - sparse == pytest.approx(linear_exact * (1 - rows), rel=1e-6)


def test_refusals_name_the_setting():
    with pytest.raises(ValueError, match="mixtures of experts.*mixtral.*sparse_backward=False"):
        slm.SelectiveLM(tiny_model("mixtral"), sparse_backward=True)
    with pytest.raises(ValueError, match="has 2 decoder layers; give 1..2"):
        slm.SelectiveLM(tiny_model("llama"), sparse_backward=3)
    for bad in (0, -1, 1.5, "all"):
        with pytest.raises(ValueError, match="sparse_backward must be False"):
            slm.SelectiveLM(tiny_model("llama"), sparse_backward=bad)


def test_a_linear_with_its_own_forward_is_refused():
    class Quantised(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x)

    model = tiny_model("llama")
    attn = decoder_layers(model)[-1].self_attn
    attn.q_proj = Quantised(attn.q_proj.in_features, attn.q_proj.out_features, bias=False)
    with pytest.raises(ValueError, match="Quantised is a linear layer with its own forward"):
        slm.SelectiveLM(model, sparse_backward=True)
    with pytest.raises(ValueError, match="Quantised"):
        slm.SelectiveLM(model, sparse_backward=1)  # the top layer holds it
    slm.SelectiveLM(tiny_model("llama"), sparse_backward=1)


def test_no_grad_and_plain_calls_run_the_plain_layers(batch):
    """Outside SelectiveLM's forward (evaluation, generation, a direct HF call) nothing is recorded."""
    ids, am, labels = batch
    model = tiny_model("llama")
    lm = slm.SelectiveLM(model, sparse_backward=True)
    lm(input_ids=ids, labels=labels, attention_mask=am, ratio=0.5).loss.backward()
    fresh = tiny_model("llama")
    theirs = grads(fresh(input_ids=ids, attention_mask=am, labels=labels).loss, fresh)
    assert_close_all(grads(model(input_ids=ids, attention_mask=am, labels=labels).loss, model), theirs)


def test_no_activation_outlives_the_backward(batch):
    """The gather shared by projections is let go when the backward ends (the rows stay for a recompute)."""
    import weakref

    ids, am, labels = batch
    model = tiny_model("llama")
    lm = slm.SelectiveLM(model, sparse_backward=True)
    lm(input_ids=ids, labels=labels, attention_mask=am, ratio=0.5).loss.backward()
    rows = lm._sparse.recorder.recompute
    assert rows is not None and rows._source is None and rows._gathered is None
    gathered = []
    real = type(rows).gather

    def spy(self, x2d):
        out = real(self, x2d)
        gathered.append(weakref.ref(out))
        return out

    type(rows).gather = spy
    try:
        lm(input_ids=ids, labels=labels, attention_mask=am, ratio=0.5).loss.backward()
    finally:
        type(rows).gather = real
    assert gathered and all(ref() is None for ref in gathered)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_head_backend_gives_the_reference_gradients(backend, batch):
    """The mode sits in the decoder: each head backend (torch.compile'd chunks and Triton's kernels too) feeds it."""
    ids, am, labels = batch
    mask = some_mask(labels)
    model = tiny_model("gemma2")
    lm = slm.SelectiveLM(model, head_backend=backend, sparse_backward=True)
    ours = grads(lm(input_ids=ids, labels=labels, attention_mask=am, loss_mask=mask).loss, model)
    assert_close_all(ours, reference_grads(model, ids, labels, am, mask)[1])
