"""Every bad input file gets an error that names the file, row or setting, and the way on; long
documents are tokenised in bounded pieces with the same tokens."""

import json

import pytest

from slm.data import DataConfig, build, builtin_tokenizer


def _build(tmp_path, name: str, content: bytes, **kw):
    (tmp_path / name).write_bytes(content)
    return build(DataConfig(source=str(tmp_path / name), cache_dir=str(tmp_path / "c"), block_size=16, **kw))


def test_bytes_that_are_not_utf8_are_located(tmp_path):
    with pytest.raises(ValueError, match=r"not UTF-8 text \(.*latin.jsonl, line 2: byte 0xe9.*iconv"):
        _build(tmp_path, "latin.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n')


def test_a_missing_null_or_non_text_field_names_the_rows(tmp_path):
    rows = b'{"text": "a"}\n{"text": null}\n{"other": 1}\n{"text": 5}\n'
    with pytest.raises(ValueError, match=r"row 1: missing or null; row 2: missing or null; row 3: int 5"):
        _build(tmp_path, "nulls.jsonl", rows)


def test_blank_files_and_single_documents(tmp_path):
    with pytest.raises(ValueError, match="no documents .*only blank lines"):
        _build(tmp_path, "blank.txt", b"\n\n   \n\n")
    with pytest.raises(ValueError, match="holds 1 document: carving a validation split .* needs at least 2"):
        _build(tmp_path, "one.txt", b"only one paragraph here\n")


def test_non_ascii_text_with_the_builtin_tokenizer_is_reported(tmp_path):
    text = "h\u00e9llo w\u00f6rld, this is caf\u00e9\n\nsecond doc\n\nthird doc\n".encode()
    with pytest.warns(UserWarning, match=r"% of the characters of the .* split are not printable ASCII"):
        _build(tmp_path, "utf.txt", text)


def test_a_long_document_is_tokenised_in_bounded_pieces_with_the_same_tokens(tmp_path, monkeypatch):
    import slm.data.packing as data

    monkeypatch.setattr(data, "PIECE_CHARS", 1000)
    words = " ".join(f"w{i % 97}" for i in range(3000))  # ~13k characters on one line
    docs = [words, "short one", "another doc", "and a third"]
    (tmp_path / "long.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tok = builtin_tokenizer()
    seen = []
    real_call = type(tok).__call__

    def spy(self, text, *a, **k):
        seen.extend(len(t) for t in (text if isinstance(text, list) else [text]))
        return real_call(self, text, *a, **k)

    monkeypatch.setattr(type(tok), "__call__", spy)
    packed = build(DataConfig(source=str(tmp_path / "long.jsonl"), cache_dir=str(tmp_path / "c"), block_size=64,
                              val_fraction=0.25))  # fmt: skip
    monkeypatch.undo()
    assert max(seen) <= 1000 and sum(seen) == sum(map(len, docs))
    # the packed tokens are exactly each document's tokens followed by <eos> (no token lost or added)
    ids = [t for s in ("train", "validation") for r in packed[s] for t, m in zip(r["input_ids"], r["attention_mask"])
           if m]  # fmt: skip
    expected = [t for d in docs for t in tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    assert sorted(ids) == sorted(expected)
    validation = [t for r in packed["validation"] for t, m in zip(r["input_ids"], r["attention_mask"]) if m]
    assert tok.decode(validation).split(tok.eos_token)[0] in docs  # one whole document, in order
