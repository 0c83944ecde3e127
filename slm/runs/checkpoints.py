"""Checkpoint folders that are either complete or absent.

A checkpoint is written into ``step_N.tmp``; ``slm_state.json`` (counters plus a manifest of
every file with its size and SHA-256) is written last; then the folder is renamed to ``step_N`` and
only then does ``latest`` move (written to a temporary file and renamed). A crash or a full disk at
any point leaves the previous checkpoint and ``latest`` intact. Resume takes ``latest`` if it is
complete (every file of its size) and intact (every file of its hash), otherwise the newest one that
is, with a warning; a damaged one is set aside when its step is written again.

``torch.distributed.checkpoint`` reports a failed read or write as ``CheckpointException``, which
derives from ``BaseException``: :data:`FAILURES` is what a checkpoint read or write may raise.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

try:
    from torch.distributed.checkpoint.api import CheckpointException
except ImportError:  # a torch build without torch.distributed: nothing raises it

    class CheckpointException(BaseException):
        pass


log = logging.getLogger(__name__)

STATE_FILE = "slm_state.json"
FAILURES = (Exception, CheckpointException)  # what a checkpoint write or read may raise


class CheckpointError(RuntimeError):
    pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def describe_error(error: BaseException) -> str:
    """One line for a failed read or write: DCP's CheckpointException carries each rank's own error."""
    if isinstance(error, CheckpointException) and getattr(error, "failures", None):
        rank, (cause, *_) = next(iter(error.failures.items()))
        return f"{type(cause).__name__}: {cause} (process {rank})"
    return f"{type(error).__name__}: {error}"


def _manifest(folder: Path) -> dict:
    return {
        str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _entries(folder: Path) -> dict:
    """``{file: (size, sha256 or None)}`` from the manifest (checkpoints before hashes recorded sizes only)."""
    manifest = json.loads((folder / STATE_FILE).read_text())["manifest"]
    return {f: (e["size"], e["sha256"]) if isinstance(e, dict) else (e, None) for f, e in manifest.items()}


def is_complete(folder: Path) -> bool:
    """The folder exists, has its state file, and every file in its manifest has its recorded size."""
    try:
        return all((folder / f).stat().st_size == size for f, (size, _) in _entries(folder).items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def damaged_file(folder: Path) -> str | None:
    """The first file of a complete checkpoint whose content is not what was written (its SHA-256 differs
    from the manifest's), or None when every file is intact. Reads every byte: called once, on resume."""
    for f, (_, digest) in _entries(folder).items():
        if digest is not None and _sha256(folder / f) != digest:
            return f
    return None


def read_state(folder: Path) -> dict:
    return json.loads((folder / STATE_FILE).read_text())


def _step_folders(root: Path) -> list[Path]:
    """``step_N`` folders, newest first (not ``.tmp`` ones being written, nor ``.damaged`` ones set aside)."""
    return sorted((p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()), reverse=True)


def latest(run_dir: Path, warn: bool = True, skip: tuple = ()) -> Path | None:
    """The checkpoint to resume from: ``latest`` if complete, else the newest complete one
    (``skip``: folders found damaged, passed over)."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    named = root / pointer.read_text().strip() if pointer.exists() else None
    if named is not None and named not in skip and is_complete(named):
        return named
    for folder in _step_folders(root):
        if folder not in skip and is_complete(folder):
            if warn:
                log.warning(
                    "checkpoint %s is missing or incomplete; resuming from %s, the newest complete one", named, folder
                )
            return folder
    return None


def save(run_dir: Path, step: int, state: dict, write, is_main: bool, keep: int, all_ok) -> Path:
    """Write checkpoint ``step`` atomically; ``write(folder)`` writes the engine's files (every
    process calls it), ``all_ok(ok) -> bool`` agrees on success across processes."""
    root = Path(run_dir) / "checkpoints"
    final, tmp = root / f"step_{step:07d}", root / f"step_{step:07d}.tmp"
    if is_complete(final) and damaged_file(final) is None:
        return final  # already written (e.g. resuming a run that had finished): never rewrite in place
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    error = None
    all_ok(True)  # the folder exists before anyone writes into it
    try:
        write(tmp)
    except FAILURES as e:  # a full disk surfaces as OSError, RuntimeError, a library's own error or DCP's
        error = e
    ok = all_ok(error is None)
    if ok and is_main:
        try:
            (tmp / STATE_FILE).write_text(json.dumps({**state, "manifest": _manifest(tmp)}))
            if final.exists():  # a damaged checkpoint of this step (resume fell back past it): keep it aside
                aside = final.with_name(final.name + ".damaged")
                shutil.rmtree(aside, ignore_errors=True)
                os.replace(final, aside)
                log.warning("checkpoint %s was incomplete or damaged; moved it to %s and wrote it again", final, aside)
            os.replace(tmp, final)
            pointer_tmp = root / "latest.tmp"
            pointer_tmp.write_text(final.name)
            os.replace(pointer_tmp, root / "latest")
        except OSError as e:
            error, ok = e, False
    ok = all_ok(ok)
    if not ok:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = latest(run_dir, warn=False)
        why = describe_error(error) if error else "failed on another process"
        raise CheckpointError(
            f"could not write checkpoint {final} ({why}); nothing was "
            f"overwritten: the last complete checkpoint is {previous or 'none'}. Free disk space and resume "
            "with trainer.resume=true"
        ) from error
    if is_main:
        for old in _step_folders(root)[keep:]:
            shutil.rmtree(old, ignore_errors=True)
    return final
