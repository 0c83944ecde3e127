"""Where a run's reference values come from: none, a live model, a stored column, or a reference trained once
on its own text (:mod:`slm.recipes.cached_training`), scored once into a store reused by every run; the
reference's eval losses (cached) and the quality it reached when slm trained it."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from accelerate.utils import broadcast_object_list

from slm.data import PackedData, content_hash, tokenizer_identity
from slm.recipes.cached_training import DONE, Settings, agreed, job_lock, train_reference
from slm.recipes.settings import ReferenceConfig, RunSettings, config_hash
from slm.reference import (
    META_FILE,
    RefSource,
    check_vocab,
    eval_losses,
    expected_store,
    freeze,
    load_reference,
    load_stored,
    reference_identity,
    weights_hash,
    write_store,
)

log = logging.getLogger(__name__)


def stored_losses(
    settings: Settings,
    data: PackedData,
    reference,
    ref_name: str,
    acc,
    out_dir=None,
    entropy: bool = False,
    dtype: str = "float32",
) -> tuple[Path, bool]:
    """Score the training split once per (reference weights, data, columns); reuse the store afterwards.
    Returns (the store, whether an earlier run had made it)."""
    ident = reference_identity(reference, ref_name)
    meta = {**expected_store(data), "reference": ident, "entropy": entropy, "dtype": dtype}
    out_dir = Path(out_dir) if out_dir else settings.cache_root / "scores" / config_hash(meta)
    with job_lock(out_dir, f"the store {out_dir}", acc):  # scored once
        reused = agreed((out_dir / META_FILE).exists())
        if reused:
            load_stored(out_dir, meta)  # refuses a store made by another reference or for other data
            log.info("reference: reusing stored reference losses %s (scored once for this reference and data)", out_dir)
        else:
            write_store(
                reference,
                data["train"],
                out_dir,
                meta,
                batch_size=settings.score_batch_size,
                accelerator=acc,
                entropy=entropy,
                dtype=dtype,
            )
    return out_dir, reused


def reference_source(settings: RunSettings, data: PackedData, acc, model) -> tuple:
    """(train dataset, RefSource) for ``reference.kind``: none | live | stored | train | demo, with the
    values the selector needs (its per-token entropy too where a score asks for it)."""
    rcfg = settings.reference
    entropy = settings.selector.needs()["entropy"]
    if rcfg.kind == "none":
        return data["train"], RefSource("none")
    if rcfg.kind == "live" or rcfg.evolve_every is not None:  # scored live (an evolving reference: a trained one)
        if rcfg.kind == "live":
            check_reference_tokenizer(rcfg, data)
            ref = load_reference(rcfg.path, device=acc.device, dtype=rcfg.dtype)
        else:
            _, ref = train_reference(settings, data, acc)
        check_vocab(model, ref)
        evolving = {}
        if rcfg.evolve_every is not None:
            evolving = dict(evolve_every=int(rcfg.evolve_every), evolve_ema=float(rcfg.evolve_ema))
        return data["train"], RefSource("live", freeze(ref), entropy=entropy, **evolving)
    if rcfg.kind == "stored":
        expected = {**expected_store(data), "entropy": entropy}
        if rcfg.path:  # optional: the reference the store must have been scored with
            expected["reference_name"] = str(rcfg.path)
        columns = load_stored(rcfg.scores_dir, expected)
        return data["train"], RefSource("stored", scores_dir=str(rcfg.scores_dir), entropy=entropy, store=columns)
    name, ref = train_reference(settings, data, acc)  # train | demo
    check_vocab(model, ref)
    store, _ = stored_losses(settings, data, ref, name, acc, entropy=entropy)
    columns = load_stored(store, {**expected_store(data), "reference": reference_identity(ref, name)})
    return data["train"], RefSource("stored", scores_dir=str(store), entropy=entropy, store=columns)


def trained_result(name: str | None) -> dict | None:
    """The ``result.json`` a model slm trained and cached left beside its model folder ``name`` (None for any
    other model, or a cache not complete)."""
    folder = Path(name).parent if name else None
    if folder is None or not (folder / DONE).exists() or not (folder / "result.json").exists():
        return None
    return json.loads((folder / "result.json").read_text())


def trained_quality(name: str | None) -> dict | None:
    """How well a reference slm trained itself (``name``: its model folder in the cache) did when it was
    trained: its eval losses on the eval sets of the run that trained it and its step count (the cache's
    ``result.json``), or None for any other reference."""
    result = trained_result(name)
    if result is None:
        return None
    losses = {k: round(float(v), 4) for k, v in result.items() if k.startswith("eval/") and k.endswith("loss")}
    quality = {**losses, "steps": result.get("best_step") or result.get("step")}
    if result.get("best_step"):  # trained until its held-out loss stopped improving: the best eval's weights
        quality["trained_steps"] = result.get("step")
    return quality


MEASURED_HERE = "this run's eval sets"
MEASURED_THEN = "the eval sets of the run that trained it"


def measured_quality(trained: dict, losses: dict | None, first: str | None) -> dict:
    """A trained reference's quality as a run reports it: its loss on the run's own eval sets (``losses``, name
    -> loss; ``eval/loss`` is the ``first`` set's), its loss on the held-out part of its own text and its steps
    (from its training); where ``losses`` cannot be had, the losses of its training, named as such
    (``measured_on``): the same names can mean other text in another run."""
    kept = {k: v for k, v in trained.items() if not k.startswith("eval/") or k.endswith("_heldout/loss")}
    if not losses:
        return {**trained, "measured_on": MEASURED_THEN}
    here = {f"eval/{name}/loss": round(float(v), 4) for name, v in losses.items()}
    if first in losses:
        here["eval/loss"] = here[f"eval/{first}/loss"]
    return {**here, **kept, "measured_on": MEASURED_HERE}


SHARED = "the reference's training and scoring, made once and shared by every run that selects with them"


def reference_cost(ref: RefSource) -> dict | None:
    """What the reference a run's store was scored with cost to make (None: not a store slm scored with a
    reference it trained, or a record from before costs were kept): its training (tokens, seconds of its steps,
    FLOPs) and the store's scoring (tokens, seconds, FLOPs). ``slm-curves`` adds it to a run's cost to reach the
    baseline; it is one cost for every run of a sweep that uses the same reference and store."""
    meta = ref.store.meta if ref.store is not None else {}
    trained = trained_result((meta.get("reference") or {}).get("name"))
    if trained is None or "train_time_s" not in trained or "flops" not in meta:
        return None
    return {
        "train_tokens": trained["tokens_seen"],
        "train_time_s": trained["train_time_s"],
        "train_flops": trained["flops"],
        "score_tokens": meta["rows"] * meta["block_size"],
        "score_time_s": meta["seconds"],
        "score_flops": meta["flops"],
        "shared": SHARED,
    }


def reference_quality(ref: RefSource) -> dict | None:
    """:func:`trained_quality` of the reference a run's store was scored with (None: not one slm trained); a run
    reports it as :func:`measured_quality` with the reference's losses on its own eval sets."""
    meta = ref.store.meta if ref.store is not None else {}
    return trained_quality((meta.get("reference") or {}).get("name"))


def describe_quality(quality: dict) -> str:
    named = {v for k, v in quality.items() if k.count("/") == 2}  # eval/<set>/loss; eval/loss repeats the first
    losses = ", ".join(
        f"{k}={v}" for k, v in quality.items() if k.startswith("eval/") and (k.count("/") == 2 or v not in named)
    )
    how = f"{losses} (on {quality.get('measured_on', MEASURED_THEN)}"
    for heldout in (k.split("/")[1] for k in quality if k.endswith("_heldout/loss")):
        how += f"; {heldout}: the held-out part of its own text"
    how += f") after {quality['steps']} steps of its own training"
    if quality.get("trained_steps"):
        how += f" (its best held-out loss; it stopped at step {quality['trained_steps']})"
    return how


def reference_eval(settings: Settings, data: PackedData, acc, identity: dict, model=None) -> dict | None:
    """The reference's loss on each of the run's eval sets (``name -> loss``), computed once per
    (reference weights, eval sets) and cached; None when neither a cache nor the reference's weights are
    at hand (a stored column scored with a model this machine does not have)."""
    if not data.eval_sets:
        return None
    losses = None
    if acc.is_main_process:  # the others receive its answer
        key = {"reference": identity, "eval": {n: content_hash(ds) for n, ds in data.eval_sets.items()}}
        path = settings.cache_root / "reference_eval" / f"{config_hash(key)}.json"
        if path.exists():
            losses = json.loads(path.read_text())["losses"]
        else:
            model = model if model is not None else local_reference(identity, acc.device)
            if model is not None:
                losses = eval_losses(model, data.eval_sets, settings.score_batch_size, acc.device)
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
                tmp.write_text(json.dumps({"key": key, "losses": losses}, indent=1))
                os.replace(tmp, path)  # complete or absent: runs starting together may both write it
    box = [losses]
    broadcast_object_list(box)
    return box[0]


def local_reference(identity: dict, device):
    """The reference a store was scored with, when its folder is on this machine with the same weights."""
    name = identity.get("name")
    if not name or not Path(name).is_dir():
        return None
    model = load_reference(name, device=device)
    return model if weights_hash(model) == identity.get("weights_sha256") else None


def run_reference_eval(settings: RunSettings, data: PackedData, acc, ref: RefSource) -> dict | None:
    """:func:`reference_eval` for a run's reference (None: no reference, or an evolving one)."""
    if ref.evolve_every:
        return None
    if ref.kind == "live":
        return reference_eval(settings, data, acc, reference_identity(ref.model, settings.reference.path), ref.model)
    identity = (ref.store.meta.get("reference") if ref.store is not None else None) or None
    return reference_eval(settings, data, acc, identity) if identity else None


def check_reference_tokenizer(rcfg: ReferenceConfig, data: PackedData) -> None:
    """Refuse a live reference whose tokenizer is not the training data's: vocabularies of the same
    size can map ids to different tokens (Llama-2 and Mistral-7B v0.1 both have 32,000), and its
    losses would then score other tokens. ``reference.check_tokenizer=false`` skips the check."""
    if not rcfg.check_tokenizer:
        return
    from transformers import AutoTokenizer

    path, ours = rcfg.path, data.identity["tokenizer"]
    override = "set reference.check_tokenizer=false only if you know the two vocabularies give every id the same token"
    try:
        theirs = tokenizer_identity(AutoTokenizer.from_pretrained(path))
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(
            f"reference.path={path!r} has no tokenizer that loads ({type(e).__name__}), so slm cannot check that it "
            f"shares the training tokenizer ({ours['name']}): save the reference's tokenizer into that folder, or "
            f"{override}"
        ) from e
    if theirs["vocab_sha256"] != ours["vocab_sha256"]:
        raise ValueError(
            f"the reference's tokenizer ({theirs['name']}: {theirs['vocab_size']} tokens, vocabulary hash "
            f"{theirs['vocab_sha256']}) is not the training tokenizer ({ours['name']}: {ours['vocab_size']} tokens, "
            f"hash {ours['vocab_sha256']}); its losses would score other tokens. Use a reference of the same family, "
            f"or {override}"
        )


def check_score_vocab(settings: Settings, data: PackedData, ref) -> None:
    """Refuse, before scoring, a reference whose vocabulary is not the training model's."""
    from transformers import AutoConfig

    pretrained = settings.model.pretrained
    vocab = AutoConfig.from_pretrained(pretrained).vocab_size if pretrained else len(data.tokenizer)
    v_ref = ref.get_output_embeddings().weight.shape[0]
    if v_ref != vocab:
        raise ValueError(
            f"the reference's vocabulary ({v_ref} tokens) differs from the training model's ({vocab}, "
            f"model={settings.model.name}); a reference must share the training model's tokenizer"
        )
