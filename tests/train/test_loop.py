"""slm-train: normalisation, accumulation, resume, NaN handling, logging, multi-process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.compose import TINY, compose_train

from slm.cli import train_composed
from slm.runs import read_metrics
from slm.train import BatchStream, NonFiniteLoss, RunInterrupted, Trainer, answer_accuracy


def losses(run_dir, key="train/loss"):
    return [(e["step"], e[key]) for e in read_metrics(run_dir) if key in e]


def final_weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / "model" / "model.safetensors"))


def assert_same_weights(a, b, atol=2e-5):
    # Adam divides by sqrt(v): float re-association in a near-zero gradient moves a weight by ~1e-6.
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-5)


def test_batch_stream_is_shared_by_process_count_and_resumable():
    one = BatchStream(n=10, batch_size=4, world=1, rank=0, seed=3)
    two = [BatchStream(n=10, batch_size=2, world=2, rank=r, seed=3) for r in range(2)]
    for j in range(7):  # crosses several epochs
        assert one.indices(j) == two[0].indices(j) + two[1].indices(j)
    seen = [i for j in range(5) for i in one.indices(j)]  # 20 draws = 2 epochs: each row twice
    assert sorted(seen) == sorted(list(range(10)) * 2)
    assert BatchStream(10, 4, 1, 0, seed=3).indices(5) == one.indices(5)  # no hidden state
    assert BatchStream(10, 4, 1, 0, seed=4).indices(0) != one.indices(0)


def test_answer_accuracy_counts_whole_answers():
    ans = torch.tensor([[0, 1, 1, 0, 1, 0], [1, 1, 0, 0, 1, 1]], dtype=torch.bool)
    hits = torch.tensor([[0, 1, 1, 0, 0, 0], [1, 1, 0, 0, 1, 1]], dtype=torch.bool)
    valid = torch.ones_like(ans)
    valid[:, 0] = False  # the answer at the start of row 1 has no prediction: not counted
    assert answer_accuracy(ans, hits, valid) == (2, 3)


def test_accumulation_equals_double_batch(tmp_path):
    common = ("selector.scope=sequence", "selector.ratio=0.6", "trainer.eval_every=100")
    cfg_a = compose_train(tmp_path / "cache", "trainer.batch_size=2", "trainer.grad_accum=2", *common)
    cfg_b = compose_train(tmp_path / "cache", "trainer.batch_size=4", "trainer.grad_accum=1", *common)
    train_composed(cfg_a, tmp_path / "a")
    train_composed(cfg_b, tmp_path / "b")
    for key in ("train/loss", "train/grad_norm"):  # the norm catches a mis-scaled gradient that Adam would hide
        la, lb = losses(tmp_path / "a", key), losses(tmp_path / "b", key)
        assert len(la) == 6 and [s for s, _ in la] == [s for s, _ in lb]
        for (_, x), (_, y) in zip(la, lb):
            assert x == pytest.approx(y, rel=1e-5)
    assert_same_weights(final_weights(tmp_path / "a"), final_weights(tmp_path / "b"))
    ea, eb = read_metrics(tmp_path / "a")[-1], read_metrics(tmp_path / "b")[-1]
    assert ea["tokens_seen"] == eb["tokens_seen"] == 6 * 4 * 32
    assert ea["tokens_selected"] == eb["tokens_selected"]


def test_ratio_one_is_plain_causal_lm_training(tmp_path):
    """selector=all with no reference = an independent HF loop with AdamW on model(...).loss."""
    from slm.data import build
    from slm.model import build_model
    from slm.train import TrainConfig, lr_lambda

    # grad_clip=1e9: the gradient norm is logged (and compared below) but nothing is clipped
    cfg = compose_train(
        tmp_path / "cache", "selector=all", "reference=none", "trainer.grad_clip=1e9", "trainer.max_steps=4"
    )
    train_composed(cfg, tmp_path / "run")
    data = build(cfg.data)
    model = build_model(cfg.model, len(data.tokenizer), cfg.seed, data.tokenizer)
    tcfg = TrainConfig(**{k: v for k, v in cfg.trainer.items()}, seed=cfg.seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tcfg.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=tcfg.lr,
        betas=tuple(tcfg.betas),
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tcfg))
    stream = BatchStream(len(data["train"]), 4, 1, 0, cfg.seed)
    expected, norms = [], []
    for step in range(4):
        rows = data["train"][stream.indices(step)]
        b = {k: torch.tensor(v) for k, v in rows.items()}
        loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf")).item())
        opt.step(), sched.step(), opt.zero_grad()
        expected.append(loss.item())
    assert [v for _, v in losses(tmp_path / "run")] == pytest.approx(expected, rel=1e-5)
    assert [v for _, v in losses(tmp_path / "run", "train/grad_norm")] == pytest.approx(norms, rel=1e-4)
    assert_same_weights(final_weights(tmp_path / "run"), {k: v.contiguous() for k, v in model.state_dict().items()})


def test_resume_after_interrupt_matches_uninterrupted_run(tmp_path, monkeypatch):
    import signal

    overrides = ("trainer.max_steps=8", "trainer.checkpoint_every=100", "selector=random", "selector.ratio=0.5")
    train_composed(compose_train(tmp_path / "cache", *overrides), tmp_path / "full")

    real_step = Trainer.train_step

    def ctrl_c_during_step_5(self):
        if self.step == 4:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C does mid-step: the step finishes first
        return real_step(self)

    monkeypatch.setattr(Trainer, "train_step", ctrl_c_during_step_5)
    with pytest.raises(RunInterrupted) as stopped:
        train_composed(compose_train(tmp_path / "cache", *overrides), tmp_path / "cut")
    assert stopped.value.step == 5 and stopped.value.checkpoint.name == "step_0000005"
    result = json.loads((tmp_path / "cut" / "result.json").read_text())
    assert result["status"] == "interrupted" and result["step"] == 5
    assert json.loads((tmp_path / "cut" / "run_info.json").read_text())["status"] == "interrupted"
    assert not (tmp_path / "cut" / "model").exists()  # not written as if finished
    monkeypatch.setattr(Trainer, "train_step", real_step)
    train_composed(compose_train(tmp_path / "cache", *overrides, "trainer.resume=true"), tmp_path / "cut")

    full, cut = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut")
    assert [e["step"] for e in full] == [e["step"] for e in cut]  # same file, no duplicated events
    for a, b in zip(full, cut):
        assert a.keys() == b.keys()
        for k in a:
            if k not in ("train/tokens_per_s", "train_time_s"):  # timings differ between runs
                assert a[k] == pytest.approx(b[k], rel=1e-6), k
    assert_same_weights(final_weights(tmp_path / "full"), final_weights(tmp_path / "cut"))
    assert json.loads((tmp_path / "cut" / "result.json").read_text())["status"] == "finished"
    # resuming a finished run does nothing, rewrites no checkpoint and reports the final eval numbers
    ckpt = tmp_path / "cut" / "checkpoints" / "step_0000008"
    stamp = (ckpt / "dcp" / ".metadata").stat().st_mtime_ns
    again = train_composed(compose_train(tmp_path / "cache", *overrides, "trainer.resume=true"), tmp_path / "cut")
    assert again["step"] == 8 and again["eval/loss"] == pytest.approx(full[-1]["eval/loss"])
    assert read_metrics(tmp_path / "cut") == cut
    assert (ckpt / "dcp" / ".metadata").stat().st_mtime_ns == stamp


def test_nan_loss_stops_with_step_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    real_step = Trainer.train_step

    def poison_at_4(self):
        if self.step == 3:
            with torch.no_grad():
                for p in self.engine.lm.parameters():
                    p.fill_(float("nan"))
        return real_step(self)

    monkeypatch.setattr(Trainer, "train_step", poison_at_4)
    with pytest.raises(NonFiniteLoss, match=r"step 4 .*step_0000003"):
        train_composed(compose_train(tmp_path / "cache", "reference=none", "trainer.max_steps=6"), tmp_path / "run")
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step_0000003"
    assert json.loads((tmp_path / "run" / "result.json").read_text())["status"] == "failed"


def test_metrics_and_offline_wandb_run(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no stored W&B login
    cfg = compose_train(tmp_path / "cache", "logger=wandb", "experiment_name=unit")
    train_composed(cfg, tmp_path / "run")
    events = read_metrics(tmp_path / "run")
    train_ev = [e for e in events if "train/loss" in e]
    eval_ev = [e for e in events if "eval/loss" in e]
    assert [e["step"] for e in eval_ev] == [0, 3, 6]
    assert all({"step", "tokens_seen", "tokens_selected"} <= e.keys() for e in events)
    assert all(0.55 < e["train/selected_frac"] < 0.65 for e in train_ev)
    assert train_ev[-1]["tokens_seen"] == 6 * 4 * 32
    assert "eval/answer_acc" in eval_ev[-1]
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))
    assert json.loads((tmp_path / "run" / "result.json").read_text())["step"] == 6


def test_stored_reference_refuses_other_data_settings(tmp_path, capsys):
    from slm.cli import score

    cfg = compose_train(tmp_path / "cache", "data.block_size=24", config_name="score")
    out = score(cfg, overrides=["data.block_size=24", "entropy=false"])
    printed = capsys.readouterr().out
    # the command it prints carries the data options the store was made with, and it works as printed
    assert f"train with: slm-train data.block_size=24 reference=stored reference.scores_dir={out}" in printed
    assert "scored at" in printed
    ok = ("data.block_size=24", "reference=stored", f"reference.scores_dir={out}", "trainer.max_steps=1")
    train_composed(compose_train(tmp_path / "cache", *ok), tmp_path / "ok")
    with pytest.raises(
        ValueError,
        match=r"made for other data: the store has block_size=24, this run's data has "
        r"block_size=32\. Pass the same data options .*re-scoring is needed only",
    ):
        train_composed(
            compose_train(tmp_path / "cache", "reference=stored", f"reference.scores_dir={out}"), tmp_path / "run"
        )
    score(cfg, overrides=["data.block_size=24"])  # a second time: nothing to score, and it says so
    assert "reused: an earlier slm-score run had stored these exact losses" in capsys.readouterr().out


def test_a_damaged_store_shard_stops_training_when_it_is_read(tmp_path, monkeypatch):
    import numpy as np

    import slm.reference.store as store_module
    import slm.reference.writer as reference
    from slm.cli import score

    monkeypatch.setattr(reference, "CHUNK_TOKENS", 2 * 32)  # 2 blocks per shard: many shards
    store = score(compose_train(tmp_path / "cache", config_name="score"))
    checked = []  # the shards hashed when the store is opened
    real = store_module.file_sha256
    monkeypatch.setattr(store_module, "file_sha256", lambda p: checked.append(p) or real(p))
    reference.load_stored(store, {})
    monkeypatch.setattr(store_module, "file_sha256", real)
    for shard in set((store / "ref_loss").glob("*.npy")) - set(checked):  # found only when read
        values = np.load(shard)
        values[0, 1] += 1.0
        np.save(shard, values)
    with pytest.raises(ValueError, match=r"ref_loss/\d+\.npy is not what slm-score wrote"):
        train_composed(
            compose_train(tmp_path / "cache", "reference=stored", f"reference.scores_dir={store}"), tmp_path / "run"
        )
    assert json.loads((tmp_path / "run" / "result.json").read_text())["status"] == "failed"


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["global", "sequence"])
def test_two_processes_equal_one_process(tmp_path, scope):
    """torchrun --nproc_per_node 2 (gloo) x batch 2 == 1 process x batch 4, for the scopes that promise it."""
    from support.archs import save_reference, tiny_model

    from slm.data import builtin_tokenizer

    env = {**os.environ, "SLM_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    # One fixed reference for both (the demo reference's cache key includes the process count that trains it)
    save_reference(tiny_model("llama", seed=3, vocab=len(builtin_tokenizer())), tmp_path / "ref")
    args = [
        *[o for o in TINY if not o.startswith("reference.")],
        f"data.cache_dir={tmp_path / 'cache'}",
        "reference=live",
        f"reference.path={tmp_path / 'ref'}",
        f"selector.scope={scope}",
        "trainer.eval_every=3",
        "trainer.grad_clip=1e9",
        # 25 validation blocks at batch 4: the processes get 13 and 12 rows, 4 and 3 batches
        "data.builtin.n_val_docs=13",
        "trainer.eval_batch_size=4",
    ]
    exe = str(Path(sys.executable).with_name("slm-train"))
    subprocess.run(
        [exe, *args, "trainer.batch_size=4", f"hydra.run.dir={tmp_path / 'one'}"], env=env, check=True, cwd=tmp_path
    )
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--no-python", exe,
                    *args, "trainer.batch_size=2", f"hydra.run.dir={tmp_path / 'two'}"], env=env, check=True,
                   cwd=tmp_path)  # fmt: skip
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [e["step"] for e in one] == [e["step"] for e in two]  # main process wrote once
    for a, b in zip(one, two):
        for k in ("train/loss", "train/grad_norm", "eval/loss", "tokens_seen", "tokens_selected"):
            if k in a:
                assert a[k] == pytest.approx(b[k], rel=1e-5), (a["step"], k)
    assert_same_weights(final_weights(tmp_path / "one"), final_weights(tmp_path / "two"), atol=1e-5)


@pytest.mark.slow
def test_processes_of_one_launch_share_one_run_directory(tmp_path):
    env = {**os.environ, "SLM_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "slm.cli",
                    *TINY, "experiment_name=shared"], env=env, check=True, cwd=tmp_path)  # fmt: skip
    runs = list((tmp_path / "outputs" / "shared").iterdir())
    assert len(runs) == 1
    events = read_metrics(runs[0])
    assert len([e for e in events if e["step"] == 0]) == 1  # written once, by the main process


def test_live_reference_trains_exactly_like_its_stored_column(tmp_path):
    from support.archs import save_reference, tiny_model

    from slm.cli import score
    from slm.data import builtin_tokenizer

    save_reference(tiny_model("llama", seed=3, vocab=len(builtin_tokenizer())), tmp_path / "ref")
    live = ("reference=live", f"reference.path={tmp_path / 'ref'}")
    store = score(compose_train(tmp_path / "cache", *live, config_name="score"))
    train_composed(compose_train(tmp_path / "cache", *live), tmp_path / "live")
    train_composed(
        compose_train(tmp_path / "cache", "reference=stored", f"reference.scores_dir={store}"), tmp_path / "stored"
    )
    a, b = losses(tmp_path / "live"), losses(tmp_path / "stored")
    assert len(a) == 6 and [s for s, _ in a] == [s for s, _ in b]
    assert [v for _, v in a] == pytest.approx([v for _, v in b], rel=1e-6)
    assert [e["tokens_selected"] for e in read_metrics(tmp_path / "live")] == [
        e["tokens_selected"] for e in read_metrics(tmp_path / "stored")
    ]


def test_a_sparse_backward_run_resumes_as_if_never_interrupted(tmp_path, monkeypatch):
    """The mode carries no state of its own: Ctrl-C at step 3 of 6 and a resume equal the whole run."""
    from support.resume import resumed_equals_whole

    resumed_equals_whole(tmp_path, monkeypatch, "trainer.sparse_backward=true", "selector.ratio=0.5",
                         "trainer.max_steps=6")  # fmt: skip
    assert "sparse_backward: true" in (tmp_path / "cut" / "config.yaml").read_text()  # the resume kept the mode


def test_flops_estimate_the_matrix_products_a_selective_step_runs():
    """slm.flops against the FLOPs of every matmul dispatched by one forward + backward."""
    from support.archs import tiny_model
    from support.probes import MatmulFlops

    import slm
    from slm.model import flop_model

    model = tiny_model("llama").train()
    ids = torch.randint(1, 101, (3, 24), generator=torch.Generator().manual_seed(0))
    valid = ids.numel() - ids.shape[0]
    for sparse in (False, True, 1):
        for ratio, scored in ((1.0, 0), (0.4, valid)):
            lm = slm.SelectiveLM(model, ratio=ratio, selector="train_loss", sparse_backward=sparse)
            est = flop_model(model, ids.shape[1], sparse=lm.sparse_weights)
            assert (lm.sparse_weights > 0) == (sparse is not False)
            with MatmulFlops() as counter:
                out = lm(input_ids=ids, labels=ids)
                out.loss.backward()
            model.zero_grad(set_to_none=True)
            assert est.step(ids.numel(), scored, out.n_selected) == pytest.approx(counter.flops, rel=0.02), ratio


def test_a_run_with_too_few_eval_points_for_a_curve_says_so_at_start(tmp_path, caplog):
    """trainer.max_steps shorter than a few trainer.eval_every: warned once, with the setting that fixes it."""
    short = ("reference=none", "trainer.max_steps=4")
    train_composed(compose_train(tmp_path / "c", *short, "trainer.eval_every=3"), tmp_path / "a")
    assert "3 eval points" in caplog.text and "trainer.eval_every=1" in caplog.text
    caplog.clear()
    train_composed(compose_train(tmp_path / "c", *short, "trainer.eval_every=1"), tmp_path / "b")
    assert "eval points" not in caplog.text


@pytest.mark.parametrize("block_score", ["reference_loss", "train_loss", "excess_loss"])
def test_a_live_reference_is_counted_on_every_block_it_scores(tmp_path, monkeypatch, block_score):
    """With selector.blocks, a live reference runs on every candidate block its block score needs and on the
    kept ones: the FLOPs count exactly those reference forwards (issue 26, item 7). The stored column of the same
    reference selects the same blocks at no reference cost, so the difference is the reference's own work."""
    from support.archs import save_reference, tiny_model

    from slm.cli import score
    from slm.data import builtin_tokenizer
    from slm.reference import RefSource

    ref = tiny_model("llama", seed=3, vocab=len(builtin_tokenizer()))
    save_reference(ref, tmp_path / "ref")
    live = ("reference=live", f"reference.path={tmp_path / 'ref'}")
    blocks = ("selector=train_loss", "selector.blocks=0.5", f"selector.block_score={block_score}")
    store = score(compose_train(tmp_path / "cache", *live, config_name="score"))
    forwarded = []
    real = RefSource.values

    def counting(self, batch):
        if self.kind == "live":
            forwarded.append(int(batch["attention_mask"].sum()))
        return real(self, batch)

    monkeypatch.setattr(RefSource, "values", counting)
    train_composed(compose_train(tmp_path / "cache", *live, *blocks), tmp_path / "live")
    monkeypatch.setattr(RefSource, "values", real)
    stored = ("reference=stored", f"reference.scores_dir={store}")
    train_composed(compose_train(tmp_path / "cache", *stored, *blocks), tmp_path / "s")
    flops = [read_metrics(tmp_path / d)[-1]["flops"] for d in ("live", "s")]
    params = sum(p.numel() for p in ref.parameters())
    assert flops[0] - flops[1] == pytest.approx(2 * params * sum(forwarded), rel=1e-9)


def test_a_run_that_reads_its_text_more_than_once_says_so(tmp_path, caplog):
    import logging

    with caplog.at_level(logging.WARNING):
        train_composed(compose_train(tmp_path / "c", "trainer.max_steps=80"), tmp_path / "run")
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    from slm.cli.validation import validate
    from slm.data import build

    rows = len(build(validate(compose_train(tmp_path / "c")).data)["train"])
    assert info["passes"] == round(80 * 4 / rows, 3) > 1
    assert any("reads its training text" in r.message for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        train_composed(compose_train(tmp_path / "c", "trainer.max_steps=2"), tmp_path / "once")
    assert json.loads((tmp_path / "once" / "run_info.json").read_text())["passes"] < 1
    assert not any("reads its training text" in r.message for r in caplog.records)
