"""The frozen reference: loaded, scored live, or scored once into a store of columns. Imports slm.data,
slm.model and slm.parallel.

  writer.py       load_reference, freeze, identity, eval_losses; write_store writes a store shard by shard
                  (resumable)
  store.py        a store on disk: per-token columns in hashed shards aligned by row with a packed split
  source.py       RefSource: what the training loop asks of a reference (none, stored, live, evolving)
"""

from slm.reference.source import RefSource, check_evolution
from slm.reference.store import META_FILE, StoredColumns, StoreError, expected_store, read_meta
from slm.reference.writer import (
    CHUNK_TOKENS,
    block_losses,
    check_vocab,
    eval_losses,
    freeze,
    load_reference,
    load_stored,
    reference_identity,
    weights_hash,
    write_store,
)

__all__ = [
    "CHUNK_TOKENS",
    "META_FILE",
    "RefSource",
    "StoreError",
    "StoredColumns",
    "check_evolution",
    "check_vocab",
    "eval_losses",
    "expected_store",
    "freeze",
    "load_reference",
    "load_stored",
    "read_meta",
    "reference_identity",
    "block_losses",
    "write_store",
    "weights_hash",
]
