"""Run records: a local ``metrics.jsonl`` always, and W&B unless ``logger=none``.

W&B never blocks or crashes a run: without an API key (or ``WANDB_MODE``) it runs offline, and
any W&B error is logged once and tracking carries on with the local file alone.
"""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
import secrets
from pathlib import Path

log = logging.getLogger(__name__)

# A curve needs this many eval points before "where does it reach that loss" means more than a straight line.
MIN_EVAL_POINTS = 5
METRICS_FILE = "metrics.jsonl"
X_AXES = ("tokens_seen", "tokens_selected")


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The events of a ``metrics.jsonl`` (a run directory or the file). A torn last line (a crash
    mid-write) is skipped with a warning; a broken line elsewhere is an error naming it."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.exists():
        return []
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    events = []
    for i, line in enumerate(lines):
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                log.warning("%s: the last line is incomplete (a run stopped mid-write); ignoring it", path)
                break
            raise ValueError(f"{path}: line {i + 1} is not valid JSON ({e}); the file was edited or damaged") from e
    return events


def _wandb_logged_in() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


class Tracker:
    """Writes events on the main process only; ``enabled=False`` makes every call a no-op."""

    def __init__(
        self,
        run_dir: str | os.PathLike,
        enabled: bool,
        wandb_cfg: dict | None = None,
        config: dict | None = None,
        resume_step: int | None = None,
    ):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self.wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self.rewind(resume_step)
        elif self.path.exists():
            self.path.unlink()
        if wandb_cfg is not None:
            self._init_wandb(Path(run_dir), wandb_cfg, config or {}, resume=resume_step is not None)

    def rewind(self, step: int) -> None:
        """On resume, drop events logged after the checkpoint: they are about to be redone."""
        if not self.enabled:
            return
        kept = [e for e in read_metrics(self.path) if e.get("step", 0) <= step]
        self.path.write_text("".join(json.dumps(e) + "\n" for e in kept))

    def _init_wandb(self, run_dir: Path, cfg: dict, config: dict, resume: bool) -> None:
        try:
            import wandb

            mode = cfg.get("mode") or os.environ.get("WANDB_MODE") or ("online" if _wandb_logged_in() else "offline")
            id_file = run_dir / "wandb_id.txt"
            run_id = id_file.read_text().strip() if resume and id_file.exists() else secrets.token_hex(4)
            id_file.write_text(run_id)
            self.wandb = wandb.init(
                project=cfg.get("project", "slm"),
                entity=cfg.get("entity"),
                group=cfg.get("group"),
                name=cfg.get("name"),
                tags=list(cfg.get("tags") or []),
                dir=str(run_dir),
                config=config,
                mode=mode,
                id=run_id,
                resume="allow",
                settings=wandb.Settings(init_timeout=20, silent=True),
            )
            for axis in X_AXES:
                self.wandb.define_metric(axis)
            self.wandb.define_metric("train/*", step_metric="tokens_seen")
            self.wandb.define_metric("eval/*", step_metric="tokens_seen")
            self.wandb.define_metric("downstream/*", step_metric="tokens_seen")
            log.info("W&B run %s (%s) in %s", run_id, mode, run_dir)
        except Exception as e:  # an unreachable server, a bad key, a broken install: keep training
            log.warning(
                "W&B disabled for this run (%s: %s); metrics.jsonl still records everything", type(e).__name__, e
            )
            self.wandb = None

    def log(self, event: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in event.items()}
        with self.path.open("a") as f:
            f.write(json.dumps(clean) + "\n")
        if self.wandb is not None:
            try:
                self.wandb.log({k: v for k, v in clean.items() if v is not None})
            except Exception as e:
                log.warning("W&B log failed (%s); continuing with metrics.jsonl only", e)
                self.wandb = None

    def summary(self, values: dict) -> None:
        if self.wandb is not None:
            try:
                self.wandb.summary.update(values)
            except Exception:
                pass

    def finish(self) -> None:
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception as e:
                log.warning("W&B finish failed: %s", e)
            self.wandb = None
