"""Documents -> packed blocks: every token kept in order, deterministic and cached, local formats,
clear errors, tokenizers from folders, cache keys that notice changed files and pinned revisions."""

import json

import pandas as pd
import pytest
from support.archs import tiny_model

from slm.data import CorpusConfig, DataConfig, build, builtin_tokenizer, check_block_size

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
    from slm.data.spec import source_identity

    a, b = (source_identity(DataConfig(source="org/corpus", hub_revision=r)) for r in (None, "v2"))
    assert a != b and b["revision"] == "v2"


@pytest.mark.parametrize("fmt", ["txt", "jsonl"])
def test_a_source_of_several_files_labels_every_token_with_its_file(tmp_path, fmt):
    """Each file's documents are written in letters no other file uses, so a letter tells which file its token
    came from; every token (its document's end token too) carries that file's index, the documents come in the
    order of reading all files at once, and the run's label names are the file names."""
    import datasets

    from slm.data.sources import _load_files, data_files

    letters = ["abc", "def", "ghi"]
    for i, ls in enumerate(letters):
        docs = [" ".join(ls[j % 3] * (j + 2) for j in range(k + 3)) for k in range(4)]
        path = tmp_path / "f" / f"part{i}.{fmt}"
        path.parent.mkdir(exist_ok=True)
        path.write_text("\n\n".join(docs) if fmt == "txt" else "".join(json.dumps({"text": d}) + "\n" for d in docs))
    cfg = DataConfig(source=str(tmp_path / "f"), block_size=16, val_fraction=0.25, cache_dir=str(tmp_path / "c"))
    data = build(cfg)
    assert data.labels == {"source_id": [f"part{i}.{fmt}" for i in range(3)]}
    tok = data.tokenizer
    owner = {c: i for i, ls in enumerate(letters) for c in ls}
    n = 0
    for split in ("train", "validation"):
        for row in data[split]:
            chars = tok.convert_ids_to_tokens(row["input_ids"])
            for c, src, real in zip(chars, row["source_id"], row["attention_mask"]):
                if real and c in owner:
                    assert src == owner[c], (c, src)
                    n += 1
    assert n > 100
    kwargs = {"sample_by": "paragraph"} if fmt == "txt" else {}
    builder = "text" if fmt == "txt" else "json"
    together = datasets.load_dataset(builder, data_files=data_files(cfg.source), split="train", **kwargs)
    assert _load_files(cfg)["train"]["text"] == together["text"]


def test_documents_end_tokens_take_their_documents_source():
    import datasets

    from slm.data import pack

    tok = builtin_tokenizer()
    texts, sources = [*DOCS, ""], [0, 1, 1, 2, 3]  # an empty document is its end token alone
    ds = pack(datasets.Dataset.from_dict({"text": texts, "source_id": sources}), tok, block_size=5)
    labels = [s for r in ds for s, m in zip(r["source_id"], r["attention_mask"]) if m]
    assert labels == [s for d, s in zip(texts, sources) for _ in range(len(d) + 1)]


def test_a_field_of_the_files_named_like_slms_source_label_is_not_taken_for_it(tmp_path):
    """A jsonl field called source_id (text, here) is the files' own: it neither breaks packing nor becomes the
    audit's per-file label (one file: no label at all)."""
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d, "source_id": "web"}) + "\n" for d in DOCS))
    data = build(DataConfig(source=str(tmp_path / "d.jsonl"), block_size=8, val_fraction=0.25,
                            cache_dir=str(tmp_path / "c")))  # fmt: skip
    assert "source_id" not in data["train"].column_names and data.labels == {}
