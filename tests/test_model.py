"""SelectiveLM and token_losses against HF's own loss, logits and gradients."""

import pytest
import torch
import torch.nn.functional as F
from conftest import ARCHS, VOCAB, tiny_model

import slm
from slm.model import shifted_valid


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


def assert_grads_close(ga, gb):
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_ratio_one_equals_hf_loss_and_grads(arch, batch):
    ids, am, labels = batch
    model = tiny_model(arch)
    lm = slm.SelectiveLM(model)
    assert lm.exact_head
    ref = model(input_ids=ids, attention_mask=am, labels=labels).loss
    out = lm(input_ids=ids, labels=labels, attention_mask=am, ratio=1.0)
    torch.testing.assert_close(out.loss, ref, atol=1e-6, rtol=1e-5)
    assert out.n_selected == int(shifted_valid(labels).sum())
    assert_grads_close(grads(out.loss, model), grads(ref, model))


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_mask_grads_equal_full_logits_masked_loss(arch, batch):
    ids, am, labels = batch
    model = tiny_model(arch)
    loss_mask = torch.rand(ids.shape, generator=torch.Generator().manual_seed(3)) < 0.35
    out = slm.SelectiveLM(model)(input_ids=ids, labels=labels, attention_mask=am, loss_mask=loss_mask)
    mask = loss_mask & shifted_valid(labels)
    assert torch.equal(out.mask, mask)
    ce = hf_token_ce(model, ids, labels, am)
    ref = ce[mask].sum() / mask.sum()
    torch.testing.assert_close(out.loss, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.token_loss, (ce * mask).detach(), atol=1e-5, rtol=1e-5)
    assert_grads_close(grads(out.loss, model), grads(ref, model))


@pytest.mark.parametrize("arch", ARCHS)
def test_excess_loss_selection_grads_equal_masked_full_logits(arch, batch):
    ids, am, labels = batch
    model = tiny_model(arch)
    reference = tiny_model(arch, seed=7)
    ref_loss = slm.token_losses(reference, ids, labels, attention_mask=am)
    out = slm.SelectiveLM(model)(input_ids=ids, labels=labels, attention_mask=am, ref_loss=ref_loss, ratio=0.4)

    ce = hf_token_ce(model, ids, labels, am)
    valid = shifted_valid(labels)
    expected = slm.select_tokens(slm.excess_loss(ce.detach(), ref_loss), 0.4, valid=valid)
    assert torch.equal(out.mask, expected)
    assert out.n_selected == round(0.4 * int(valid.sum()))
    ref = ce[expected].sum() / expected.sum()
    torch.testing.assert_close(out.loss, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.token_loss, ce.detach(), atol=1e-5, rtol=1e-5)
    assert_grads_close(grads(out.loss, model), grads(ref, model))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi", "gemma2"])
def test_token_losses_equal_hf_per_token_ce(arch, batch):
    ids, am, labels = batch
    model = tiny_model(arch)
    tl = slm.token_losses(model, ids, labels, attention_mask=am, chunk_elements=3 * VOCAB)  # many chunks
    with torch.no_grad():
        torch.testing.assert_close(tl, hf_token_ce(model, ids, labels, am), atol=1e-5, rtol=1e-5)


def test_left_padding(batch):
    model = tiny_model("qwen2")
    ids, _, _ = batch
    am = torch.ones_like(ids)
    am[0, :5] = 0
    labels = ids.masked_fill(am == 0, -100)
    ref = model(input_ids=ids, attention_mask=am, labels=labels).loss
    out = slm.SelectiveLM(model)(input_ids=ids, labels=labels, attention_mask=am, ratio=1.0)
    torch.testing.assert_close(out.loss, ref, atol=1e-6, rtol=1e-5)
    assert not out.mask[0, :5].any() and out.mask[0, 5:].all()


@pytest.mark.parametrize("shape", [(1, 12), (3, 2), (1, 2)])
def test_batch_of_one_and_length_two(shape):
    model = tiny_model("llama")
    ids = torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(0))
    ref = model(input_ids=ids, labels=ids).loss
    lm = slm.SelectiveLM(model)
    out = lm(input_ids=ids, labels=ids, ratio=1.0)
    torch.testing.assert_close(out.loss, ref, atol=1e-6, rtol=1e-5)
    assert_grads_close(grads(out.loss, model), grads(ref, model))
    out = lm(input_ids=ids, labels=ids, ratio=0.5)
    assert out.n_selected == max(1, round(0.5 * shape[0] * (shape[1] - 1) + 1e-9))


def test_no_valid_tokens_still_backprops_zero_grads():
    model = tiny_model("llama")
    ids = torch.randint(0, VOCAB, (2, 6))
    labels = torch.full_like(ids, -100)
    out = slm.SelectiveLM(model)(input_ids=ids, labels=labels)
    assert out.n_selected == 0 and out.loss.item() == 0.0
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in model.parameters())


def test_external_normaliser_and_chunking(batch):
    ids, am, labels = batch
    model = tiny_model("phi")
    out_small = slm.SelectiveLM(model, chunk_elements=2 * VOCAB)(
        input_ids=ids, labels=labels, attention_mask=am, ratio=0.5, num_items_in_batch=torch.tensor(40)
    )
    out = slm.SelectiveLM(model)(input_ids=ids, labels=labels, attention_mask=am, ratio=0.5)
    torch.testing.assert_close(out_small.loss * 40, out.loss * out.n_selected, atol=1e-5, rtol=1e-5)
    assert_grads_close(grads(out_small.loss * 40, model), grads(out.loss * out.n_selected, model))


def test_unknown_architecture_falls_back_to_full_forward_with_warning(batch):
    from transformers import BloomConfig, BloomForCausalLM

    ids, am, labels = batch
    torch.manual_seed(0)
    model = BloomForCausalLM(BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4)).eval()
    with pytest.warns(UserWarning, match="falling back"):
        lm = slm.SelectiveLM(model)
    assert not lm.exact_head
    ref = model(input_ids=ids, attention_mask=am, labels=labels).loss
    out = lm(input_ids=ids, labels=labels, attention_mask=am, ratio=1.0)
    torch.testing.assert_close(out.loss, ref, atol=1e-6, rtol=1e-5)
    loss_mask = shifted_valid(labels) & (torch.arange(12) % 2 == 0)
    out = lm(input_ids=ids, labels=labels, attention_mask=am, loss_mask=loss_mask)
    ce = hf_token_ce(model, ids, labels, am)
    torch.testing.assert_close(out.loss, ce[loss_mask].mean(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(slm.token_losses(model, ids, labels, am), ce.detach(), atol=1e-5, rtol=1e-5)


def test_random_selector_is_seeded(batch):
    ids, am, labels = batch
    model = tiny_model("llama")
    m1 = slm.SelectiveLM(model, selector="random", seed=5)(input_ids=ids, labels=labels, ratio=0.5).mask
    m2 = slm.SelectiveLM(model, selector="random", seed=5)(input_ids=ids, labels=labels, ratio=0.5).mask
    m3 = slm.SelectiveLM(model, selector="random", seed=6)(input_ids=ids, labels=labels, ratio=0.5).mask
    assert torch.equal(m1, m2) and not torch.equal(m1, m3)


def test_reference_loss_selector_keeps_easiest_reference_tokens(batch):
    ids, am, labels = batch
    model = tiny_model("llama")
    ref_loss = torch.rand(ids.shape, generator=torch.Generator().manual_seed(2))
    out = slm.SelectiveLM(model, selector="reference_loss")(input_ids=ids, labels=labels, ref_loss=ref_loss, ratio=0.3)
    valid = shifted_valid(labels)
    assert torch.equal(out.mask, slm.select_tokens(-ref_loss, 0.3, valid=valid))
    with pytest.raises(ValueError, match="needs ref_loss"):
        slm.SelectiveLM(model, selector="reference_loss")(input_ids=ids, labels=labels, ratio=0.3)


def test_bad_inputs_raise_clear_errors(batch):
    ids, am, labels = batch
    model = tiny_model("llama")
    lm = slm.SelectiveLM(model)
    with pytest.raises(ValueError, match="ratio"):
        lm(input_ids=ids, labels=labels, ratio=1.5)
    with pytest.raises(ValueError, match="ratio"):
        slm.SelectiveLM(model, ratio=0.0)
    with pytest.raises(ValueError, match="ref_loss has shape"):
        lm(input_ids=ids, labels=labels, ref_loss=torch.zeros(3, 5))
    with pytest.raises(ValueError, match="loss_mask has shape"):
        lm(input_ids=ids, labels=labels, loss_mask=torch.ones(2, 12, dtype=torch.bool))
    with pytest.raises(ValueError, match="labels"):
        lm(input_ids=ids, labels=labels[:, :5])
    with pytest.raises(ValueError, match=r"token ids in \[0, 101\)"):
        lm(input_ids=ids, labels=labels + 200)
    with pytest.raises(ValueError, match="NaN or inf"):
        lm(input_ids=ids, labels=labels, ref_loss=torch.full(ids.shape, float("nan")))
    with pytest.raises(ValueError, match="selector"):
        slm.SelectiveLM(model, selector="best")


def test_save_pretrained_round_trip(tmp_path, batch):
    from transformers import AutoModelForCausalLM

    ids, am, labels = batch
    lm = slm.SelectiveLM(tiny_model("gpt2"))
    lm.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, lm.model(input_ids=ids).logits)


def test_autocast_bf16_grads_close_to_hf_under_autocast(batch):
    """Mixed precision: the backward recomputes logits in the autocast dtype, like the forward."""
    ids, am, labels = batch
    model = tiny_model("phi")
    loss_mask = shifted_valid(labels) & (torch.arange(12) % 3 != 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = slm.SelectiveLM(model)(input_ids=ids, labels=labels, attention_mask=am, loss_mask=loss_mask)
        ours = grads(out.loss, model)
        ce = hf_token_ce(model, ids, labels, am)
        ref = ce[loss_mask].sum() / loss_mask.sum()
        theirs = grads(ref, model)
    torch.testing.assert_close(out.loss, ref, atol=2e-2, rtol=2e-2)
    for a, b in zip(ours, theirs):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=2e-2, rtol=5e-2)


def test_gradient_checkpointing_keeps_hf_loss_and_grads(batch):
    ids, am, labels = batch
    model = tiny_model("llama").train()
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    ref = model(input_ids=ids, attention_mask=am, labels=labels).loss
    out = slm.SelectiveLM(model)(input_ids=ids, labels=labels, attention_mask=am, ratio=1.0)
    torch.testing.assert_close(out.loss, ref, atol=1e-6, rtol=1e-5)
    assert_grads_close(grads(out.loss, model), grads(ref, model))
