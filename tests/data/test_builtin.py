"""The built-in corpora: the arithmetic corpus's answers follow from its prompts; the real-text corpus is
prose and junk half and half, with clean splits."""

import pytest

from slm.data import CorpusConfig
from slm.data.builtin import arithmetic_documents, solve


def test_corpus_answers_follow_from_prompts():
    docs = arithmetic_documents(CorpusConfig(n_val_docs=20), "validation")
    for d in docs:
        for start, end in d["answer_spans"]:
            expr = d["text"][:start].rsplit(";", 1)[-1].rstrip("=")  # e.g. "7*8"
            op = next(o for o in "+-*" if o in expr)
            a, b = expr.split(op)
            assert d["text"][start:end] == f"{solve(int(a), op, int(b))};"
    train = arithmetic_documents(CorpusConfig(n_train_docs=200, noise=0.5), "train")
    n_noise = sum(len(d["junk_spans"]) for d in train)
    n_clean = sum(len(d["answer_spans"]) for d in train)
    assert 0.4 < n_noise / (n_noise + n_clean) < 0.6


def test_the_realtext_corpus_is_prose_and_junk_half_and_half_with_clean_splits():
    from slm.data.realtext import RealTextConfig, realtext_documents

    cfg = RealTextConfig()
    splits = {s: [d["text"] for d in realtext_documents(cfg, s)] for s in ("train", "clean", "validation")}
    assert splits == {s: [d["text"] for d in realtext_documents(cfg, s)] for s in splits}  # deterministic
    assert min(len(v) for v in splits.values()) > 50
    printable = set(__import__("string").printable) - {"\x0b", "\x0c", "\r"}
    assert all(set(t) <= printable for v in splits.values() for t in v)  # the built-in tokenizer covers it
    clean_docs = set(splits["clean"]) | set(splits["validation"])
    assert not set(splits["clean"]) & set(splits["validation"])
    train_text = "\n\n".join(splits["train"])
    leaked = [d for d in clean_docs if d[:200] in train_text]
    assert not leaked  # no clean or held-out document appears in the training text
    paragraphs = _prose_paragraphs(cfg)
    prose = sum(len(p) for t in splits["train"] for p in t.split("\n\n") if p and p in paragraphs)
    assert 0.4 < prose / len(train_text) < 0.6  # about half of the training text is junk


def _prose_paragraphs(cfg):
    import re

    from slm.data import prose_documents

    return {p.strip("\n") for d in prose_documents(cfg.min_chars) for p in re.split(r"\n\s*\n", d) if p.strip()}


def test_the_realtext_clean_mask_marks_exactly_the_prose_characters():
    """Packed with the built-in character tokenizer (one token per character), the clean_mask tokens of the
    training split spell the prose paragraphs in order, and no junk character is marked (issue 28 item 1)."""
    import re

    from datasets import Dataset

    from slm.data import builtin_tokenizer
    from slm.data.packing import pack
    from slm.data.realtext import RealTextConfig, realtext_documents

    docs = realtext_documents(RealTextConfig(), "train")[:40]
    packed = pack(Dataset.from_list(docs), builtin_tokenizer(), 256)
    tok = builtin_tokenizer()
    marked, text = [], []
    for row in packed:
        ids = [i for i, a in zip(row["input_ids"], row["attention_mask"]) if a]
        chars = [tok.convert_ids_to_tokens(i) for i in ids]
        marked += [c for c, m in zip(chars, row["clean_mask"]) if m]
        text += chars
    paragraphs = _prose_paragraphs(RealTextConfig())
    expected = "".join(p for d in docs for p in d["text"].split("\n\n") if p in paragraphs)
    assert "".join(marked) == expected
    assert 0.4 < len(marked) / len(text) < 0.6
    assert not re.search(r"[A-Za-z0-9+/]{40,}", "".join(marked))  # no base64 / hex blob


@pytest.mark.parametrize("corpus", ["builtin", "realtext"])
def test_every_junk_token_is_labelled_with_its_kind(corpus):
    """Packed with the character tokenizer (one token per character), each token's junk_kind is the kind of the
    junk span its character lies in, 0 outside junk and on the end-of-document token; the built-in corpus's
    wrong answers follow their '=' and its junk problems are letters."""
    from datasets import Dataset

    from slm.data import builtin_tokenizer
    from slm.data.packing import pack

    if corpus == "builtin":
        from slm.data.builtin import JUNK_KINDS

        docs = arithmetic_documents(CorpusConfig(n_train_docs=30, noise=0.5), "train")
    else:
        from slm.data.realtext import JUNK_KINDS, RealTextConfig
        from slm.data.realtext import realtext_documents as generate_realtext

        docs = generate_realtext(RealTextConfig(), "train")[:30]
    expected = []
    for d in docs:
        kinds = [0] * len(d["text"])
        for s, e, k in d["junk_spans"]:
            kinds[s:e] = [k] * (e - s)
            if JUNK_KINDS[k - 1] == "wrong_answer":
                assert d["text"][s - 1] == "=" and d["text"][s : e - 1].isdigit()
            if JUNK_KINDS[k - 1] == "junk_problem":
                assert d["text"][s : e - 1].isalpha()
        expected += [*kinds, 0]
    packed = pack(Dataset.from_list(docs), builtin_tokenizer(), 64)
    got = [k for row in packed for k, m in zip(row["junk_kind"], row["attention_mask"]) if m]
    assert got == expected
    assert set(got) == set(range(len(JUNK_KINDS) + 1))  # every kind occurs


def test_the_realtext_prose_splits_into_help_topics_and_docstrings_and_cuts_into_pieces():
    """prose=topics and prose=docstrings are the two halves of prose=all (the continued-pretraining demo's domain
    and its base's general text); piece_chars cuts documents at paragraph breaks without losing a character; the
    default settings keep the corpus identity (and so every cache) of the corpus before these settings."""
    from slm.data import prose_documents
    from slm.data.realtext import RealTextConfig, pieces, realtext_documents

    topics, docstrings, every = (set(prose_documents(200, p)) for p in ("topics", "docstrings", "all"))
    assert topics and docstrings and not topics & docstrings and topics | docstrings == every
    assert len(topics) < 100 < len(docstrings)  # 79 help topics; thousands of docstrings
    doc = max(topics, key=len)
    cut = pieces(doc, 1500, 200)
    assert len(cut) > 5 and "\n\n".join(cut) == "\n\n".join(p.strip("\n") for p in doc.split("\n\n") if p.strip())
    assert all(len(p) >= 200 for p in cut) and all(len(p) >= 1500 for p in cut[:-1])
    cfg = RealTextConfig(prose="topics", piece_chars=1500, validation_share=0.1)
    val = realtext_documents(cfg, "validation")
    assert len(val) > 20 and all(any(d["text"].split("\n\n")[0] in t for t in topics) for d in val)
    assert "prose" not in RealTextConfig().identity() and "piece_chars" not in RealTextConfig().identity()
    assert cfg.identity()["prose"] == "topics"
    with pytest.raises(ValueError, match="data.realtext.prose"):
        RealTextConfig(prose="wiki")
