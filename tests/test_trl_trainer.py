"""SelectiveSFTTrainer against TRL's own SFTTrainer (tiny model, CPU): at ratio 1.0 the same losses, gradient
norms, metrics and weights for every way TRL marks the trained tokens; below it, the loss and gradients of
plain full-logits cross-entropy over the kept tokens."""

import re

import pytest
import torch
from datasets import Dataset
from support.archs import tiny_model
from support.hf_reference import assert_grads_close, grads

import slm
from slm.data import builtin_tokenizer
from slm.model import shifted_valid
from slm.model.sparse_backward import decoder_layers, mask_output_gradients

trl = pytest.importorskip("trl")
from slm.trainers import SelectiveSFTTrainer  # noqa: E402

CHAT = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<eos>"
    "{% endgeneration %}{% else %}{{ m['role'] }}: {{ m['content'] }}\n{% endif %}{% endfor %}"
)


def _data(kind: str, n: int = 24) -> Dataset:
    rows = []
    for i in range(n):
        q, a = f"What is {i} plus {i % 7}?", f"It is {i + i % 7}." + " Sure." * (i % 3)
        if kind == "completion":
            rows.append({"prompt": q + " ", "completion": a})
        elif kind == "assistant":
            rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
        else:
            rows.append({"text": f"{q} {a}"})
    return Dataset.from_list(rows)


SGD = {"optim": "sgd", "learning_rate": 0.1}


def _train(tmp_path, cls, kind: str, name: str, config: dict | None = None, **extra):
    tok = builtin_tokenizer()
    tok.chat_template = CHAT
    model = tiny_model("llama", seed=3, vocab=len(tok))
    args = trl.SFTConfig(
        output_dir=str(tmp_path / name), max_steps=3, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0, bf16=False,
        assistant_only_loss=kind == "assistant", **{"learning_rate": 3e-3, **(config or {})},
    )  # fmt: skip
    trainer = cls(model=model, args=args, train_dataset=_data(kind), processing_class=tok, **extra)
    trainer.train()
    return [e for e in trainer.state.log_history if "loss" in e], model


@pytest.mark.parametrize(
    "kind, config",
    [("completion", {}), ("assistant", {}), ("text", {}), ("completion", {"packing": True, "max_length": 64}),
     ("text", {"padding_free": True, "max_length": None})],
    ids=["completion_only", "assistant_only", "plain_text", "packing", "padding_free"],
)  # fmt: skip
def test_at_ratio_one_it_equals_trl_sft(tmp_path, kind, config):
    ours, _ = _train(tmp_path, SelectiveSFTTrainer, kind, "ours", config)
    theirs, _ = _train(tmp_path, trl.SFTTrainer, kind, "trl", config)
    assert len(ours) == len(theirs) == 3
    for x, y in zip(ours, theirs):
        for key in ("loss", "grad_norm", "entropy", "mean_token_accuracy"):
            assert x[key] == pytest.approx(y[key], rel=2e-5, abs=1e-6), (x["step"], key)
        assert x["num_tokens"] == y["num_tokens"] and x["selected_frac"] == 1.0
    # The weights: Adam divides by sqrt(v), so float re-association in a near-zero gradient can move a weight by up
    # to the learning rate (it did by 3e-5 at lr 3e-3 under OMP_NUM_THREADS=1). After SGD steps a weight's
    # difference is lr x its gradient's round-off: there the equality is tight on any thread count.
    _, a = _train(tmp_path, SelectiveSFTTrainer, kind, "ours_sgd", {**config, **SGD})
    _, b = _train(tmp_path, trl.SFTTrainer, kind, "trl_sgd", {**config, **SGD})
    for (k, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        # SGD: a weight moves by lr x its gradient, so a difference is lr x a gradient's round-off
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


def _full_logits_ce(model, batch) -> torch.Tensor:
    """[B, T] next-token cross-entropy from HF's full logits (entry t predicts labels[:, t]), 0 where invalid."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits.float()
    labels = batch["labels"]
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten().clamp(min=0), reduction="none"
    ).view(labels.shape[0], -1)
    return torch.nn.functional.pad(ce, (1, 0)) * shifted_valid(labels)


@pytest.mark.parametrize("selector", ["train_loss", "excess_loss"])
def test_below_one_it_trains_the_kept_tokens_exactly(tmp_path, selector):
    """One micro-batch: the loss and every gradient equal plain cross-entropy over the top 30% of the
    completion tokens by the selector's score (excess loss: over a reference model)."""
    tok = builtin_tokenizer()
    model, reference = tiny_model("llama", seed=3, vocab=len(tok)), tiny_model("llama", seed=9, vocab=len(tok))
    args = trl.SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, report_to=[], use_cpu=True)
    trainer = SelectiveSFTTrainer(
        model=model, args=args, train_dataset=_data("completion"), processing_class=tok, selection_ratio=0.3,
        selector=selector, reference=reference if selector == "excess_loss" else None,
    )  # fmt: skip
    batch = next(iter(trainer.get_train_dataloader()))
    model.train()
    n_keep = trainer._get_num_items_in_batch([batch], torch.device("cpu"))
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=n_keep)
    ce = _full_logits_ce(model, batch)
    score = ce.detach()
    if selector == "excess_loss":
        with torch.no_grad():
            score = score - _full_logits_ce(reference, batch)
    kept = slm.select_tokens(score, 0.3, shifted_valid(batch["labels"]), "batch")
    assert int(kept.sum()) == int(n_keep) < 0.35 * int(shifted_valid(batch["labels"]).sum())
    plain = ce[kept].sum() / kept.sum()
    torch.testing.assert_close(loss, plain, atol=1e-6, rtol=1e-5)
    assert_grads_close(grads(loss, model), grads(plain, model))


def test_sparse_backward_gives_the_masked_reference_gradients(tmp_path):
    """The kept completion tokens' rows alone reach the decoder's linear layers (prompt rows give none)."""
    tok = builtin_tokenizer()
    model = tiny_model("llama", seed=3, vocab=len(tok))
    args = trl.SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, report_to=[], use_cpu=True)
    trainer = SelectiveSFTTrainer(model=model, args=args, train_dataset=_data("completion"), processing_class=tok,
                                  selection_ratio=0.3, selector="train_loss", sparse_backward=True)  # fmt: skip
    batch = next(iter(trainer.get_train_dataloader()))
    model.train()
    n_keep = trainer._get_num_items_in_batch([batch], torch.device("cpu"))
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=n_keep)
    ours = grads(loss, model)
    with torch.no_grad():
        ce = _full_logits_ce(model, batch)
    kept = slm.select_tokens(ce, 0.3, shifted_valid(batch["labels"]), "batch")
    rows = torch.zeros_like(kept)
    rows[:, :-1] = kept[:, 1:]
    with mask_output_gradients(decoder_layers(model), rows.reshape(-1)):
        ce = _full_logits_ce(model, batch)
    plain = ce[kept].sum() / kept.sum()
    torch.testing.assert_close(loss, plain, atol=1e-6, rtol=1e-5)
    assert_grads_close(ours, grads(plain, model))


def test_settings_the_selective_head_cannot_honour_are_refused(tmp_path):
    tok = builtin_tokenizer()
    common = dict(train_dataset=_data("completion"), processing_class=tok)

    def args(**kw):
        return trl.SFTConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, **kw)

    with pytest.raises(ValueError, match="ranks tokens against a reference"):
        SelectiveSFTTrainer(model=tiny_model("llama", vocab=len(tok)), args=args(), selection_ratio=0.5, **common)
    with pytest.raises(ValueError, match="loss_type='nll'"):
        SelectiveSFTTrainer(model=tiny_model("llama", vocab=len(tok)), args=args(loss_type="dft"), **common)
    with pytest.raises(ValueError, match="selector must be one of"):
        SelectiveSFTTrainer(model=tiny_model("llama", vocab=len(tok)), args=args(), selector="union", **common)


def test_the_readme_example_runs_as_written(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    script = Path(__file__).resolve().parent.parent / "scripts" / "trl_sft_example.py"
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "out")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.model_type == "llama"
    logged = [float(x) for x in re.findall(r"'selected_frac': '([0-9.]+)'", done.stdout + done.stderr)]
    assert logged and all(0.28 <= f <= 0.32 for f in logged)  # the share it was asked to keep


def _grpo(tmp_path, cls, name: str, loss_type: str = "dapo", per_device_train_batch_size: int = 4, **extra):
    """A 3-step GRPO run on CPU; ``extra`` goes to the trainer."""
    tok = builtin_tokenizer()
    tok.padding_side = "left"
    model = tiny_model("llama", seed=3, vocab=len(tok))
    prompts = Dataset.from_list([{"prompt": f"What is {i} plus {i % 5}? "} for i in range(16)])

    def reward(completions, **kw):  # longer answers and more digits score higher: the advantages differ
        return [len(c) / 10 + sum(ch.isdigit() for ch in c) for c in completions]

    args = trl.GRPOConfig(
        output_dir=str(tmp_path / name), max_steps=3, per_device_train_batch_size=per_device_train_batch_size,
        num_generations=4,
        max_completion_length=16, gradient_accumulation_steps=2, learning_rate=3e-3, logging_steps=1, report_to=[],
        use_cpu=True, bf16=False, seed=0, save_strategy="no", top_entropy_quantile=0.2, loss_type=loss_type,
    )  # fmt: skip
    trainer = cls(model=model, args=args, reward_funcs=reward, train_dataset=prompts, processing_class=tok, **extra)
    trainer.train()
    return [e for e in trainer.state.log_history if "loss" in e], model


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_grpo_top_entropy_tokens_equal_trl(tmp_path, loss_type):
    """The same completions (sampled on CPU), the same tokens kept, the same loss, gradients and weights as
    TRL's GRPOTrainer with top_entropy_quantile=0.2, while only those tokens run the gradient-carrying head."""
    from slm.trainers import SelectiveGRPOTrainer

    ours, a = _grpo(tmp_path, SelectiveGRPOTrainer, "ours", loss_type=loss_type)
    theirs, b = _grpo(tmp_path, trl.GRPOTrainer, "trl", loss_type=loss_type)
    assert len(ours) == len(theirs) == 3
    for x, y in zip(ours, theirs):
        assert x["completions/mean_length"] == y["completions/mean_length"]  # the same samples
        for key in ("loss", "grad_norm", "entropy"):
            assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-6), (x["step"], key)
        assert 0.15 < x["selected_frac"] <= 0.3
    for (k, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, atol=2e-5, rtol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


class _PlainSelectedGRPO(trl.GRPOTrainer):
    """TRL's GRPOTrainer (full logits for every completion token) whose loss mask is an slm rule applied to TRL's
    own per-token log-probs: the reference for SelectiveGRPOTrainer's other selectors."""

    def __init__(self, *args, selector, scope, reference=None, **kwargs):
        super().__init__(*args, **kwargs)
        from slm.selection import RunningThreshold

        self.rule, self.rule_scope, self.ref_model = selector, scope, reference
        self.threshold = RunningThreshold() if scope == "dataset" else None
        self._stash = None

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *a, **k):
        logps, entropies, aux = super()._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, logits_to_keep, *a, **k
        )
        if torch.is_grad_enabled():
            self._stash = (logps.detach(), input_ids, attention_mask, logits_to_keep)
        return logps, entropies, aux

    def get_high_entropy_mask(self, entropies, mask, threshold):
        logps, input_ids, attention_mask, n = self._stash
        scores = -logps
        if self.rule == "excess_loss":  # the reference's loss on each completion token, from its full logits
            with torch.no_grad():
                logits = self.ref_model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -n - 1 : -1]
            ref = torch.nn.functional.cross_entropy(logits.transpose(1, 2).float(), input_ids[:, -n:], reduction="none")
            scores = scores - ref
        valid = mask.bool()
        if self.threshold is not None:
            return self.threshold.select(scores, valid, self.top_entropy_quantile).to(entropies.dtype)
        return slm.select_tokens(scores, self.top_entropy_quantile, valid, self.rule_scope).to(entropies.dtype)


@pytest.mark.parametrize(
    "selector,scope", [("train_loss", "batch"), ("excess_loss", "sequence"), ("train_loss", "dataset")]
)
def test_grpo_tokens_ranked_by_an_slm_score_equal_trl_with_that_mask(tmp_path, selector, scope):
    """Any slm score at any scope: the same completions, the same tokens kept, the same loss, gradients and
    weights as TRL's own GRPO with full logits whose loss mask is that rule applied to TRL's own log-probs."""
    from slm.trainers import SelectiveGRPOTrainer

    extra = {}
    if selector == "excess_loss":
        extra["reference"] = tiny_model("llama", seed=7, vocab=len(builtin_tokenizer()))
    ours, a = _grpo(tmp_path, SelectiveGRPOTrainer, "ours", selector=selector, scope=scope, **extra)
    theirs, b = _grpo(tmp_path, _PlainSelectedGRPO, "plain", selector=selector, scope=scope, **extra)
    assert len(ours) == len(theirs) == 3
    for x, y in zip(ours, theirs):
        assert x["completions/mean_length"] == y["completions/mean_length"]
        for key in ("loss", "grad_norm", "entropy"):
            assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-6), (x["step"], key)
        assert 0.1 < x["selected_frac"] <= 0.3
    for (k, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, atol=2e-5, rtol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


def test_grpo_selector_settings_are_checked():
    from slm.trainers import SelectiveGRPOTrainer

    with pytest.raises(ValueError, match="selector must be one of"):
        SelectiveGRPOTrainer(model=None, selector="union")
    with pytest.raises(ValueError, match="pass reference="):
        SelectiveGRPOTrainer(model=None, selector="excess_loss")
    with pytest.raises(ValueError, match="TRL's rule, with TRL's scope"):
        SelectiveGRPOTrainer(model=None, scope="dataset")


@pytest.mark.slow
@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_sft_on_two_processes_equals_one_process(tmp_path, ratio):
    """DDP on 2 CPU processes (torchrun, gloo) x 2 rows = 1 process x 4 rows: the same losses and weights, the
    selective loss reaching DDP's gradient hooks through the patched forward; at ratio 1.0 also TRL's own
    SFTTrainer on 2 processes."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = str(Path(__file__).resolve().parent / "support" / "launch" / "trl_sft_ddp_run.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", script]
    runs = {"one": [sys.executable, script, str(tmp_path / "one"), "4", str(ratio)],
            "two": [*two, str(tmp_path / "two"), "2", str(ratio)]}  # fmt: skip
    if ratio == 1.0:
        runs["trl"] = [*two, str(tmp_path / "trl"), "2", "1.0", "trl"]
    for cmd in runs.values():
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
    weights = {name: torch.load(tmp_path / name / "weights.pt") for name in runs}
    logs = {name: json.loads((tmp_path / name / "log.json").read_text()) for name in runs}
    evals = {name: log.pop()["eval_loss"] for name, log in logs.items()}
    if ratio == 1.0:  # issue 37 item 17: the eval loss on 2 processes is TRL's own on 2 processes
        assert evals["two"] == pytest.approx(evals["trl"], rel=1e-5)
    start = tiny_model("llama", seed=3, vocab=len(builtin_tokenizer())).state_dict()
    assert any((weights["one"][k] - start[k]).abs().max() > 1e-3 for k in start)  # the runs moved the weights
    for name in runs:
        if name == "one":
            continue
        assert [e["loss"] for e in logs[name]] == pytest.approx([e["loss"] for e in logs["one"]], rel=1e-5)
        for k in start:
            torch.testing.assert_close(weights[name][k], weights["one"][k], atol=1e-5, rtol=1e-5)
    if ratio < 1.0:
        assert all(0.45 <= e["selected_frac"] <= 0.55 for e in logs["two"])


@pytest.mark.slow
def test_grpo_on_two_processes_equals_trl_on_two_processes(tmp_path):
    """DDP on 2 CPU processes (torchrun, gloo), each generating its own completions: the same samples, loss,
    gradient norm and weights as TRL's GRPOTrainer launched the same way (the selective head reached through
    DDP's wrapper, its gradients all-reduced)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = str(Path(__file__).resolve().parent / "support" / "launch" / "trl_grpo_ddp_run.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name, extra in (("ours", []), ("trl", ["trl"])):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", script, str(tmp_path / name)]
        run = subprocess.run([*cmd, *extra], env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
    ours, theirs = (json.loads((tmp_path / n / "log.json").read_text()) for n in ("ours", "trl"))
    assert len(ours) == len(theirs) == 3
    for x, y in zip(ours, theirs):
        assert x["completions/mean_length"] == y["completions/mean_length"]
        for key in ("loss", "grad_norm", "entropy"):
            assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-6), (x["step"], key)
    a, b = (torch.load(tmp_path / n / "weights.pt") for n in ("ours", "trl"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


def test_compute_metrics_is_fed_per_token_losses_and_hits(tmp_path):
    """Issue 37 item 16: TRL's trainer calls compute_metrics at eval; so does SelectiveSFTTrainer, with what slm
    has instead of logits (as SelectiveTrainer): per-token losses and arg-max hits, aligned with the labels."""
    tok = builtin_tokenizer()
    calls = []

    def metrics(pred):
        (token_loss, hits), labels = pred.predictions, pred.label_ids
        valid = labels[:, 1:] != -100
        calls.append(1)
        return {"my_accuracy": float(hits[:, 1:][valid].mean()), "my_loss": float(token_loss[:, 1:][valid].mean())}

    data = _data("completion", n=8)
    args = trl.SFTConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, per_device_eval_batch_size=8, bf16=False)
    trainer = SelectiveSFTTrainer(model=tiny_model("llama", seed=3, vocab=len(tok)), args=args, train_dataset=data,
                                  eval_dataset=data, processing_class=tok, compute_metrics=metrics)  # fmt: skip
    out = trainer.evaluate()
    assert calls == [1]
    assert out["eval_my_accuracy"] == pytest.approx(out["eval_mean_token_accuracy"], abs=1e-6)
    assert out["eval_my_loss"] == pytest.approx(out["eval_loss"], rel=1e-5)  # one batch: the same mean


def test_the_docs_benchmark_table_names_the_scripts_cases():
    """docs/trl.md's table is the output of scripts/trl_bench.py: its rows carry the names the script prints."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("trl_bench", root / "scripts" / "trl_bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    doc = (root / "docs" / "trl.md").read_text()
    table = doc[doc.index("| case | ms/step |") :].split("\n\n")[0].splitlines()[2:]
    assert [row.split("|")[1].strip() for row in table] == list(bench.CASES)
