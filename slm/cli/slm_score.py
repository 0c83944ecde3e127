"""``slm-score``: store a reference's per-token losses for a packed training split once, and ``--verify`` a store."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from slm.cli.common import CONF_DIR, check_output_dirs, one_line_errors, task_overrides
from slm.cli.preflight import check_run_sources
from slm.cli.validation import score_settings
from slm.recipes import describe_quality, store_losses
from slm.reference import StoredColumns, read_meta


def score(cfg: DictConfig, overrides: list[str] | None = None) -> Path:
    """``slm-score``: store reference losses of the training split (``overrides``: the launch's own,
    to print the ``slm-train`` command that uses the store)."""
    settings = score_settings(cfg)
    check_run_sources(settings)
    stored = store_losses(settings)
    if stored.meta:  # the main process
        rate = stored.meta.get("tokens_per_s")
        how = (
            "reused: an earlier slm-score run had stored these exact losses"
            if stored.reused or not rate
            else f"scored at {rate:,} tokens/s over {stored.meta.get('processes')} process(es)"
        )
        print(
            f"\nslm-score: stored ref_loss for {stored.rows} blocks in {stored.path} ({how})"
            + (f"\n  reference quality: {describe_quality(stored.quality)}" if stored.quality else "")
            + (f"\n  reference eval loss: {_losses(stored.eval_losses)}" if stored.eval_losses else "")
            + f"\n  train with: slm-train {' '.join(_data_overrides(overrides))} reference=stored "
            f"reference.scores_dir={stored.path}",
            flush=True,
        )
    return stored.path


def _losses(by_set: dict) -> str:
    return ", ".join(f"{name}={loss:.4f}" for name, loss in by_set.items())


def _data_overrides(overrides: list[str] | None) -> list[str]:
    """The launch's data and model options: a run on this store must pass them again (the packed
    data the store belongs to is found by them)."""
    keep = ("data", "model", "seed")
    return [o for o in overrides or [] if o.lstrip("+~").split("=", 1)[0].split(".")[0] in keep]


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="score")
def score_app(cfg: DictConfig) -> None:
    with one_line_errors():
        score(cfg, task_overrides())


def main_score() -> None:
    with one_line_errors():
        if sys.argv[1:2] == ["--verify"]:
            verify_stores(sys.argv[2:])
        else:
            check_output_dirs(sys.argv[1:])
            score_app()


def verify_stores(folders: list[str]) -> None:
    """``slm-score --verify <store>...``: hash every shard of each store against its metadata."""
    from tqdm.auto import tqdm

    if not folders:
        raise ValueError("slm-score --verify takes one or more store folders (the folder slm-score printed)")
    for folder in folders:
        meta = read_meta(Path(folder))
        columns = StoredColumns(folder, meta)
        columns.check_files(sample=0)
        rows = meta["rows"] * len(columns.columns)
        with tqdm(total=rows, desc=f"verifying {folder}", unit="row", unit_scale=True) as bar:
            columns.verify_all(bar)
        shards = sum(len(meta["shards"][c]) for c in columns.columns)
        print(
            f"slm-score --verify: {folder} is intact ({shards} shards of {', '.join(columns.columns)}, "
            f"{meta['rows']} rows of {meta['block_size']} tokens)",
            flush=True,
        )
