"""Fail fast, with one message, on hub names that cannot be fetched.

Without network, transformers and datasets retry each file for about a minute and print a
screen of warnings. Before anything slow, every hub name a run needs is checked: a local folder
or a copy in the Hugging Face cache is fine; otherwise the hub must answer within seconds.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from slm.data import data_files, is_local
from slm.data.subword import bpe_size
from slm.reference import read_meta

# What a cached copy of each kind must hold at least.
_MARKERS = {"model": ("config.json",), "tokenizer": ("tokenizer_config.json", "tokenizer.json")}


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _cached(name: str, kind: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    for filename in _MARKERS.get(kind, ()):
        try:
            if isinstance(try_to_load_from_cache(repo_id=name, filename=filename), str):
                return True
        except Exception:  # not a valid repo id: the library's own error will say so
            return False
    return False


def hub_reachable(timeout: float = 3.0) -> bool:
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def check_fetchable(name: str | None, setting: str, kind: str) -> None:
    """Raise if ``name`` (for ``setting``) is neither local, nor cached, nor reachable on the hub."""
    if not name or name in ("builtin", "realtext") or Path(os.path.expanduser(str(name))).exists():
        return
    if _cached(str(name), kind):
        return
    if not _offline() and hub_reachable():
        return
    why = "HF_HUB_OFFLINE=1 is set" if _offline() else "the hub cannot be reached (no network?)"
    raise ValueError(
        f"{setting}={name!r} is not a local folder nor in the Hugging Face cache, and {why}. Download it where "
        f"there is network (huggingface-cli download {name} --local-dir <folder>, or save_pretrained) and set "
        f"{setting}=<folder>"
    )


def check_run_sources(settings) -> None:
    """Every hub name a run's or a store's settings need (:class:`slm.recipes.RunSettings`,
    :class:`slm.recipes.ScoreSettings`), before anything slow."""
    data, ref = settings.data, settings.reference
    check_fetchable(settings.model.pretrained, "model.pretrained", "model")
    if bpe_size(data.tokenizer) is None:  # bpe:<n> is trained here, on the run's own text
        check_fetchable(data.tokenizer, "data.tokenizer", "tokenizer")
    if ref.kind == "live":
        check_fetchable(ref.path, "reference.path", "model")

    sources = [("data.source", data.source)]
    sources += [(f"data.eval.{name}", spec.source) for name, spec in data.eval.items()]
    sources += [(f"data.tokenizer_text[{i}]", spec.source) for i, spec in enumerate(data.tokenizer_text)]
    if ref.kind == "train":
        sources.append(("reference.data.source", ref.data.source))
    base = getattr(settings, "base", None)
    if base is not None and base.trained:
        sources.append(("base.data.source", base.data.source))
    for setting, source in sources:
        if not source or source in ("builtin", "realtext"):
            continue
        if not is_local(str(source)):
            check_fetchable(source, setting, "dataset")
            continue
        try:
            data_files(str(source))
        except (FileNotFoundError, ValueError) as e:  # named by the setting that points at it
            raise type(e)(str(e).replace("data.source=", f"{setting}=", 1)) from None
    if ref.kind == "stored" and ref.scores_dir:
        read_meta(Path(os.path.expanduser(str(ref.scores_dir))))  # missing or unreadable: said now
