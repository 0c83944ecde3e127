"""``slm-train``: compose and validate the config, resume a run's own config where asked, train it with the
run recipe (:mod:`slm.recipes.run`) and print where everything went."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from slm import recipes, runs
from slm.cli.common import CONF_DIR, check_output_dirs, one_line_errors, run_dir_from_hydra, task_overrides
from slm.cli.preflight import check_run_sources
from slm.cli.validation import container, validate
from slm.train import candidates

log = logging.getLogger(__name__)


def train_composed(cfg: DictConfig, run_dir: Path, overrides: list[str] | None = None) -> dict:
    """One run of ``slm-train`` (usable without Hydra's decorator, e.g. from tests).

    ``overrides``: the launch's explicit ``key=value`` settings; on resume only they may differ
    from the run's saved config (``None``: every key is compared).
    """
    run_dir = Path(run_dir)
    cfg, changed = run_config(cfg, run_dir, overrides)
    settings = validate(cfg)  # before anything slow: settings first, then what must be fetched
    check_run_sources(settings)
    run = recipes.build_run(settings, run_dir, config=container(cfg), changed=changed)
    result = run.train()
    if run.acc.is_main_process:
        _print_summary(run_dir, result)
    return result


def run_config(cfg: DictConfig, run_dir: Path, overrides: list[str] | None) -> tuple[DictConfig, dict]:
    """The config this launch trains with: on resume the run's own saved config plus the allowed
    changes (see :mod:`slm.runs`), else ``cfg``."""
    saved = run_dir / runs.CONFIG
    if not cfg.trainer.get("resume") or not saved.exists():
        return cfg, {}
    info = runs.read_json(run_dir / runs.RUN_INFO) or {}
    processes = (int(info.get("processes", 1)), int(os.environ.get("WORLD_SIZE", "1")))
    merged, changed = runs.resume_config(container(OmegaConf.load(saved)), container(cfg), overrides, processes)
    _check_candidates(merged, changed, processes)
    for key, (old, new) in changed.items():
        log.info("resume: %s changed from %r to %r", key, old, new)
    return OmegaConf.create(merged), changed


def _check_candidates(merged: dict, changed: dict, processes: tuple[int, int]) -> None:
    """With block selection, a step reads processes x grad_accum x candidates(batch_size) blocks: a resume
    with another layout of the same rows per step would read other rows than the uninterrupted run."""
    blocks = float(merged["selector"].get("blocks", 1.0))
    if blocks >= 1.0:
        return
    now = merged["trainer"]
    before = {**now, **{k.split(".", 1)[1]: old for k, (old, _) in changed.items() if k.startswith("trainer.")}}
    read = [
        world * int(t["grad_accum"]) * candidates(int(t["batch_size"]), blocks)
        for world, t in ((processes[0], before), (processes[1], now))
    ]
    if read[0] != read[1]:
        raise runs.ResumeMismatch(
            f"trainer.resume=true: with selector.blocks={blocks} the run read {read[0]} candidate blocks per step "
            f"({processes[0]} process(es) x trainer.batch_size={before['batch_size']} x trainer.grad_accum="
            f"{before['grad_accum']}); this launch would read {read[1]}, so other rows than the run would have: "
            "resume with the run's own process count, batch size and grad_accum"
        )


def _print_summary(run_dir: Path, result: dict) -> None:
    def repeats_first_set(key: str) -> bool:  # eval/<first>/loss is also eval/loss: print it once
        parts = key.split("/")
        return len(parts) == 3 and parts[0] == "eval" and result.get(f"eval/{parts[2]}") == result[key]

    def breakdown(key: str) -> bool:  # audit/junk_dropped/<kind> and the like: in metrics.jsonl and slm-curves
        return key.startswith("audit/") and key.count("/") > 1

    numbers = ", ".join(
        f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
        for k, v in result.items()
        if k != "status" and not repeats_first_set(k) and not breakdown(k)
    )
    print(
        f"\nslm-train finished: {numbers}\n  run directory: {run_dir}\n  metrics: {run_dir / 'metrics.jsonl'}"
        f"\n  model: {run_dir / 'model'}  (AutoModelForCausalLM.from_pretrained)\n"
        f"  plot: slm-curves {run_dir}  (its curves; beside a baseline run, slm-train selector=all, what selection "
        "saves)",
        flush=True,
    )


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def train_app(cfg: DictConfig) -> float | None:
    with one_line_errors():  # inside the app: Hydra reports any exception that reaches it as a traceback
        result = train_composed(cfg, run_dir_from_hydra(), task_overrides())
    return result.get("eval/loss")


def main_train() -> None:
    with one_line_errors():  # Ctrl-C before Hydra hands over (e.g. while composing) lands here
        check_output_dirs(sys.argv[1:])
        train_app()
