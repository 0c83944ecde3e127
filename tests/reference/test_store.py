"""A store on disk: tampering is refused naming what differs; opening costs O(shards), the rest is
hashed when read."""

import json

import numpy as np
import pytest
from support.archs import tiny_model

import slm.reference.store as store_module
from slm.data import DataConfig, build
from slm.reference import load_stored, write_store


def _store(tmp_path, name="s", chunk_tokens=None, monkeypatch=None):
    data = build(DataConfig(builtin={"n_train_docs": 30, "n_clean_docs": 5, "n_val_docs": 5}, block_size=32,
                            cache_dir=str(tmp_path / "c")))  # fmt: skip
    import slm.reference.writer as reference
    from slm.reference import expected_store, reference_identity

    if chunk_tokens:
        monkeypatch.setattr(reference, "CHUNK_TOKENS", chunk_tokens)
    ref = tiny_model("llama", vocab=len(data.tokenizer))
    meta = {**expected_store(data), "reference": reference_identity(ref, "ref-a")}
    write_store(ref, data["train"], tmp_path / name, meta, batch_size=8)
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
