"""SelectiveTrainer against a plain Trainer subclass that computes the full-logits masked loss."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from support.archs import tiny_model
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

import slm
from slm import SelectiveTrainer
from slm.data import builtin_tokenizer
from slm.model.sparse_backward import decoder_layers, mask_output_gradients
from slm.trainers import SelectiveDataCollator


class MaskedLossTrainer(Trainer):
    """What users write today: full logits, per-token CE, zero where loss_mask is False."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, :-1]
        labels, mask = inputs["labels"][:, 1:], inputs["loss_mask"][:, 1:].bool()
        mask = mask & (labels != -100)
        ce = F.cross_entropy(logits.float().transpose(1, 2), labels.clamp(min=0), reduction="none")
        total = (ce * mask).sum()
        return total / num_items_in_batch if num_items_in_batch is not None else total / mask.sum()

    def _get_num_items_in_batch(self, batch_samples, device):
        return sum(((b["loss_mask"][:, 1:].bool()) & (b["labels"][:, 1:] != -100)).sum() for b in batch_samples)


def dataset(n=16, seed=0, with_mask=True):
    g = torch.Generator().manual_seed(seed)
    tok = builtin_tokenizer()
    rows = []
    for _ in range(n):
        length = int(torch.randint(6, 14, (1,), generator=g))
        ids = torch.randint(3, len(tok), (length,), generator=g).tolist()
        row = {"input_ids": ids}
        if with_mask:
            row["loss_mask"] = (torch.rand(length, generator=g) < 0.4).tolist()
        rows.append(row)
    return Dataset.from_list(rows), tok


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2,
                report_to=[], use_cpu=True, logging_steps=1, save_strategy="no", seed=0, data_seed=0,
                lr_scheduler_type="constant", dataloader_drop_last=True)  # fmt: skip
    return TrainingArguments(**{**base, **kw})


def collator(tok):
    return SelectiveDataCollator(DataCollatorForLanguageModeling(tok, mlm=False))


@pytest.mark.parametrize("accum", [1, 2])
def test_same_updates_as_full_logits_masked_trainer(tmp_path, accum):
    ds, tok = dataset()
    plain = tiny_model("llama", vocab=len(tok))
    ours = tiny_model("llama", vocab=len(tok))
    # SGD: the update is lr x gradient, so a wrong normaliser shows at full size (Adam would hide a
    # constant factor and amplify float noise in near-zero gradients).
    sgd = dict(optim="sgd", learning_rate=0.5, max_grad_norm=0.0)  # no clipping: it would hide a scale error
    MaskedLossTrainer(plain, args(tmp_path / "p", per_device_train_batch_size=4, remove_unused_columns=False, **sgd),
                      train_dataset=ds, data_collator=collator(tok)).train()  # fmt: skip
    SelectiveTrainer(ours, args(tmp_path / "o", per_device_train_batch_size=4 // accum,
                                gradient_accumulation_steps=accum, **sgd),
                     train_dataset=ds, data_collator=collator(tok)).train()  # fmt: skip
    for (n, a), b in zip(plain.named_parameters(), ours.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


class MaskedSparseTrainer(MaskedLossTrainer):
    """The plain reference of sparse_backward: the masked loss, every decoder linear layer's output gradient
    zeroed by hand at the rows that predict no trained token."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        trained = inputs["loss_mask"].bool() & slm.model.shifted_valid(inputs["labels"])
        rows = torch.zeros_like(trained)
        rows[:, :-1] = trained[:, 1:]
        with mask_output_gradients(decoder_layers(model), rows.reshape(-1)):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


@pytest.mark.parametrize("accum", [1, 2])
def test_sparse_backward_updates_equal_the_masked_reference(tmp_path, accum):
    ds, tok = dataset()
    plain = tiny_model("llama", vocab=len(tok))
    ours = tiny_model("llama", vocab=len(tok))
    sgd = dict(optim="sgd", learning_rate=0.5, max_grad_norm=0.0)
    MaskedSparseTrainer(plain, args(tmp_path / "p", remove_unused_columns=False, **sgd), train_dataset=ds,
                        data_collator=collator(tok)).train()  # fmt: skip
    trainer = SelectiveTrainer(ours, args(tmp_path / "o", per_device_train_batch_size=4 // accum,
                                          gradient_accumulation_steps=accum, **sgd),
                               train_dataset=ds, data_collator=collator(tok), sparse_backward=True)  # fmt: skip
    trainer.train()
    for (n, a), b in zip(plain.named_parameters(), ours.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m, n=n: f"{n}: {m}")
    exact = tiny_model("llama", vocab=len(tok))
    SelectiveTrainer(exact, args(tmp_path / "e", **sgd), train_dataset=ds, data_collator=collator(tok)).train()
    assert any(not torch.allclose(a, b, atol=1e-5) for a, b in zip(exact.parameters(), ours.parameters()))
    with pytest.raises(ValueError, match="sparse_backward=False but the model has True"):
        SelectiveTrainer(trainer.model, args(tmp_path / "x"), train_dataset=ds, sparse_backward=False)


def test_ten_steps_with_eval_save_and_reload(tmp_path):
    from transformers import AutoModelForCausalLM

    ds, tok = dataset(n=48)
    ev, _ = dataset(n=8, seed=1)
    trainer = SelectiveTrainer(
        tiny_model("gpt2", vocab=len(tok)),
        args(tmp_path, max_steps=10, eval_strategy="steps", eval_steps=5),
        train_dataset=ds,
        eval_dataset=ev,
        data_collator=collator(tok),
        processing_class=tok,
    )
    trainer.train()
    logs = trainer.state.log_history
    train_logs = [e for e in logs if "loss" in e]
    assert len(train_logs) == 10 and all(0 < e["selected_frac"] < 0.7 for e in train_logs)
    assert [e["step"] for e in logs if "eval_loss" in e] == [5, 10]
    trainer.save_model(str(tmp_path / "saved"))
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    inner = trainer.model.model
    for a, b in zip(inner.state_dict().values(), again.state_dict().values()):
        torch.testing.assert_close(a, b)
    # Eval loss = mean CE over the eval set's loss_mask tokens (one batch of 8), from HF's own logits.
    trainer.args.per_device_eval_batch_size = 8
    metrics = trainer.evaluate()
    batch = collator(tok)([dict(r) for r in ev])
    with torch.no_grad():
        logits = again(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels, mask = batch["labels"][:, 1:], batch["loss_mask"][:, 1:] & (batch["labels"][:, 1:] != -100)
    ce = F.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
    assert metrics["eval_loss"] == pytest.approx(ce[mask].mean().item(), rel=1e-5)


def test_selection_by_ratio_and_flops(tmp_path):
    ds, tok = dataset(with_mask=False)
    model = tiny_model("llama", vocab=len(tok))
    trainer = SelectiveTrainer(model, args(tmp_path, max_steps=2), train_dataset=ds, data_collator=collator(tok),
                               selection_ratio=0.3)  # fmt: skip
    trainer.train()
    assert all(e["selected_frac"] < 0.35 for e in trainer.state.log_history if "loss" in e)
    batch = collator(tok)([dict(r) for r in ds.select(range(4))])
    ours = trainer.floating_point_ops(batch)
    hf = 6 * batch["input_ids"].numel() * model.num_parameters(exclude_embeddings=True)  # what Trainer counts
    assert ours < hf
    # the estimate is the matrix products a step really runs (forward and backward, eager attention)
    from support.probes import MatmulFlops

    model.zero_grad(set_to_none=True)
    with MatmulFlops() as counter:
        trainer.compute_loss(trainer.model, {**batch}).backward()
    assert ours == pytest.approx(counter.flops, rel=0.02)


def test_no_loss_mask_and_no_ratio_is_a_clear_error(tmp_path):
    ds, tok = dataset(with_mask=False)
    trainer = SelectiveTrainer(tiny_model("llama", vocab=len(tok)), args(tmp_path), train_dataset=ds,
                               data_collator=collator(tok))  # fmt: skip
    assert trainer.args.ddp_find_unused_parameters is False  # every parameter gets a gradient each step
    with pytest.raises(ValueError, match="no loss_mask column and selection_ratio is not set"):
        trainer.train()


def test_readme_example_script_runs(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    script = Path(__file__).resolve().parent.parent / "scripts" / "trainer_example.py"
    subprocess.run([sys.executable, str(script), str(tmp_path / "out")], check=True, capture_output=True)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.model_type == "llama"


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
    """torchrun x2 with per-device batch 2 == one process with batch 4 (num_items_in_batch across devices)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = str(Path(__file__).resolve().parent / "support" / "launch" / "trainer_ddp_run.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for cmd in ([sys.executable, script, str(tmp_path / "one"), "4"],
                [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", script, str(tmp_path / "two"),
                 "2"]):  # fmt: skip
        run = subprocess.run(cmd, env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-3000:]
    one, two = (torch.load(tmp_path / d / "weights.pt") for d in ("one", "two"))
    start = tiny_model("llama", vocab=len(builtin_tokenizer())).state_dict()
    assert any((one[k] - start[k]).abs().max() > 1e-3 for k in one)  # the runs did move the weights
    for k in one:
        torch.testing.assert_close(one[k], two[k], atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_a_nan_score_on_one_process_stops_every_process(tmp_path):
    """A non-finite selection score on one rank raises on both (no rank waits in a collective)."""
    import os
    import subprocess
    import sys

    script = str(Path(__file__).resolve().parent / "support" / "launch" / "trainer_ddp_run.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", script,
                          str(tmp_path / "nan"), "2", "nan"], env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert run.returncode != 0
    for rank in (0, 1):
        assert f"rank {rank} raised: SelectiveTrainer: " in run.stdout, run.stdout + run.stderr[-3000:]
    assert "NaN or inf selection scores" in run.stdout


def test_the_collator_reads_the_padding_side_when_called():
    tok = builtin_tokenizer()
    collate = collator(tok)
    tok.padding_side = "left"  # changed after the collator was built
    batch = collate([{"input_ids": [5, 6, 7], "loss_mask": [True, False, True]},
                     {"input_ids": [8], "loss_mask": [True]}])  # fmt: skip
    assert batch["loss_mask"][1].tolist() == [False, False, True]
    assert (batch["labels"][1] != -100).tolist() == [False, False, True]  # the mask sits on the real token


def test_a_flattening_collator_gets_its_columns_flattened_and_trains_like_padding():
    from transformers import DataCollatorWithFlattening

    feats = [{"input_ids": [5, 6, 7, 9], "loss_mask": [False, True, False, True], "ref_loss": [0.0, 1.0, 2.0, 3.0]},
             {"input_ids": [8, 4, 3], "loss_mask": [False, True, True], "ref_loss": [4.0, 5.0, 6.0]}]  # fmt: skip
    batch = SelectiveDataCollator(DataCollatorWithFlattening())(feats)
    assert batch["input_ids"].shape == batch["loss_mask"].shape == batch["ref_loss"].shape == (1, 7)
    assert batch["loss_mask"][0].tolist() == [False, True, False, True, False, True, True]
    model = tiny_model("llama", vocab=len(builtin_tokenizer()))
    lm = slm.SelectiveLM(model)
    flat = lm(input_ids=batch["input_ids"], labels=batch["labels"], loss_mask=batch["loss_mask"],
              position_ids=batch["position_ids"])  # fmt: skip
    padded = collator(builtin_tokenizer())(feats)
    rows = lm(input_ids=padded["input_ids"], labels=padded["labels"], attention_mask=padded["attention_mask"],
              loss_mask=padded["loss_mask"])  # fmt: skip
    assert flat.n_selected == rows.n_selected == 4
    torch.testing.assert_close(flat.loss, rows.loss, atol=1e-5, rtol=1e-5)


def test_trainer_options_the_head_cannot_honour_are_refused(tmp_path):
    ds, tok = dataset()
    model = tiny_model("llama", vocab=len(tok))
    with pytest.raises(ValueError, match="label_smoothing_factor=0.1 is not implemented"):
        SelectiveTrainer(model, args(tmp_path, label_smoothing_factor=0.1), train_dataset=ds,
                         data_collator=collator(tok))  # fmt: skip
    with pytest.raises(ValueError, match="compute_loss_func would never be called"):
        SelectiveTrainer(model, args(tmp_path), train_dataset=ds, data_collator=collator(tok),
                         compute_loss_func=lambda *a, **k: 0.0)  # fmt: skip


def test_compute_metrics_receives_per_token_losses_and_hits(tmp_path):
    ds, tok = dataset(n=8, with_mask=False)
    model = tiny_model("llama", vocab=len(tok))
    seen = {}

    def metrics(pred):
        token_loss, hits = pred.predictions
        valid = pred.label_ids[:, 1:] != -100
        seen.update(loss=token_loss[:, 1:][valid].mean(), acc=hits[:, 1:][valid].mean())
        return {"token_acc": float(seen["acc"])}

    trainer = SelectiveTrainer(model, args(tmp_path, per_device_eval_batch_size=4), train_dataset=ds, eval_dataset=ds,
                               data_collator=collator(tok), compute_metrics=metrics, selection_ratio=1.0)  # fmt: skip
    out = trainer.evaluate()
    # the per-token losses and hits are HF's own, token by token
    batch = collator(tok)([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    valid = labels != -100
    ce = F.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")[valid].mean()
    assert float(seen["loss"]) == pytest.approx(float(ce), rel=1e-5)
    expected = (logits.argmax(-1) == labels)[valid].float().mean()
    assert out["eval_token_acc"] == pytest.approx(float(expected), abs=1e-6)


@pytest.mark.parametrize("side", ["right", "left"])
def test_collator_pads_mask_and_ref_like_labels(side):
    tok = builtin_tokenizer()
    tok.padding_side = side
    feats = [{"input_ids": [5, 6, 7], "loss_mask": [True, False, True], "ref_loss": [0.0, 1.5, 2.5]},
             {"input_ids": [8], "loss_mask": [True], "ref_loss": [3.0]}]  # fmt: skip
    batch = collator(tok)(feats)
    real = batch["attention_mask"].bool()
    assert batch["loss_mask"].dtype == torch.bool and batch["ref_loss"].dtype == torch.float32
    assert batch["loss_mask"][1].tolist() == ([True, False, False] if side == "right" else [False, False, True])
    assert batch["ref_loss"][0].tolist() == [0.0, 1.5, 2.5]
    assert not batch["loss_mask"][~real].any() and (batch["labels"][~real] == -100).all()


# --- issue 12 #1, #2, #3, #10, #15, #16 and issue 9 #2, #8 ------------------------------------------


def test_a_step_with_no_masked_token_leaves_the_model_finite_and_unchanged(tmp_path):
    """A sparse loss_mask leaves whole optimizer steps without a trained token (HF would give NaN)."""
    tok = builtin_tokenizer()
    rows = [{"input_ids": list(range(3, 13)), "loss_mask": [False] * 10},
            {"input_ids": list(range(13, 23)), "loss_mask": [False] * 5 + [True] * 5}]  # fmt: skip
    model = tiny_model("llama", vocab=len(tok))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = SelectiveTrainer(model, args(tmp_path, per_device_train_batch_size=1, max_steps=1, optim="sgd",
                                           learning_rate=0.5, max_grad_norm=0.0),
                               train_dataset=Dataset.from_list(rows[:1]), data_collator=collator(tok))  # fmt: skip
    trainer.train()
    after = model.state_dict()
    assert all(torch.equal(after[k], start[k]) for k in start)  # zero gradient, not NaN
    trainer = SelectiveTrainer(model, args(tmp_path, per_device_train_batch_size=2, max_steps=1, optim="sgd",
                                           learning_rate=0.5, max_grad_norm=0.0),
                               train_dataset=Dataset.from_list(rows), data_collator=collator(tok))  # fmt: skip
    trainer.train()
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    assert any(not torch.equal(model.state_dict()[k], start[k]) for k in start)


def test_position_ids_of_a_flattening_collator_reach_the_model(tmp_path):
    from transformers import DataCollatorWithFlattening

    tok = builtin_tokenizer()
    model = tiny_model("llama", vocab=len(tok))
    feats = [{"input_ids": list(range(3, 11))}, {"input_ids": list(range(20, 26))}]
    batch = DataCollatorWithFlattening(return_position_ids=True)(feats)
    assert batch["position_ids"].tolist()[0][8] == 0  # the second document restarts at 0
    trainer = SelectiveTrainer(model, args(tmp_path), train_dataset=Dataset.from_list(feats), selection_ratio=1.0)
    loss = trainer.compute_loss(trainer.model, dict(batch))
    ref = model(input_ids=batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"],
                use_cache=False).loss  # fmt: skip
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-5)


def test_a_pre_wrapped_selective_lm_is_the_one_source_of_ratio_and_scope(tmp_path):
    ds, tok = dataset(with_mask=False)
    lm = slm.SelectiveLM(tiny_model("llama", vocab=len(tok)), ratio=0.3)
    with pytest.raises(ValueError, match="selection_ratio=0.6 but the model has 0.3"):
        SelectiveTrainer(lm, args(tmp_path), train_dataset=ds, selection_ratio=0.6)
    with pytest.raises(ValueError, match="scope='sequence' but the model has 'batch'"):
        SelectiveTrainer(lm, args(tmp_path), train_dataset=ds, scope="sequence")
    trainer = SelectiveTrainer(lm, args(tmp_path), train_dataset=ds, data_collator=collator(tok))
    batch = collator(tok)([dict(r) for r in ds.select(range(4))])
    counted = trainer._get_num_items_in_batch([batch], torch.device("cpu"))
    assert int(counted) == lm(input_ids=batch["input_ids"], labels=batch["labels"]).n_selected


def test_every_process_joins_the_logging_reduce(tmp_path, monkeypatch):
    ds, tok = dataset()
    trainer = SelectiveTrainer(tiny_model("llama", vocab=len(tok)), args(tmp_path), train_dataset=ds,
                               data_collator=collator(tok))  # fmt: skip
    calls = []
    real = trainer.accelerator.reduce
    monkeypatch.setattr(trainer.accelerator, "reduce", lambda t, *a, **k: calls.append(1) or real(t, *a, **k))
    trainer.log({"loss": 1.0})  # this process saw no valid token since the last log
    assert calls == [1]


def test_gradient_checkpointing_trains_like_without(tmp_path):
    ds, tok = dataset()
    sgd = dict(optim="sgd", learning_rate=0.5, max_grad_norm=0.0)
    models = []
    for ckpt in (False, True):
        model = tiny_model("llama", vocab=len(tok))
        SelectiveTrainer(model, args(tmp_path / str(ckpt), gradient_checkpointing=ckpt, **sgd), train_dataset=ds,
                         data_collator=collator(tok)).train()  # fmt: skip
        models.append(model)
    assert models[1].is_activation_checkpointing
    for (n, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


def test_resume_from_its_own_checkpoint_equals_an_uninterrupted_run(tmp_path):
    ds, tok = dataset(n=32)
    common = dict(max_steps=6, save_strategy="steps", save_steps=3, learning_rate=1e-2)
    full = tiny_model("llama", vocab=len(tok))
    SelectiveTrainer(full, args(tmp_path / "full", **common), train_dataset=ds, data_collator=collator(tok)).train()
    cut = tiny_model("llama", vocab=len(tok))
    SelectiveTrainer(cut, args(tmp_path / "cut", **{**common, "max_steps": 3}), train_dataset=ds,
                     data_collator=collator(tok)).train()  # fmt: skip
    again = tiny_model("llama", seed=9, vocab=len(tok))  # other weights: the checkpoint must replace them
    SelectiveTrainer(again, args(tmp_path / "cut", **common), train_dataset=ds, data_collator=collator(tok)).train(
        resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-3"))  # fmt: skip
    for (n, a), b in zip(full.named_parameters(), again.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


def test_save_writes_the_gathered_state_dict_it_is_given(tmp_path):
    """Sharded runs (ZeRO-3, FSDP) hand _save the gathered weights; they must be what is written."""
    from transformers import AutoModelForCausalLM

    ds, tok = dataset()
    trainer = SelectiveTrainer(tiny_model("llama", vocab=len(tok)), args(tmp_path), train_dataset=ds,
                               data_collator=collator(tok))  # fmt: skip
    gathered = {k: v + 1.0 for k, v in trainer.model.state_dict().items()}
    trainer._save(str(tmp_path / "saved"), state_dict=gathered)
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    for k, v in again.state_dict().items():
        torch.testing.assert_close(v, gathered["model." + k])


def test_collator_warns_when_a_masked_token_cannot_train_and_the_tokenizer_path_keeps_end_tokens():
    tok = builtin_tokenizer()
    tok.pad_token = tok.eos_token  # as with Phi-2 or Llama: no pad token of its own
    eos = tok.eos_token_id
    feats = [{"input_ids": [5, 6, eos], "loss_mask": [False, True, True]}, {"input_ids": [7], "loss_mask": [True]}]
    with pytest.warns(UserWarning, match="label -100 and will not be trained"):
        batch = collator(tok)(feats)
    assert batch["labels"][0, 2] == -100  # DataCollatorForLanguageModeling dropped the end token
    batch = SelectiveDataCollator(tokenizer=tok)(feats)
    assert batch["labels"][0].tolist() == [5, 6, eos] and batch["labels"][1].tolist() == [7, -100, -100]
    assert batch["loss_mask"][1].tolist() == [True, False, False]


def test_readme_conversion_from_pre_shifted_labels_equals_the_users_own_loss():
    """README, "Coming from a masked Trainer": labels[t] = the token after t, mask aligned with them."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme.split("<!-- pre-shifted conversion -->", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    model = tiny_model("llama")
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, 101, (2, 9), generator=g)
    shift_labels = torch.cat([input_ids[:, 1:], torch.full((2, 1), -100)], dim=1)  # the user's own labels
    mask = torch.rand(2, 9, generator=g) < 0.5  # the user's mask, aligned with shift_labels
    logits = model(input_ids=input_ids).logits.float()
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), shift_labels.clamp(min=0), reduction="none")
    keep = mask & (shift_labels != -100)
    theirs = (ce * keep).sum() / keep.sum()
    scope = {"torch": torch, "F": torch.nn.functional, "input_ids": input_ids, "shift_labels": shift_labels,
             "mask": mask, "slm": slm, "model": model}  # fmt: skip
    exec(block, scope)
    ours = scope["out"].loss
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
    params = list(model.parameters())
    for a, b in zip(torch.autograd.grad(ours, params), torch.autograd.grad(theirs, params)):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-4)


def test_union_and_intersection_are_refused_because_their_count_comes_after_the_forward(tmp_path):
    """Trainer divides by num_items_in_batch, counted before any forward; a union's size is known only
    after selecting, so dividing by the ratio's count would scale the loss silently wrong."""
    ds, tok = dataset(with_mask=False)
    lm = slm.SelectiveLM(tiny_model("llama", vocab=len(tok)), ratio=0.3, selector="union",
                         combine=("excess_loss", "reference_entropy"))  # fmt: skip
    with pytest.raises(ValueError, match="union.*known only after the forward.*slm-train"):
        SelectiveTrainer(lm, args(tmp_path), train_dataset=ds, data_collator=collator(tok))


def test_a_ref_entropy_column_is_padded_and_selects_the_most_certain_tokens(tmp_path):
    ds, tok = dataset(with_mask=False)
    g = torch.Generator().manual_seed(4)
    ds = ds.map(lambda r: {"ref_entropy": (torch.rand(len(r["input_ids"]), generator=g) * 3).tolist()})
    model = tiny_model("llama", vocab=len(tok))
    trainer = SelectiveTrainer(model, args(tmp_path), train_dataset=ds, data_collator=collator(tok),
                               selection_ratio=0.3, selector="reference_entropy")  # fmt: skip
    batch = collator(tok)([dict(r) for r in ds.select(range(4))])
    assert batch["ref_entropy"].shape == batch["labels"].shape
    n = trainer._get_num_items_in_batch([batch], torch.device("cpu"))
    loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=n)
    direct = slm.SelectiveLM(model, ratio=0.3, selector="reference_entropy")(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
        ref_entropy=batch["ref_entropy"])  # fmt: skip
    valid = slm.model.shifted_valid(batch["labels"])
    expected = slm.select_tokens(-batch["ref_entropy"], 0.3, valid, "batch")
    assert torch.equal(direct.mask, expected) and int(n) == int(expected.sum())
    torch.testing.assert_close(loss, direct.loss, atol=1e-6, rtol=1e-6, check_dtype=False)
    trainer.train()
