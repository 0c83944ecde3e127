"""Documents -> tokens -> packed fixed-length blocks, cached by their settings. Imports nothing else from slm.

spec.py         DataConfig (data.*), SourceSpec (an eval set or a reference's text), PackedData
packing.py      build / build_split: tokenise, pack into blocks, cache under <cache_dir>/packed
sources.py      raw documents from the built-in corpora, local files or a hub dataset; hashes; eval overlap check
builtin.py      data.source=builtin: the arithmetic corpus (noisy training split, clean split)
realtext.py     data.source=realtext: English prose shipped with Python mixed with web-style junk
tokenizer.py    any HF tokenizer, or the built-in character tokenizer
subword.py      data.tokenizer=bpe:<n>: a byte-level BPE trained on the corpus, cached
locks.py        CacheLock: a cache entry prepared once by jobs that start together, on shared filesystems too
"""

from slm.data.builtin import CorpusConfig
from slm.data.locks import CacheLock, LockLost, wait_for_holder
from slm.data.packing import (
    IGNORE_INDEX,
    build,
    build_split,
    check_block_size,
    content_hash,
    junk_mask,
    pack,
    resolve_tokenizer,
)
from slm.data.realtext import RealTextConfig, prose_documents
from slm.data.sources import (
    BUILTIN,
    GENERATED,
    REALTEXT,
    content_digest,
    data_files,
    document_hashes,
    generated_config,
    is_local,
    raw_documents,
    warn_overlap,
)
from slm.data.spec import DataConfig, PackedData, SourceSpec, data_config, default_cache_dir, eval_spec
from slm.data.tokenizer import builtin_tokenizer, load_tokenizer, tokenizer_identity

__all__ = [
    "resolve_tokenizer",
    "wait_for_holder",
    "CacheLock",
    "LockLost",
    "BUILTIN",
    "CorpusConfig",
    "DataConfig",
    "GENERATED",
    "IGNORE_INDEX",
    "PackedData",
    "REALTEXT",
    "RealTextConfig",
    "SourceSpec",
    "build",
    "build_split",
    "builtin_tokenizer",
    "check_block_size",
    "content_digest",
    "content_hash",
    "data_config",
    "data_files",
    "default_cache_dir",
    "document_hashes",
    "eval_spec",
    "generated_config",
    "is_local",
    "load_tokenizer",
    "junk_mask",
    "pack",
    "prose_documents",
    "raw_documents",
    "tokenizer_identity",
    "warn_overlap",
]
