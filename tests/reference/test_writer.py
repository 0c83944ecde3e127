"""A reference scored into a store: trained on clean text it separates answers from noise; the stored
column equals live scores; scoring resumes, equals one process on two, never mixes references."""

import json

import numpy as np
import pytest
import torch
from support.archs import save_reference, tiny_model
from support.compose import compose_train

import slm
from slm.data import CorpusConfig, DataConfig, build, builtin_tokenizer
from slm.data.builtin import arithmetic_documents
from slm.reference import check_vocab, load_stored, write_store


def _word_level(vocab: dict):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Split(Regex(r".|\n"), behavior="isolated")
    return t


def test_reference_trained_on_clean_split_separates_answers_from_noise(tmp_path):
    """The built-in corpus's point: a reference trained on clean data finds noise hard."""
    from slm.model import build_model

    cfg = compose_train(
        tmp_path / "cache",
        "reference=none",
        "selector=all",
        "trainer.max_steps=150",
        "trainer.eval_every=150",
        "trainer.checkpoint_every=1000",
        "trainer.lr=1e-2",
        "model.config.hidden_size=64",
        "model.config.intermediate_size=128",
    )
    data = build(cfg.data)
    from accelerate import Accelerator

    from slm.train import TrainConfig, Trainer

    model = build_model(cfg.model, len(data.tokenizer), 0)
    tcfg = TrainConfig(**cfg.trainer)
    Trainer(
        Accelerator(cpu=True),
        slm.SelectiveLM(model, ratio=1.0),
        data["clean"],
        data["validation"],
        tcfg,
        tmp_path / "ref",
    ).fit()
    tok = data.tokenizer
    clean, noise = [], []
    for d in arithmetic_documents(CorpusConfig(n_train_docs=40), "train"):
        enc = tok(d["text"], add_special_tokens=False, return_offsets_mapping=True)
        ids = torch.tensor([enc["input_ids"]])
        tl = slm.token_losses(model.eval(), ids, ids)[0]
        for spans, out in ((d["answer_spans"], clean), ([j[:2] for j in d["junk_spans"]], noise)):
            for s, e in spans:
                out += [tl[i].item() for i, (a, b) in enumerate(enc["offset_mapping"]) if s <= a and b <= e and i]
    assert np.mean(noise) > np.mean(clean) + 1.5, (np.mean(clean), np.mean(noise))


def test_stored_column_equals_live_scores_and_survives_disk(tmp_path):
    data = build(DataConfig(builtin={"n_train_docs": 30, "n_clean_docs": 5, "n_val_docs": 5}, block_size=32,
                            cache_dir=str(tmp_path / "c")))  # fmt: skip
    ref = tiny_model("llama", vocab=len(data.tokenizer))
    expected = {"tokenizer": data.identity["tokenizer"], "block_size": 32,
                "data_hash": data.identity["data_hash"]["train"]}  # fmt: skip
    out = tmp_path / "scores"
    write_store(ref, data["train"], out, expected, batch_size=7)
    stored = load_stored(out, expected)
    n = len(data["train"])
    live = slm.token_losses(ref, torch.tensor(data["train"]["input_ids"]), torch.tensor(data["train"]["labels"]),
                            attention_mask=torch.tensor(data["train"]["attention_mask"]))  # fmt: skip
    assert torch.equal(stored.rows(range(n)), live)  # float32 shards: bit-exact on disk
    assert torch.equal(stored.rows([5, 0, 5]), live[[5, 0, 5]])  # any rows, in any order
    assert not (out / "dataset").exists() and sum(f.stat().st_size for f in out.rglob("*.npy")) <= 4.5 * live.numel()
    # bfloat16: half the size, the values rounded to bfloat16
    write_store(ref, data["train"], tmp_path / "bf16", expected, batch_size=7, dtype="bfloat16")
    half = load_stored(tmp_path / "bf16", expected)
    assert torch.equal(half.rows(range(n)), live.bfloat16().float())
    with pytest.raises(ValueError, match="data_hash"):
        load_stored(out, {**expected, "data_hash": "other"})
    with pytest.raises(ValueError, match="tokenizer"):
        load_stored(out, {**expected, "tokenizer": {"name": "gpt2"}})
    with pytest.raises(FileNotFoundError, match="run slm-score first"):
        load_stored(tmp_path / "nothing", expected)


def interrupt_scoring_at_chunk(monkeypatch, n: int):
    """Make slm-score's ``n``-th chunk raise KeyboardInterrupt (a Ctrl-C mid-run); returns the real scorer."""
    import slm.reference.writer as reference

    real, calls = reference.block_losses, []

    def dies(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(reference, "block_losses", dies)
    return real


def test_scoring_resumes_instead_of_starting_over(tmp_path, monkeypatch):
    import slm.reference.writer as reference

    data = build(DataConfig(builtin={"n_train_docs": 200, "n_clean_docs": 5, "n_val_docs": 5}, block_size=16,
                            cache_dir=str(tmp_path / "c")))  # fmt: skip
    monkeypatch.setattr(reference, "CHUNK_TOKENS", 100 * 16)  # 100 blocks per chunk
    ref = tiny_model("llama", vocab=len(data.tokenizer))
    n_chunks = -(-len(data["train"]) // 100)
    assert n_chunks >= 3
    real = interrupt_scoring_at_chunk(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        write_store(ref, data["train"], tmp_path / "s", {})
    assert len(list((tmp_path / "s" / "parts").glob("*.json"))) == 3  # identity.json + 2 chunks
    calls = []
    monkeypatch.setattr(reference, "block_losses", lambda *a, **k: calls.append(1) or real(*a, **k))
    write_store(ref, data["train"], tmp_path / "s", {})
    assert len(calls) == n_chunks - 2  # only the missing chunks
    stored = load_stored(tmp_path / "s", {})
    assert len(stored.meta["shards"]["ref_loss"]) == n_chunks
    train = data["train"]
    live = slm.token_losses(ref, torch.tensor(train["input_ids"]), torch.tensor(train["labels"]))
    assert torch.equal(stored.rows(range(len(train))), live)


def test_vocabulary_mismatch_refused(tmp_path):
    with pytest.raises(ValueError, match="vocabulary"):
        check_vocab(tiny_model("llama", vocab=100), tiny_model("llama", vocab=120))
    from slm.cli import train_composed

    ref = tiny_model("llama", vocab=50)
    save_reference(ref, tmp_path / "ref")
    with pytest.raises(ValueError, match="vocabulary"):
        train_composed(
            compose_train(tmp_path / "cache", "reference=live", f"reference.path={tmp_path / 'ref'}"), tmp_path / "run"
        )


@pytest.mark.slow
def test_two_process_scoring_equals_one_process(tmp_path):
    """slm-score sharded over 2 processes (torchrun, gloo) stores the same column as 1 process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from support.compose import TINY

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # One fixed reference (the demo reference's cache key includes the process count that trains it)
    save_reference(tiny_model("llama", seed=3, vocab=len(builtin_tokenizer())), tmp_path / "ref")
    args = [o for o in TINY if o.startswith(("model.", "data."))] + [f"data.cache_dir={tmp_path / 'c'}"]
    args += ["reference=live", f"reference.path={tmp_path / 'ref'}"]
    exe = str(Path(sys.executable).with_name("slm-score"))
    subprocess.run([exe, *args, f"out_dir={tmp_path / 'one'}"], env=env, check=True, cwd=tmp_path)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--no-python", exe,
                    *args, f"out_dir={tmp_path / 'two'}"], env=env, check=True, cwd=tmp_path)  # fmt: skip
    one, two = (load_stored(tmp_path / d, {}) for d in ("one", "two"))
    assert one.meta["data_hash"] == two.meta["data_hash"] and two.meta["processes"] == 2
    assert torch.equal(one.rows(range(one.meta["rows"])), two.rows(range(two.meta["rows"])))


def test_slm_score_never_mixes_references_in_one_out_dir(tmp_path, monkeypatch):
    import slm.reference.writer as reference
    from slm.cli import score

    tok_size = len(builtin_tokenizer())
    save_reference(tiny_model("llama", seed=1, vocab=tok_size), tmp_path / "ref_a")
    save_reference(tiny_model("llama", seed=2, vocab=tok_size), tmp_path / "ref_b")

    def cfg(ref, out):
        return compose_train(tmp_path / "cache", "reference=live", f"reference.path={tmp_path / ref}",
                             f"out_dir={tmp_path / out}", config_name="score")  # fmt: skip

    score(cfg("ref_a", "done"))
    with pytest.raises(ValueError, match="come from reference .*ref_a.*not .*ref_b.*choose another out_dir"):
        score(cfg("ref_b", "done"))
    # a killed run's chunks are never resumed by another reference
    monkeypatch.setattr(reference, "CHUNK_TOKENS", 64 * 32)  # 64 blocks of 32 tokens
    real = interrupt_scoring_at_chunk(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        score(cfg("ref_a", "killed"))
    monkeypatch.setattr(reference, "block_losses", real)
    with pytest.raises(ValueError, match="holds chunks scored by a killed run with another reference"):
        score(cfg("ref_b", "killed"))
    store = score(cfg("ref_a", "killed"))  # the same reference resumes
    assert load_stored(store, {}).meta["reference"]["name"] == str(tmp_path / "ref_a")


def test_a_live_reference_with_another_tokenizer_of_the_same_size_is_refused(tmp_path):
    """Same vocabulary size, other ids for other tokens (as Llama-2 vs Mistral-7B v0.1): refused."""
    from transformers import PreTrainedTokenizerFast

    from slm.cli import train_composed

    tok = builtin_tokenizer()
    vocab = tok.get_vocab()
    swapped = {t: vocab[u] for t, u in zip(vocab, reversed(list(vocab)))}  # the same tokens, other ids
    other = PreTrainedTokenizerFast(tokenizer_object=_word_level(swapped), eos_token="<eos>", pad_token="<pad>",
                                    unk_token="<unk>")  # fmt: skip
    assert len(other) == len(tok)
    save_reference(tiny_model("llama", vocab=len(tok)), tmp_path / "other", tokenizer=other)
    live = ("reference=live", f"reference.path={tmp_path / 'other'}")
    with pytest.raises(ValueError, match=r"reference's tokenizer .*is not the training tokenizer \(builtin"):
        train_composed(compose_train(tmp_path / "cache", *live), tmp_path / "run")
    tiny_model("llama", vocab=len(tok)).save_pretrained(tmp_path / "bare")  # no tokenizer to compare with
    with pytest.raises(ValueError, match="has no tokenizer that loads.*reference.check_tokenizer=false"):
        train_composed(compose_train(tmp_path / "cache", "reference=live", f"reference.path={tmp_path / 'bare'}"),
              tmp_path / "run2")  # fmt: skip
    # the explicit override trains with it
    train_composed(compose_train(tmp_path / "cache", *live, "reference.check_tokenizer=false", "trainer.max_steps=1"),
          tmp_path / "run3")  # fmt: skip


def test_slm_score_into_a_folder_holding_other_columns_names_the_way_out(tmp_path, capsys):
    """A store's dtype and columns decide its content: a second slm-score into the same out_dir with another
    store_dtype or entropy never reports the first store as 'these exact losses' (issue 26, items 8-9)."""
    from slm.cli import score

    def cfg(*extra):
        return compose_train(tmp_path / "cache", f"out_dir={tmp_path / 'x'}", *extra, config_name="score")

    store = score(cfg("store_dtype=bfloat16"))
    assert load_stored(store, {}).meta["dtype"] == "bfloat16"
    with pytest.raises(ValueError, match=r"holds bfloat16 reference losses.*store_dtype=float32.*another out_dir"):
        score(cfg())  # float32 asked for: not reused
    with pytest.raises(ValueError, match=r"no ref_entropy column.*out_dir=<another folder> entropy=true"):
        score(cfg("store_dtype=bfloat16", "entropy=true"))
    assert "reused" in (score(cfg("store_dtype=bfloat16")) and capsys.readouterr().out)  # the same asks: reused
    both = score(compose_train(tmp_path / "cache", f"out_dir={tmp_path / 'y'}", "entropy=true", config_name="score"))
    assert set(load_stored(both, {"entropy": True}).meta["shards"]) == {"ref_loss", "ref_entropy"}
    score(compose_train(tmp_path / "cache", f"out_dir={tmp_path / 'y'}", config_name="score"))  # a subset: reused


def test_the_quality_of_a_reference_slm_trained_is_reported_and_recorded(tmp_path, capsys):
    """reference=train / demo: the reference's quality (its eval losses, measured on the run's own eval sets, and
    its steps from its cache's result.json) is printed by slm-score and slm-train and recorded in every run's
    run_info (issues 28 item 6, 30 item 1, 37 item 9)."""
    from slm.cli import score, train_composed

    store = score(compose_train(tmp_path / "cache", config_name="score"))
    printed = capsys.readouterr().out
    result = json.loads((next((tmp_path / "cache" / "reference").glob("*/DONE")).parent / "result.json").read_text())
    assert f"reference quality: eval/validation/loss={round(result['eval/validation/loss'], 4)}" in printed
    assert f"after {result['step']} steps of its own training" in printed
    train_composed(
        compose_train(tmp_path / "cache", "reference=stored", f"reference.scores_dir={store}"), tmp_path / "run"
    )
    quality = json.loads((tmp_path / "run" / "run_info.json").read_text())["reference_quality"]
    # measured on this run's eval sets, which are the reference's own here: the loss its training logged
    assert quality["eval/loss"] == pytest.approx(result["eval/loss"], abs=1e-4) and quality["steps"] == result["step"]
    assert quality["measured_on"] == "this run's eval sets"
    train_composed(compose_train(tmp_path / "cache", "reference=none"), tmp_path / "plain")
    assert json.loads((tmp_path / "plain" / "run_info.json").read_text())["reference_quality"] is None
