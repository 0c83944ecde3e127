"""SelectiveLM against HF's own loss, logits and gradients on every architecture and head backend."""

import pytest
import torch
from support.archs import VOCAB, tiny_model
from support.hf_reference import ARCH_BACKENDS, BACKENDS, assert_grads_close, grads, hf_token_ce

import slm
from slm.model import shifted_valid


@pytest.mark.parametrize("arch, backend", ARCH_BACKENDS)
def test_ratio_one_equals_hf_loss_and_grads(arch, batch, backend):
    ids, am, labels = batch
    model = tiny_model(arch)
    lm = slm.SelectiveLM(model, head_backend=backend)
    assert lm.exact_head
    ref = model(input_ids=ids, attention_mask=am, labels=labels).loss
    out = lm(input_ids=ids, labels=labels, attention_mask=am, ratio=1.0)
    torch.testing.assert_close(out.loss, ref, atol=1e-6, rtol=1e-5)
    assert out.n_selected == int(shifted_valid(labels).sum())
    assert_grads_close(grads(out.loss, model), grads(ref, model))


@pytest.mark.parametrize("arch, backend", ARCH_BACKENDS)
def test_loss_mask_grads_equal_full_logits_masked_loss(arch, batch, backend):
    ids, am, labels = batch
    model = tiny_model(arch)
    loss_mask = torch.rand(ids.shape, generator=torch.Generator().manual_seed(3)) < 0.35
    out = slm.SelectiveLM(model, head_backend=backend)(
        input_ids=ids, labels=labels, attention_mask=am, loss_mask=loss_mask
    )
    mask = loss_mask & shifted_valid(labels)
    assert torch.equal(out.mask, mask)
    ce = hf_token_ce(model, ids, labels, am)
    ref = ce[mask].sum() / mask.sum()
    torch.testing.assert_close(out.loss, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.token_loss, (ce * mask).detach(), atol=1e-5, rtol=1e-5)
    assert_grads_close(grads(out.loss, model), grads(ref, model))


@pytest.mark.parametrize("arch, backend", ARCH_BACKENDS)
def test_excess_loss_selection_grads_equal_masked_full_logits(arch, batch, backend):
    ids, am, labels = batch
    model = tiny_model(arch)
    reference = tiny_model(arch, seed=7)
    ref_loss = slm.token_losses(reference, ids, labels, attention_mask=am)
    lm = slm.SelectiveLM(model, head_backend=backend)
    out = lm(input_ids=ids, labels=labels, attention_mask=am, ref_loss=ref_loss, ratio=0.4)

    ce = hf_token_ce(model, ids, labels, am)
    valid = shifted_valid(labels)
    expected = slm.select_tokens(slm.excess_loss(ce.detach(), ref_loss), 0.4, valid=valid)
    assert torch.equal(out.mask, expected)
    assert out.n_selected == round(0.4 * int(valid.sum()))
    ref = ce[expected].sum() / expected.sum()
    torch.testing.assert_close(out.loss, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.token_loss, ce.detach(), atol=1e-5, rtol=1e-5)
    assert_grads_close(grads(out.loss, model), grads(ref, model))


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
    from transformers import JetMoeConfig, JetMoeForCausalLM  # not on the exact list

    ids, am, labels = batch
    torch.manual_seed(0)
    cfg = JetMoeConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, kv_channels=8, intermediate_size=64, num_local_experts=2)  # fmt: skip
    model = JetMoeForCausalLM(cfg).eval()
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


def test_a_router_load_balancing_loss_is_refused_not_dropped(batch):
    """A mixture of experts whose config asks for the router's auxiliary loss (HF adds
    router_aux_loss_coef x aux to its loss): SelectiveLM computes cross-entropy only, so it says so
    instead of training without the balancing term; with the auxiliary loss off it is exact."""
    ids, am, labels = batch
    model = tiny_model("mixtral")
    model.config.output_router_logits = True
    with pytest.raises(ValueError, match="output_router_logits=True.*load-balancing"):
        slm.SelectiveLM(model)(input_ids=ids, labels=labels, attention_mask=am, ratio=1.0)
    model.config.output_router_logits = False
    out = slm.SelectiveLM(model)(input_ids=ids, labels=labels, attention_mask=am, ratio=1.0)
    torch.testing.assert_close(out.loss, model(input_ids=ids, attention_mask=am, labels=labels).loss)
    model = tiny_model("glm4_moe")  # its HF loss has no router term whatever the config says: not refused
    model.config.output_router_logits = True
    out = slm.SelectiveLM(model)(input_ids=ids, labels=labels, attention_mask=am, ratio=1.0)
    torch.testing.assert_close(out.loss, model(input_ids=ids, attention_mask=am, labels=labels).loss)


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
    # each argument's type, by name (these surfaced as raw torch errors, or were accepted)
    with pytest.raises(TypeError, match=r"labels must hold integer token ids \(torch.long\), got torch.float32"):
        lm(input_ids=ids, labels=labels.float())
    with pytest.raises(TypeError, match="ref_loss must be a torch.Tensor, got list"):
        lm(input_ids=ids, labels=labels, ref_loss=torch.zeros(ids.shape).tolist())
    with pytest.raises(TypeError, match="loss_mask must be a torch.Tensor, got list"):
        lm(input_ids=ids, labels=labels, loss_mask=torch.ones(ids.shape, dtype=torch.bool).tolist())
    with pytest.raises(ValueError, match="input_ids is empty"):
        lm(input_ids=ids[:0], labels=labels[:0])
    with pytest.raises(ValueError, match=r"attention_mask has shape \(3, 11\)"):
        lm(input_ids=ids, labels=labels, attention_mask=am[:, 1:])
    with pytest.raises(ValueError, match="ratio must be a number in"):
        lm(input_ids=ids, labels=labels, ratio=True)
    with pytest.raises(ValueError, match="valid must be a bool tensor"):
        slm.select_tokens(torch.rand(2, 5), 0.5, valid=0.5)
    with pytest.raises(ValueError, match="valid must be boolean"):
        slm.select_tokens(torch.rand(2, 5), 0.5, valid=torch.full((2, 5), 0.5))


@pytest.mark.parametrize("bad", [VOCAB, VOCAB + 50, -3])
def test_an_input_id_outside_the_vocabulary_is_named_not_a_raw_index_error(batch, bad):
    ids, am, labels = batch
    ids = ids.clone()
    ids[1, 4] = bad
    lm = slm.SelectiveLM(tiny_model("llama"))
    lo, hi = int(ids.min()), int(ids.max())
    said = rf"input_ids must be token ids in \[0, {VOCAB}\), got values in \[{lo}, {hi}\]"
    with pytest.raises(ValueError, match=said):
        lm(input_ids=ids, labels=labels)
    with pytest.raises(ValueError, match="input_ids must be token ids"):  # a loss_mask plan: the same check
        lm(input_ids=ids, labels=labels, loss_mask=labels >= 0)


def test_save_pretrained_round_trip(tmp_path, batch):
    from transformers import AutoModelForCausalLM

    ids, am, labels = batch
    lm = slm.SelectiveLM(tiny_model("gpt2"))
    lm.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, lm.model(input_ids=ids).logits)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_bf16_grads_close_to_hf_under_autocast(batch, backend):
    """Mixed precision: the backward recomputes logits in the autocast dtype, like the forward."""
    ids, am, labels = batch
    model = tiny_model("phi")
    loss_mask = shifted_valid(labels) & (torch.arange(12) % 3 != 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = slm.SelectiveLM(model, head_backend=backend)(
            input_ids=ids, labels=labels, attention_mask=am, loss_mask=loss_mask
        )
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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("denominator", [0, torch.tensor(0)])
def test_a_step_that_trains_nothing_has_zero_loss_and_zero_grads(denominator, backend):
    """A sparse loss_mask can leave a whole optimizer step without a trained token: never NaN."""
    model = tiny_model("llama")
    ids = torch.randint(1, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    none = torch.zeros_like(ids, dtype=torch.bool)
    out = slm.SelectiveLM(model, head_backend=backend)(input_ids=ids, labels=ids, loss_mask=none,
                                                       num_items_in_batch=denominator)  # fmt: skip
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert all(p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_weight_is_the_weighted_mean_of_hf_losses(batch, backend):
    ids, am, labels = batch
    model = tiny_model("phi")
    g = torch.Generator().manual_seed(4)
    weight = torch.tensor([0.0, 0.5, 2.0, 1.0])[torch.randint(0, 4, ids.shape, generator=g)]
    out = slm.SelectiveLM(model, head_backend=backend)(input_ids=ids, labels=labels, attention_mask=am,
                                                       loss_weight=weight)  # fmt: skip
    w = weight * shifted_valid(labels)
    ce = hf_token_ce(model, ids, labels, am)
    ref = (ce * w).sum() / w.sum()
    torch.testing.assert_close(out.loss, ref, atol=1e-6, rtol=1e-5)
    assert torch.equal(out.mask, w > 0)
    assert_grads_close(grads(out.loss, model), grads(ref, model))


@pytest.mark.parametrize("value", [0.5, 2.0, -1.0])
def test_a_non_boolean_loss_mask_is_refused(batch, value):
    ids, am, labels = batch
    mask = torch.ones(ids.shape)
    mask[0, 3] = value
    lm = slm.SelectiveLM(tiny_model("llama"))
    with pytest.raises(ValueError, match="loss_mask must be boolean.*loss_weight"):
        lm(input_ids=ids, labels=labels, loss_mask=mask)
    lm(input_ids=ids, labels=labels, loss_mask=torch.ones(ids.shape))  # 0/1 floats are a boolean mask
    with pytest.raises(ValueError, match="loss_weight must be finite and >= 0"):
        lm(input_ids=ids, labels=labels, loss_weight=torch.full(ids.shape, -1.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_is_a_clear_error_not_a_wrong_gradient(batch, backend):
    ids, am, labels = batch
    model = tiny_model("llama")
    out = slm.SelectiveLM(model, head_backend=backend)(input_ids=ids, labels=labels, attention_mask=am, ratio=0.5)
    params = [p for p in model.parameters()]
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.grad(out.loss, params, create_graph=True, allow_unused=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_changing_the_head_weight_in_place_before_backward_raises(batch, backend):
    ids, am, labels = batch
    model = tiny_model("llama")
    out = slm.SelectiveLM(model, head_backend=backend)(input_ids=ids, labels=labels, attention_mask=am, ratio=1.0)
    with torch.no_grad():
        model.lm_head.weight.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.loss.backward()


def test_backward_twice_through_one_graph_is_a_clear_error(batch):
    ids, am, labels = batch
    out = slm.SelectiveLM(tiny_model("llama"))(input_ids=ids, labels=labels, attention_mask=am, ratio=1.0)
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backpropagated twice"):
        out.loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_frozen_head_does_no_weight_gradient_work(batch, backend):
    """LoRA and frozen embeddings: the head's weight gradient (2 x K x V x H FLOPs) is not computed."""
    from support.probes import MatmulFlops

    ids, am, labels = batch

    def step_flops(freeze: bool) -> tuple[int, int, list]:
        model = tiny_model("llama")
        model.lm_head.weight.requires_grad_(not freeze)
        with MatmulFlops() as counter:
            out = slm.SelectiveLM(model, head_backend=backend)(input_ids=ids, labels=labels, attention_mask=am,
                                                               loss_mask=labels > 50)  # fmt: skip
            out.loss.backward()
        rest = [p.grad for n, p in model.named_parameters() if n != "lm_head.weight"]
        return counter.flops, out.n_selected, rest

    trainable, k, grads_a = step_flops(False)
    frozen, _, grads_b = step_flops(True)
    H, V = 32, VOCAB
    assert trainable - frozen == 2 * k * V * H
    assert_grads_close(grads_a, grads_b)


@pytest.mark.parametrize(
    "case",
    ["loss_mask", "loss_weight", "ratio_1", "excess_batch", "excess_sequence", "random_sequence", "eval_hits"],
)
def test_a_forward_waits_for_the_device_once_and_the_backward_never(batch, case):
    from support.probes import HostSyncs

    ids, am, labels = batch
    model = tiny_model("phi")
    scope = "sequence" if case.endswith("sequence") else "batch"
    selector = "random" if case.startswith("random") else "excess_loss"
    lm = slm.SelectiveLM(model, scope=scope, selector=selector, check_scores="deferred")
    ref = torch.rand(ids.shape, generator=torch.Generator().manual_seed(0))
    kwargs = {
        "loss_mask": dict(loss_mask=labels > 30),
        "loss_weight": dict(loss_weight=torch.rand(ids.shape)),
        "ratio_1": dict(ratio=1.0),
        "eval_hits": dict(ratio=1.0, return_hits=True),
    }.get(case, dict(ref_loss=ref, ratio=0.4))
    with HostSyncs() as decoder:  # what HF's decoder waits for on its own (its attention-mask checks)
        model.base_model(input_ids=ids, attention_mask=am, use_cache=False)
    with HostSyncs() as forward:
        out = lm(input_ids=ids, labels=labels, attention_mask=am, **kwargs)
    assert sorted(forward.ops) == sorted(decoder.ops + ["copy to cpu"]), (forward.ops, decoder.ops)
    with HostSyncs() as backward:
        out.loss.backward()
    assert backward.ops == [], backward.ops
    if case.startswith("excess"):  # the same selection as the eagerly checked path
        eager = slm.SelectiveLM(model, scope=scope)(input_ids=ids, labels=labels, attention_mask=am, **kwargs)
        assert torch.equal(out.mask, eager.mask) and int(out.n_nonfinite) == 0


def test_a_threshold_over_the_run_waits_once_more_per_forward_for_its_count(batch):
    """scope=dataset: the count it keeps depends on the scores, so the forward reads it once (with every
    other number the selection needs) after the plan's one read; the positions and the bound need no wait
    of their own (issue 25 item 5: before, 6 more). The masks equal the threshold's own, counted eagerly."""
    from support.probes import HostSyncs

    from slm.selection import RunningThreshold

    ids, am, labels = batch
    model = tiny_model("llama")
    lm = slm.SelectiveLM(model, scope="dataset", check_scores="deferred")
    plain = RunningThreshold()
    with HostSyncs() as decoder:
        model.base_model(input_ids=ids, attention_mask=am, use_cache=False)
    g = torch.Generator().manual_seed(0)
    for step in range(4):  # the first steps keep to the bound's edge, later ones use the threshold
        ref = torch.rand(ids.shape, generator=g) * 3
        with HostSyncs() as forward:
            out = lm(input_ids=ids, labels=labels, attention_mask=am, ref_loss=ref, ratio=0.4)
        assert sorted(forward.ops) == sorted(decoder.ops + ["copy to cpu"] * 2), (step, forward.ops)
        with HostSyncs() as backward:
            out.loss.backward()
        assert backward.ops == []
        expected = plain.select(slm.excess_loss(out.token_loss.detach(), ref), shifted_valid(labels), 0.4)
        assert torch.equal(out.mask, expected) and out.n_selected == int(expected.sum())
        assert plain.kept == lm.threshold.kept and plain.seen == lm.threshold.seen


@pytest.mark.parametrize("how", ["union", "intersection"])
def test_combined_selectors_train_exactly_the_combined_set(batch, how):
    ids, am, labels = batch
    model = tiny_model("qwen2")
    g = torch.Generator().manual_seed(5)
    ref_loss, ref_entropy = torch.rand(ids.shape, generator=g) * 4, torch.rand(ids.shape, generator=g) * 3
    lm = slm.SelectiveLM(model, selector=how, combine=("excess_loss", "reference_entropy"))
    out = lm(input_ids=ids, labels=labels, attention_mask=am, ref_loss=ref_loss, ref_entropy=ref_entropy, ratio=0.3)
    ce = hf_token_ce(model, ids, labels, am)
    valid = shifted_valid(labels)
    expected = slm.select_combined(how, slm.excess_loss(ce.detach(), ref_loss), -ref_entropy, 0.3, valid)
    assert torch.equal(out.mask, expected) and out.n_selected == int(expected.sum())
    ref = ce[expected].sum() / expected.sum()
    torch.testing.assert_close(out.loss, ref, atol=1e-6, rtol=1e-5)
    assert_grads_close(grads(out.loss, model), grads(ref, model))
    with pytest.raises(ValueError, match="combine=\\(a, b\\)"):
        slm.SelectiveLM(model, selector="union")


@pytest.mark.parametrize("arch", ["llama", "phi"])
def test_kept_logprobs_give_a_nonlinear_loss_the_gradients_of_full_logits(batch, arch):
    """Any function of per-token log-probs (here a clipped-ratio-like one) over the kept tokens: the same value
    and parameter gradients as HF's full logits, with the kept tokens' rule seeing the loss pass's numbers."""
    ids, am, labels = batch
    model = tiny_model(arch)
    lm = slm.SelectiveLM(model)
    w = torch.randn(ids.shape, generator=torch.Generator().manual_seed(2))

    def loss_of(logp, kept):
        ratio = torch.exp(logp - logp.detach())
        return -(torch.minimum(ratio * w, ratio.clamp(0.8, 1.2) * w) * kept).sum() + (logp.exp() * kept).sum()

    def keep(logp, entropy, valid):  # the top 30% by entropy, as GRPO's high-entropy mask
        return slm.select_tokens(entropy, 0.3, valid, "batch")

    logp, entropy, kept = lm.kept_logprobs(ids, labels, keep, attention_mask=am)
    ours = loss_of(logp, kept)
    full = -hf_token_ce(model, ids, labels, am)  # [B, T] log-probs from full logits, 0 where invalid
    assert kept.sum() == slm.select_tokens(entropy, 0.3, shifted_valid(labels), "batch").sum() > 0
    torch.testing.assert_close(logp.detach(), full.detach() * shifted_valid(labels), atol=1e-5, rtol=1e-5)
    plain = loss_of(full, kept)
    torch.testing.assert_close(ours, plain, atol=1e-5, rtol=1e-5)
    assert_grads_close(grads(ours, model), grads(plain, model))
