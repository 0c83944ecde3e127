"""Where a run's reference losses come from: none, a live model, a stored column, or the built-in
demo reference (trained once on the clean split, cached, scored once, reused by every run).

Caches are keyed by a hash of everything that decides their content and become visible only
when complete (a ``DONE`` marker written last), so an interrupted run never leaves a cache that
breaks the next one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate.utils import broadcast_object_list
from omegaconf import DictConfig, OmegaConf

from slm import parallel
from slm.data import PackedData, default_cache_dir
from slm.model import SelectiveLM
from slm.reference import (
    META_FILE,
    check_vocab,
    freeze,
    load_reference,
    load_stored,
    reference_identity,
    score_dataset,
)
from slm.tracking import Tracker
from slm.train import RefSource, TrainConfig, Trainer

log = logging.getLogger("slm")
DONE = "DONE"


def config_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def container(node) -> dict:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)


def cache_root(cfg: DictConfig) -> Path:
    return Path(cfg.data.get("cache_dir") or default_cache_dir()).expanduser()


def _locked(path: Path):
    from filelock import FileLock  # a dependency of datasets and huggingface_hub

    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path) + ".lock")


def _agreed(value: bool) -> bool:
    box = [value]
    broadcast_object_list(box)  # the main process's view decides for everyone
    return box[0]


def demo_reference(cfg: DictConfig, data: PackedData, acc) -> tuple[str, torch.nn.Module]:
    """The built-in demo's reference: trained on the clean split once, then cached and reused."""
    from slm.cli import build_model

    rcfg = cfg.reference
    seed = int(rcfg.get("seed", 0))  # not the run's seed: every seed of a sweep shares one reference
    tcfg = TrainConfig(**container(rcfg.trainer), seed=seed)
    # Everything that changes the reference's weights: the global batch depends on the process count.
    settings = {"model": container(cfg.model), "trainer": container(rcfg.trainer),
                "clean": data.identity["data_hash"]["clean"], "seed": seed, "processes": acc.num_processes,
                "mixed_precision": parallel.resolve_mixed_precision(tcfg.mixed_precision)}  # fmt: skip
    where = cache_root(cfg) / "reference" / config_hash(settings)
    with _locked(where) if acc.is_main_process else nullcontext():
        if _agreed((where / DONE).exists()):
            log.info("reference: reusing the cached demo reference %s (trained once, shared by every run "
                     "and sweep job with these settings)", where)  # fmt: skip
        else:
            if acc.is_main_process and where.exists():
                log.warning("reference: %s holds a partial demo reference (an interrupted run); rebuilding it", where)
                shutil.rmtree(where)
            acc.wait_for_everyone()
            log.info("reference: training the demo reference on the clean split (first run only) -> %s", where)
            with parallel.model_init(trained=False):  # trained with DDP under DeepSpeed, see below
                model = build_model(cfg.model, len(data.tokenizer), seed + 1, data.tokenizer)
            lm = SelectiveLM(model, ratio=1.0)
            # DeepSpeed takes one model per run (the one trained next): the reference trains with DDP.
            mode = "ddp" if parallel.requested_mode() == "deepspeed" else None
            t = Trainer(acc, lm, data["clean"], data["validation"], tcfg, where / "run", mode=mode,
                        tracker=Tracker(where / "run", enabled=acc.is_main_process), name="reference")  # fmt: skip
            res = t.fit()
            t.engine.save_pretrained(where / "model")
            if acc.is_main_process:
                (where / "result.json").write_text(json.dumps(res, indent=1))
                (where / DONE).write_text("")  # last: the cache is complete
            acc.wait_for_everyone()
            t.engine.release()
            del t, lm, model
    return str(where / "model"), load_reference(str(where / "model"), device=acc.device)


def stored_scores(cfg: DictConfig, data: PackedData, reference, ref_name: str, acc, out_dir=None) -> Path:
    """Score the training split once per (reference weights, data); reuse the store afterwards."""
    ident = reference_identity(reference, ref_name)
    meta = {"tokenizer": data.identity["tokenizer"], "block_size": data.identity["block_size"],
            "data_hash": data.identity["data_hash"]["train"], "rows": len(data["train"]),
            "reference": ident}  # fmt: skip
    out_dir = Path(out_dir) if out_dir else cache_root(cfg) / "scores" / config_hash(meta)
    with _locked(out_dir) if acc.is_main_process else nullcontext():  # concurrent sweep jobs score once
        if _agreed((out_dir / META_FILE).exists()):
            load_stored(out_dir, meta)  # refuses a store made by another reference or for other data
            log.info("reference: reusing stored reference losses %s (scored once for this reference and data)", out_dir)
        else:
            score_dataset(reference, data["train"], out_dir, meta, batch_size=cfg.get("score_batch_size", 32),
                          accelerator=acc)  # fmt: skip
    return out_dir


def expected_store(data: PackedData) -> dict:
    return {"tokenizer": data.identity["tokenizer"], "block_size": data.identity["block_size"],
            "data_hash": data.identity["data_hash"]["train"], "rows": len(data["train"])}  # fmt: skip


def reference_source(cfg: DictConfig, data: PackedData, acc, model) -> tuple:
    """(train dataset, RefSource) for ``cfg.reference.kind``: none | live | stored | demo."""
    kind = cfg.reference.kind
    if kind == "none":
        return data["train"], RefSource("none")
    if kind == "live":
        ref = load_reference(cfg.reference.path, device=acc.device, dtype=cfg.reference.get("dtype", "auto"))
        check_vocab(model, ref)
        return data["train"], RefSource("live", freeze(ref))
    if kind == "stored":
        expected = expected_store(data)
        if cfg.reference.get("path"):  # optional: the reference the store must have been scored with
            expected["reference_name"] = str(cfg.reference.path)
        ds, _ = load_stored(cfg.reference.scores_dir, expected)
        return ds, RefSource("stored", scores_dir=str(cfg.reference.scores_dir))
    if kind == "demo":
        name, ref = demo_reference(cfg, data, acc)
        check_vocab(model, ref)
        store = stored_scores(cfg, data, ref, name, acc)
        ds, _ = load_stored(store, {**expected_store(data), "reference": reference_identity(ref, name)})
        return ds, RefSource("stored", scores_dir=str(store))
    raise ValueError(f"reference.kind must be none, live, stored or demo, got {kind!r}")


def check_score_vocab(cfg: DictConfig, data: PackedData, ref) -> None:
    """Refuse, before scoring, a reference whose vocabulary is not the training model's."""
    from transformers import AutoConfig

    pretrained = cfg.model.get("pretrained")
    vocab = AutoConfig.from_pretrained(pretrained).vocab_size if pretrained else len(data.tokenizer)
    v_ref = ref.get_output_embeddings().weight.shape[0]
    if v_ref != vocab:
        raise ValueError(
            f"the reference's vocabulary ({v_ref} tokens) differs from the training model's ({vocab}, "
            f"model={cfg.model.name}); a reference must share the training model's tokenizer"
        )
