"""SelectiveLM looks like the model it wraps: PEFT, keyword arguments, what engines read from it."""

import pytest
import torch
from support.archs import VOCAB, tiny_model
from support.hf_reference import assert_grads_close, grads, hf_token_ce

import slm
from slm.model import shifted_valid


def lora(model):
    peft = pytest.importorskip("peft")
    return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))


def test_peft_lora_model_exact_loss_and_grads_and_no_head_gradient(batch):
    ids, am, labels = batch
    model = lora(tiny_model("llama"))
    with torch.no_grad():  # LoRA's B starts at zero; make the adapters matter
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    lm = slm.SelectiveLM(model)
    assert lm.exact_head
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    loss_mask = shifted_valid(labels) & (torch.arange(12) % 2 == 0)
    out = lm(input_ids=ids, labels=labels, attention_mask=am, loss_mask=loss_mask)
    ce = hf_token_ce(model, ids, labels, am)  # PEFT's own forward
    ref = ce[loss_mask].mean()
    torch.testing.assert_close(out.loss, ref, atol=1e-6, rtol=1e-5)
    ga = torch.autograd.grad(out.loss, trainable)
    gb = torch.autograd.grad(ref, trainable)
    assert_grads_close(ga, gb)
    out = lm(input_ids=ids, labels=labels, attention_mask=am, loss_mask=loss_mask)
    out.loss.backward()
    assert model.get_base_model().lm_head.weight.grad is None


def test_peft_prompt_learning_is_refused():
    peft = pytest.importorskip("peft")
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)
    model = peft.get_peft_model(tiny_model("llama"), config)
    with pytest.raises(ValueError, match="prompt learning"):
        slm.SelectiveLM(model)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"label_smoothing": 0.1}, "label smoothing is not implemented"),
        ({"ignore_index": -1}, "only -100"),
        ({"shift_labels": None}, r"labels = torch.nn.functional.pad\(shift_labels"),
        ({"colour": "blue"}, r"unexpected keyword argument\(s\) \['colour'\]"),
    ],
)
def test_unknown_or_unsupported_keyword_arguments_raise(batch, kwargs, match):
    ids, am, labels = batch
    with pytest.raises(TypeError, match=match):
        slm.SelectiveLM(tiny_model("llama"))(input_ids=ids, labels=labels, **kwargs)


def test_position_ids_of_packed_sequences_reach_the_decoder():
    """Two documents packed in one row with restarting positions: the loss is HF's with those positions."""
    model = tiny_model("llama")
    ids = torch.randint(1, VOCAB, (1, 12), generator=torch.Generator().manual_seed(0))
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]])
    # HF detects packed documents from restarting positions (when it runs without a cache, as in training)
    ref = model(input_ids=ids, labels=ids, position_ids=pos, use_cache=False).loss
    out = slm.SelectiveLM(model)(input_ids=ids, labels=ids, position_ids=pos, ratio=1.0)
    torch.testing.assert_close(out.loss, ref, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(out.loss, model(input_ids=ids, labels=ids).loss)


def test_wrapper_forwards_what_fsdp_accelerate_and_trainer_read():
    model = tiny_model("qwen2")  # tied embeddings
    lm = slm.SelectiveLM(model)
    assert lm._no_split_modules == model._no_split_modules
    assert lm.get_input_embeddings() is model.get_input_embeddings()
    assert lm.get_output_embeddings() is model.get_output_embeddings()
    lm.model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # untie, as meta loading does
    lm.tie_weights()
    assert model.lm_head.weight is model.get_input_embeddings().weight
    lm.activation_checkpointing_enable()
    assert lm.is_activation_checkpointing and model.is_activation_checkpointing
    lm.activation_checkpointing_disable()
    assert not model.is_activation_checkpointing
    assert lm.num_parameters() == model.num_parameters()


def test_a_head_wrapped_after_construction_is_reported_and_stays_correct(batch):
    ids, am, labels = batch
    model = tiny_model("llama")
    lm = slm.SelectiveLM(model)
    assert lm.exact_head

    class Hooked(torch.nn.Linear):  # e.g. a quantised or instrumented output layer
        def forward(self, x):
            return super().forward(x)

    hooked = Hooked(32, VOCAB, bias=False)
    hooked.weight = model.lm_head.weight
    model.lm_head = hooked
    assert not lm.exact_head
    with pytest.warns(UserWarning, match="Hooked, not a plain nn.Linear"):
        out = lm(input_ids=ids, labels=labels, attention_mask=am, ratio=1.0)
    ref = model(input_ids=ids, attention_mask=am, labels=labels).loss
    torch.testing.assert_close(out.loss, ref, atol=1e-6, rtol=1e-5)
    assert_grads_close(grads(out.loss, model), grads(ref, model))
