"""data.tokenizer=bpe:<n>: a byte-level BPE trained on the run's own text, deterministic and cached by identity."""

import json

import pytest
from support.compose import compose_train

from slm.cli import train_composed
from slm.data import DataConfig, build, prose_documents, resolve_tokenizer, subword, tokenizer_identity


def test_the_same_texts_give_the_same_tokenizer_and_text_round_trips():
    texts = list(prose_documents())[:300]
    a, b = subword.train_bpe(iter(texts), 600), subword.train_bpe(iter(texts), 600)
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    assert len(a) == 600 and a.eos_token == "<eos>" and a.pad_token == "<pad>"
    sample = texts[0] + " base64: QUJDRA== \u00e9\u00e8 \u4e2d"  # bytes outside the training text too
    assert a.decode(a(sample)["input_ids"]) == sample
    assert len(a(texts[1])["input_ids"]) < len(texts[1]) / 2  # subwords, not characters
    other = subword.train_bpe(iter(texts[:150]), 600)
    assert other.backend_tokenizer.to_str() != a.backend_tokenizer.to_str()


def test_a_corpus_tokenizer_is_trained_once_and_named_the_same_from_any_cache(tmp_path, monkeypatch):
    cfg = dict(source="builtin", tokenizer="bpe:300", block_size=64)
    first = resolve_tokenizer(DataConfig(**cfg, cache_dir=str(tmp_path / "a")))
    trained = subword.train_bpe
    monkeypatch.setattr(subword, "train_bpe", lambda *a, **k: pytest.fail("trained again"))
    again = resolve_tokenizer(DataConfig(**cfg, cache_dir=str(tmp_path / "a")))
    assert again.name_or_path == first.name_or_path
    monkeypatch.setattr(subword, "train_bpe", trained)
    elsewhere = resolve_tokenizer(DataConfig(**cfg, cache_dir=str(tmp_path / "b")))
    assert tokenizer_identity(elsewhere) == tokenizer_identity(first)  # the identity does not name the path
    assert tokenizer_identity(first)["name"].startswith("bpe:300:")
    # the run on the clean split alone uses the same tokenizer as the run on the noisy mix
    clean = resolve_tokenizer(DataConfig(**cfg, train_split="clean", cache_dir=str(tmp_path / "a")))
    assert tokenizer_identity(clean) == tokenizer_identity(first)
    info = json.loads((tmp_path / "a" / "tokenizers").glob("bpe300-*").__next__().joinpath(subword.MARKER).read_text())
    assert info["trained_on"] == {"builtin:clean": pytest.approx(info["trained_on"]["builtin:clean"]),
                                  "builtin:train": info["trained_on"]["builtin:train"]}  # fmt: skip
    other_size = resolve_tokenizer(DataConfig(**{**cfg, "tokenizer": "bpe:280"}, cache_dir=str(tmp_path / "a")))
    assert tokenizer_identity(other_size) != tokenizer_identity(first)


def test_bad_sizes_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="give the vocabulary size, e.g. bpe:8192"):
        subword.bpe_size("bpe:big")
    with pytest.raises(ValueError, match="at least 260 tokens"):
        subword.bpe_size("bpe:100")


def test_a_run_trains_and_saves_with_its_subword_tokenizer(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = compose_train(tmp_path / "c", "model.tokenizer=bpe:300", "reference=none", "trainer.max_steps=2")
    train_composed(cfg, tmp_path / "run")
    saved = AutoTokenizer.from_pretrained(tmp_path / "run" / "model")
    data = build(cfg.data)
    assert tokenizer_identity(saved) == data.identity["tokenizer"] and len(saved) == 300
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert model.config.vocab_size == 300
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["status"] == "finished"


def test_a_store_made_with_another_tokenizer_is_refused(tmp_path):
    """A store of the character tokenizer's tokens cannot rank the subword run's: refused, naming the mismatch."""
    from slm.cli import score

    store = score(compose_train(tmp_path / "cache", config_name="score"))
    with pytest.raises(ValueError, match="tokenizer"):
        train_composed(compose_train(tmp_path / "cache", "model.tokenizer=bpe:300", "reference=stored",
                                     f"reference.scores_dir={store}"), tmp_path / "run")  # fmt: skip


def test_a_pretrained_model_keeps_its_own_tokenizer(tmp_path):
    from slm.cli.validation import validate
    from slm.recipes.settings import resolve_tokenizer_text

    cfg = compose_train(tmp_path / "c", "model.pretrained=some/model", "data.tokenizer=bpe:300", "reference=none")
    with pytest.raises(ValueError, match="model.pretrained=some/model has its own vocabulary"):
        resolve_tokenizer_text(validate(cfg))


def test_a_trained_references_own_text_joins_the_tokenizers(tmp_path):
    from slm.cli.validation import validate
    from slm.recipes.settings import resolve_tokenizer_text

    clean = tmp_path / "clean.txt"
    clean.write_text("A clean paragraph.\n\nAnother one.\n")
    cfg = compose_train(tmp_path / "c", "data.tokenizer=bpe:300", "reference=train", f"reference.data.source={clean}")
    settings = resolve_tokenizer_text(validate(cfg))
    assert [s.source for s in settings.data.tokenizer_text] == [str(clean)]
    builtin = resolve_tokenizer_text(validate(compose_train(tmp_path / "c", "data.tokenizer=bpe:300")))
    assert builtin.data.tokenizer_text == ()  # the demo's reference text is the corpus's clean split: in already
