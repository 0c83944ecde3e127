"""Data loading, packing, the built-in corpus, and stored reference losses."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import save_reference, tiny_model
from helpers import compose_train

import slm
import slm.reference.store as store_module
from slm.data import CorpusConfig, DataConfig, build, builtin_tokenizer, check_block_size
from slm.data.builtin import generate, solve
from slm.reference import check_vocab, load_stored, score_dataset

DOCS = ["first doc\nwith two lines", "second", "third document is a bit longer than the rest", "4th"]


def unpack(ds):
    """Every real token of a packed split, in order (padding dropped)."""
    return [t for row in ds for t, m in zip(row["input_ids"], row["attention_mask"]) if m]


def test_packing_round_trip_keeps_every_token_in_order(tmp_path):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in DOCS))
    cfg = DataConfig(
        source=str(tmp_path / "d.jsonl"),
        text_field="body",
        block_size=8,
        cache_dir=str(tmp_path / "c"),
        val_fraction=0.25,
        seed=1,
    )
    data = build(cfg)
    tok = data.tokenizer
    texts = []
    for split in ("validation", "train"):
        ds = data[split]
        assert all(len(r["input_ids"]) == 8 for r in ds)
        for r in ds:  # labels are the ids, -100 exactly on padding
            assert r["labels"] == [t if m else -100 for t, m in zip(r["input_ids"], r["attention_mask"])]
        texts.append(unpack(ds))
    # train blocks are shuffled: compare as multisets; validation keeps document order.
    val_docs = tok.decode(texts[0]).split(tok.eos_token)[:-1]
    assert len(val_docs) == 1 and val_docs[0] in DOCS
    all_ids = sorted(texts[0] + texts[1])
    expected = []
    for d in DOCS:
        expected += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert all_ids == sorted(expected)


def test_unshuffled_packing_is_exact_concatenation():
    import datasets

    from slm.data import pack

    tok = builtin_tokenizer()
    ds = pack(datasets.Dataset.from_dict({"text": DOCS}), tok, block_size=5)
    flat = [t for r in ds for t in r["input_ids"]]
    n = sum(len(d) + 1 for d in DOCS)
    assert tok.decode(flat[:n]) == "<eos>".join(DOCS) + "<eos>"
    assert set(flat[n:]) <= {tok.pad_token_id} and len(flat) - n < 5


def test_order_is_deterministic_for_a_seed_and_cached(tmp_path):
    cfg = dict(builtin={"n_train_docs": 60, "n_clean_docs": 10, "n_val_docs": 5}, block_size=32)
    a = build(DataConfig(**cfg, seed=0, cache_dir=str(tmp_path / "a")))
    b = build(DataConfig(**cfg, seed=0, cache_dir=str(tmp_path / "b")))
    c = build(DataConfig(**cfg, seed=1, cache_dir=str(tmp_path / "a")))
    assert a["train"]["input_ids"] == b["train"]["input_ids"]
    assert a["train"]["input_ids"] != c["train"]["input_ids"]
    assert sorted(map(tuple, a["train"]["input_ids"])) == sorted(map(tuple, c["train"]["input_ids"]))
    again = build(DataConfig(**cfg, seed=0, cache_dir=str(tmp_path / "a")))
    assert again["train"].cache_files[0]["filename"].startswith(str(tmp_path / "a" / "packed"))
    assert again.identity == a.identity


@pytest.mark.parametrize("fmt", ["txt", "parquet", "folder"])
def test_local_formats(tmp_path, fmt):
    if fmt == "txt":
        (tmp_path / "a.txt").write_text("\n\n".join(DOCS))
        src = str(tmp_path / "a.txt")
    elif fmt == "parquet":
        pd.DataFrame({"text": DOCS}).to_parquet(tmp_path / "a.parquet")
        src = str(tmp_path / "*.parquet")
    else:
        (tmp_path / "f").mkdir()
        for i, d in enumerate(DOCS):
            (tmp_path / "f" / f"{i}.jsonl").write_text(json.dumps({"text": d}) + "\n")
        src = str(tmp_path / "f")
    data = build(DataConfig(source=src, block_size=16, val_fraction=0.25, cache_dir=str(tmp_path / "c")))
    n_tokens = sum(len(d) + 1 for d in DOCS)  # the built-in tokenizer is one token per character
    assert sum(sum(r["attention_mask"]) for s in ("train", "validation") for r in data[s]) == n_tokens


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no data files"):
        build(DataConfig(source=str(tmp_path / "missing.jsonl"), cache_dir=str(tmp_path)))
    (tmp_path / "e.jsonl").write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(ValueError, match="text_field='text'.*content"):
        build(DataConfig(source=str(tmp_path / "e.jsonl"), cache_dir=str(tmp_path)))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="no documents"):
        build(DataConfig(source=str(tmp_path / "empty.txt"), cache_dir=str(tmp_path)))
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="could not read"):
        build(DataConfig(source=str(tmp_path / "bad.jsonl"), cache_dir=str(tmp_path)))
    with pytest.raises(ValueError, match="block_size"):
        DataConfig(block_size=1)
    with pytest.raises(ValueError, match="larger than the model allows"):
        check_block_size(tiny_model("gpt2").config, 65)
    with pytest.raises(ValueError, match="noise"):
        CorpusConfig(noise=1.5)


def test_corpus_answers_follow_from_prompts():
    docs = generate(CorpusConfig(n_val_docs=20), "validation")
    for d in docs:
        for start, end in d["answer_spans"]:
            expr = d["text"][:start].rsplit(";", 1)[-1].rstrip("=")  # e.g. "7*8"
            op = next(o for o in "+-*" if o in expr)
            a, b = expr.split(op)
            assert d["text"][start:end] == f"{solve(int(a), op, int(b))};"
    train = generate(CorpusConfig(n_train_docs=200, noise=0.5), "train")
    n_noise = sum(len(d["noise_spans"]) for d in train)
    n_clean = sum(len(d["answer_spans"]) for d in train)
    assert 0.4 < n_noise / (n_noise + n_clean) < 0.6


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
    for d in generate(CorpusConfig(n_train_docs=40), "train"):
        enc = tok(d["text"], add_special_tokens=False, return_offsets_mapping=True)
        ids = torch.tensor([enc["input_ids"]])
        tl = slm.token_losses(model.eval(), ids, ids)[0]
        for spans, out in ((d["answer_spans"], clean), (d["noise_spans"], noise)):
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
    score_dataset(ref, data["train"], out, expected, batch_size=7)
    stored = load_stored(out, expected)
    n = len(data["train"])
    live = slm.token_losses(ref, torch.tensor(data["train"]["input_ids"]), torch.tensor(data["train"]["labels"]),
                            attention_mask=torch.tensor(data["train"]["attention_mask"]))  # fmt: skip
    assert torch.equal(stored.rows(range(n)), live)  # float32 shards: bit-exact on disk
    assert torch.equal(stored.rows([5, 0, 5]), live[[5, 0, 5]])  # any rows, in any order
    assert not (out / "dataset").exists() and sum(f.stat().st_size for f in out.rglob("*.npy")) <= 4.5 * live.numel()
    # bfloat16: half the size, the values rounded to bfloat16
    score_dataset(ref, data["train"], tmp_path / "bf16", expected, batch_size=7, dtype="bfloat16")
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
    import slm.reference.scoring as reference

    real, calls = reference.score_blocks, []

    def dies(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(reference, "score_blocks", dies)
    return real


def test_scoring_resumes_instead_of_starting_over(tmp_path, monkeypatch):
    import slm.reference.scoring as reference

    data = build(DataConfig(builtin={"n_train_docs": 200, "n_clean_docs": 5, "n_val_docs": 5}, block_size=16,
                            cache_dir=str(tmp_path / "c")))  # fmt: skip
    monkeypatch.setattr(reference, "CHUNK_TOKENS", 100 * 16)  # 100 blocks per chunk
    ref = tiny_model("llama", vocab=len(data.tokenizer))
    n_chunks = -(-len(data["train"]) // 100)
    assert n_chunks >= 3
    real = interrupt_scoring_at_chunk(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        score_dataset(ref, data["train"], tmp_path / "s", {})
    assert len(list((tmp_path / "s" / "parts").glob("*.json"))) == 3  # identity.json + 2 chunks
    calls = []
    monkeypatch.setattr(reference, "score_blocks", lambda *a, **k: calls.append(1) or real(*a, **k))
    score_dataset(ref, data["train"], tmp_path / "s", {})
    assert len(calls) == n_chunks - 2  # only the missing chunks
    stored = load_stored(tmp_path / "s", {})
    assert len(stored.meta["shards"]["ref_loss"]) == n_chunks
    train = data["train"]
    live = slm.token_losses(ref, torch.tensor(train["input_ids"]), torch.tensor(train["labels"]))
    assert torch.equal(stored.rows(range(len(train))), live)


def test_vocabulary_mismatch_refused(tmp_path):
    with pytest.raises(ValueError, match="vocabulary"):
        check_vocab(tiny_model("llama", vocab=100), tiny_model("llama", vocab=120))
    from slm.cli import train

    ref = tiny_model("llama", vocab=50)
    save_reference(ref, tmp_path / "ref")
    with pytest.raises(ValueError, match="vocabulary"):
        train(
            compose_train(tmp_path / "cache", "reference=live", f"reference.path={tmp_path / 'ref'}"), tmp_path / "run"
        )


@pytest.mark.slow
def test_two_process_scoring_equals_one_process(tmp_path):
    """slm-score sharded over 2 processes (torchrun, gloo) stores the same column as 1 process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from helpers import TINY

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


def test_hub_source_unreachable_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="could not load this hub dataset"):
        build(DataConfig(source="no-such-org/no-such-dataset", cache_dir=str(tmp_path)))


def test_tokenizer_from_a_local_folder(tmp_path):
    builtin_tokenizer().save_pretrained(tmp_path / "tok")
    (tmp_path / "d.txt").write_text("\n\n".join(DOCS))
    a = build(DataConfig(source=str(tmp_path / "d.txt"), tokenizer=str(tmp_path / "tok"), block_size=16,
                         val_fraction=0.25, cache_dir=str(tmp_path / "c")))  # fmt: skip
    b = build(DataConfig(source=str(tmp_path / "d.txt"), block_size=16, val_fraction=0.25,
                         cache_dir=str(tmp_path / "c2")))  # fmt: skip
    assert a["train"]["input_ids"] == b["train"]["input_ids"]
    assert a.identity["tokenizer"]["vocab_sha256"] == b.identity["tokenizer"]["vocab_sha256"]
    with pytest.raises(ValueError, match="could not load a tokenizer"):
        build(DataConfig(source=str(tmp_path / "d.txt"), tokenizer=str(tmp_path / "nope"), cache_dir=str(tmp_path)))


# --- issue 12 #5, #6: stores are verified, references never mixed -------------------------------------


def _store(tmp_path, name="s", chunk_tokens=None, monkeypatch=None):
    data = build(DataConfig(builtin={"n_train_docs": 30, "n_clean_docs": 5, "n_val_docs": 5}, block_size=32,
                            cache_dir=str(tmp_path / "c")))  # fmt: skip
    import slm.reference.scoring as reference
    from slm.reference import expected_store, reference_identity

    if chunk_tokens:
        monkeypatch.setattr(reference, "CHUNK_TOKENS", chunk_tokens)
    ref = tiny_model("llama", vocab=len(data.tokenizer))
    meta = {**expected_store(data), "reference": reference_identity(ref, "ref-a")}
    score_dataset(ref, data["train"], tmp_path / name, meta, batch_size=8)
    return data, expected_store(data), tmp_path / name


def _shards(store) -> list:
    return sorted((store / "ref_loss").glob("*.npy"))


@pytest.mark.parametrize(
    "tamper, match",
    [
        ("value", "ref_loss/000000000000.npy is not what slm-score wrote"),
        ("truncate", "is 100 bytes, not"),
        ("missing", "is missing"),
        ("name", "was edited after slm-score wrote it"),
        ("json", "is not valid JSON"),
        ("data", "were made for other data: the store has data_hash="),
    ],
)
def test_a_tampered_store_is_refused_naming_what_differs(tmp_path, tamper, match):
    data, expected, store = _store(tmp_path)
    load_stored(store, expected)  # intact: accepted
    shard = _shards(store)[0]
    if tamper == "value":  # the same size, one value changed
        values = np.load(shard)
        values[0, 3] += 1.0
        np.save(shard, values)
    elif tamper == "truncate":
        with open(shard, "r+b") as f:
            f.truncate(100)
    elif tamper == "missing":
        shard.unlink()
    elif tamper == "name":
        meta = json.loads((store / "slm_ref.json").read_text())
        meta["reference"]["name"] = "ref-b"
        (store / "slm_ref.json").write_text(json.dumps(meta))
    elif tamper == "json":
        (store / "slm_ref.json").write_text("{not json")
    else:
        expected = {**expected, "data_hash": "0123"}
    with pytest.raises(ValueError, match=match):
        load_stored(store, expected)


def test_a_store_opens_in_o_shards_and_checks_the_others_when_read(tmp_path, monkeypatch):
    """Opening checks every shard's size and hashes a sample; an edited shard outside the sample is
    refused when first read (training stops on every process at that step), and by --verify."""
    from slm.cli import verify_stores

    data, expected, store = _store(tmp_path, chunk_tokens=4 * 32, monkeypatch=monkeypatch)  # 4 blocks per shard
    shards = _shards(store)
    assert len(shards) >= 8
    hashed = []
    real = store_module.file_sha256
    monkeypatch.setattr(store_module, "file_sha256", lambda p: hashed.append(p) or real(p))
    columns = load_stored(store, expected)
    assert len(hashed) == store_module.SAMPLED_SHARDS  # not every shard
    unsampled = next(p for p in shards if p not in hashed)
    values = np.load(unsampled)
    values[1, 5] = 123.0
    np.save(unsampled, values)
    columns = load_stored(store, expected)  # still opens: only sizes and the sample are checked
    first = int(unsampled.stem)
    columns.rows([0])  # an intact shard reads
    with pytest.raises(ValueError, match=f"{unsampled.name} is not what slm-score wrote"):
        columns.rows([first])
    with pytest.raises(ValueError, match="is not what slm-score wrote"):
        verify_stores([str(store)])


def test_slm_score_never_mixes_references_in_one_out_dir(tmp_path, monkeypatch):
    import slm.reference.scoring as reference
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
    monkeypatch.setattr(reference, "score_blocks", real)
    with pytest.raises(ValueError, match="holds chunks scored by a killed run with another reference"):
        score(cfg("ref_b", "killed"))
    store = score(cfg("ref_a", "killed"))  # the same reference resumes
    assert load_stored(store, {}).meta["reference"]["name"] == str(tmp_path / "ref_a")


def test_a_live_reference_with_another_tokenizer_of_the_same_size_is_refused(tmp_path):
    """Same vocabulary size, other ids for other tokens (as Llama-2 vs Mistral-7B v0.1): refused."""
    from transformers import PreTrainedTokenizerFast

    from slm.cli import train

    tok = builtin_tokenizer()
    vocab = tok.get_vocab()
    swapped = {t: vocab[u] for t, u in zip(vocab, reversed(list(vocab)))}  # the same tokens, other ids
    other = PreTrainedTokenizerFast(tokenizer_object=_word_level(swapped), eos_token="<eos>", pad_token="<pad>",
                                    unk_token="<unk>")  # fmt: skip
    assert len(other) == len(tok)
    save_reference(tiny_model("llama", vocab=len(tok)), tmp_path / "other", tokenizer=other)
    live = ("reference=live", f"reference.path={tmp_path / 'other'}")
    with pytest.raises(ValueError, match=r"reference's tokenizer .*is not the training tokenizer \(builtin"):
        train(compose_train(tmp_path / "cache", *live), tmp_path / "run")
    tiny_model("llama", vocab=len(tok)).save_pretrained(tmp_path / "bare")  # no tokenizer to compare with
    with pytest.raises(ValueError, match="has no tokenizer that loads.*reference.check_tokenizer=false"):
        train(compose_train(tmp_path / "cache", "reference=live", f"reference.path={tmp_path / 'bare'}"),
              tmp_path / "run2")  # fmt: skip
    # the explicit override trains with it
    train(compose_train(tmp_path / "cache", *live, "reference.check_tokenizer=false", "trainer.max_steps=1"),
          tmp_path / "run3")  # fmt: skip


def _word_level(vocab: dict):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Split(Regex(r".|\n"), behavior="isolated")
    return t


def test_a_replaced_file_with_the_same_size_and_time_is_packed_again(tmp_path):
    """cp -p / rsync -a keep a replaced file's size and modification time: the content decides."""
    import os

    text = tmp_path / "d.txt"
    text.write_text("\n\n".join(DOCS))
    cfg = DataConfig(source=str(text), block_size=16, val_fraction=0.25, cache_dir=str(tmp_path / "c"))
    first = build(cfg)["train"]["input_ids"]
    stat = text.stat()
    text.write_text("\n\n".join(d.swapcase() for d in DOCS))  # same size, other bytes
    os.utime(text, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert text.stat().st_size == stat.st_size and text.stat().st_mtime_ns == stat.st_mtime_ns
    again = build(cfg)["train"]["input_ids"]
    assert again != first
    assert build(cfg)["train"]["input_ids"] == again  # unchanged files: the cache is reused


def test_a_pinned_hub_revision_is_part_of_the_packed_cache_key():
    from slm.data.config import source_identity

    a, b = (source_identity(DataConfig(source="org/corpus", hub_revision=r)) for r in (None, "v2"))
    assert a != b and b["revision"] == "v2"
