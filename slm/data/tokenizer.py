"""Tokenizers: any HF tokenizer by name or path, or the built-in character tokenizer."""

from __future__ import annotations

import hashlib
import json

from slm.data.subword import identity_name

BUILTIN = "builtin"
SPECIALS = ["<pad>", "<eos>", "<unk>"]


def builtin_tokenizer():
    """A character-level HF fast tokenizer over printable ASCII: no download, exact offsets."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n", "\t"]
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r".|\n"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>", model_max_length=1 << 30
    )
    fast.name_or_path = BUILTIN
    return fast


def load_tokenizer(name: str):
    """``"builtin"``, a hub name or a local folder with tokenizer files (``bpe:<n>`` is trained on a corpus:
    :func:`slm.data.resolve_tokenizer`)."""
    if name == BUILTIN:
        return builtin_tokenizer()
    if isinstance(name, str) and name.startswith("bpe:"):
        raise ValueError(
            f"tokenizer {name!r} is trained on a corpus: load it with slm.data.resolve_tokenizer(data settings), or "
            "give the folder slm-train printed when it trained it"
        )
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name)
    except OSError as e:
        raise ValueError(
            f"data.tokenizer={name!r}: could not load a tokenizer from the hub or that path ({e}). Use a local "
            "folder with the model's tokenizer files (data.tokenizer=builtin only suits models built from config)"
        ) from e
    if tok.eos_token_id is None:
        raise ValueError(f"data.tokenizer={name!r} has no eos token; packing needs one between documents")
    return tok


def tokenizer_identity(tok) -> dict:
    """Name, size and a hash of the vocabulary: what a stored ref column must agree with."""
    vocab = json.dumps(sorted(tok.get_vocab().items()), ensure_ascii=True)
    return {
        "name": identity_name(tok) or str(tok.name_or_path),
        "vocab_size": len(tok),
        "vocab_sha256": hashlib.sha256(vocab.encode()).hexdigest()[:16],
    }
