"""A subword tokenizer trained on the run's own text: ``data.tokenizer=bpe:<vocabulary size>``.

A byte-level BPE (the ``tokenizers`` library) for models built from config: trained on the corpus's
training text and the reference's clean text (the built-in corpora's ``train`` and ``clean`` splits;
for other sources the training text and the ``data.tokenizer_text`` sources, which slm-train fills with
``reference.data``), never on a validation or eval split. Training is deterministic (documents in their
order, one thread), and the result is cached as an ordinary tokenizer folder under
``<cache>/tokenizers/<hash of the vocabulary size and every document>``, so the packed data, reference
stores and saved models all name it by the same identity and any HF code loads it
(``AutoTokenizer.from_pretrained(folder)``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

from slm.data.locks import CacheLock

log = logging.getLogger(__name__)

PREFIX = "bpe:"
VERSION = 1  # bump when the training recipe changes: older caches are then never reused
MARKER = "slm_tokenizer.json"
SPECIALS = ["<pad>", "<eos>", "<unk>"]
MIN_VOCAB = 256 + len(SPECIALS) + 1  # every byte, the specials, at least one merge


def bpe_size(name: str | None) -> int | None:
    """The vocabulary size of ``bpe:<n>`` (None for any other tokenizer name); a bad size is an error."""
    if not isinstance(name, str) or not name.startswith(PREFIX):
        return None
    try:
        size = int(name[len(PREFIX) :])
    except ValueError:
        raise ValueError(f"data.tokenizer={name!r}: give the vocabulary size, e.g. bpe:8192") from None
    if size < MIN_VOCAB:
        raise ValueError(
            f"data.tokenizer={name!r}: a byte-level BPE needs at least {MIN_VOCAB} tokens (256 bytes, "
            f"{len(SPECIALS)} specials and a merge)"
        )
    return size


def train_bpe(texts: Iterable[str], vocab_size: int, name: str | None = None):
    """A byte-level BPE of ``vocab_size`` tokens trained on ``texts`` (in order), as an HF fast tokenizer
    with ``<pad>``, ``<eos>`` and ``<unk>``. The same texts give the same tokenizer, token for token.
    ``name`` is saved in its ``tokenizer_config.json`` (``slm_tokenizer``): its identity wherever it is copied."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    os.environ.setdefault("RAYON_NUM_THREADS", "1")  # merge order must not depend on threads' timing
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    named = {} if name is None else {"slm_tokenizer": name}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=1 << 30,
        **named,
    )


def cached_bpe(
    key: str, texts: Callable[[], dict[str, list[str]]], vocab_size: int, cache_dir: str | os.PathLike
) -> Path:
    """The folder of the BPE trained on ``texts()`` (name -> documents), trained once and cached under ``key``
    (the caller's hash of :data:`VERSION`, the vocabulary size and what the texts are: the sources' identities,
    which hash local files' contents and name a hub dataset's revision); concurrent jobs wait for the first
    (:mod:`slm.data.locks`)."""
    where = Path(cache_dir).expanduser() / "tokenizers" / f"bpe{vocab_size}-{key}"
    with CacheLock(where, f"the tokenizer {where}"):
        if (where / MARKER).exists():
            return where
        shutil.rmtree(where, ignore_errors=True)
        named_texts = texts()
        n = sum(len(t) for t in named_texts.values())
        log.info("data: training a byte-level BPE of %d tokens on %d documents (%s) -> %s", vocab_size, n,
                 ", ".join(sorted(named_texts)), where)  # fmt: skip
        texts_in_order = (t for name in sorted(named_texts) for t in named_texts[name])
        tok = train_bpe(texts_in_order, vocab_size, name=f"{PREFIX}{vocab_size}:{key}")
        tmp = where.with_name(where.name + f".tmp{os.getpid()}")
        tok.save_pretrained(str(tmp))
        info = {"kind": "bpe", "vocab_size": vocab_size, "key": key, "version": VERSION,
                "trained_on": {name: len(texts) for name, texts in named_texts.items()}}  # fmt: skip
        (tmp / MARKER).write_text(json.dumps(info, indent=1))
        os.replace(tmp, where)
    return where


def identity_name(tokenizer) -> str | None:
    """``bpe:<size>:<hash>`` for a tokenizer :func:`cached_bpe` trained, wherever it was saved since (a run's
    ``model/`` folder included) and on every machine; None for any other tokenizer."""
    name = (getattr(tokenizer, "init_kwargs", None) or {}).get("slm_tokenizer")
    return name if isinstance(name, str) and name.startswith(PREFIX) else None
