"""What the selector keeps: excess-loss samples of a finished run, for notebooks."""

from __future__ import annotations

import glob
import html
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from slm.data import build, is_local, junk_mask
from slm.model import shifted_valid, token_losses
from slm.reference import expected_store, load_stored
from slm.runs import CONFIG, RUN_INFO
from slm.selection import COMBINATIONS, NEEDS, ratio_schedule, score_tokens, select_combined, select_tokens


@dataclass
class SelectionSample:
    tokens: list[list[str]]  # [B][T] token strings
    excess: np.ndarray  # [B, T] the score selection ranks by: excess loss (the model's own loss without a reference)
    mask: np.ndarray  # [B, T] selected
    valid: np.ndarray  # [B, T]
    ratio: float
    clean: np.ndarray | None = None  # [B, T] the corpus's clean tokens, where it marks them
    score: str = "excess_loss"  # what ``excess`` holds
    kind: np.ndarray | None = None  # [B, T] each token's kind of junk (0: none), where the corpus names them
    kind_names: list[str] | None = None  # label -> name
    rule: str = ""  # the run's selection rule as the sample applies it (selector, scope)
    unlike_the_run: tuple[str, ...] = ()  # what of the run's selection the sample cannot reproduce
    junk: np.ndarray | None = None  # [B, T] the corpus's junk (neither this nor clean: paragraph breaks, document ends)


def selection_sample(run_dir: str | Path, n_blocks: int = 8, ratio: float | None = None) -> SelectionSample:
    """Score the first ``n_blocks`` training blocks with the run's final model (and its reference's stored losses
    and entropies), and select by the run's own rule: its score (excess loss, the training loss, the reference's
    loss or entropy, random, a union or intersection of two) at its ratio over its scope (per sequence, or over
    these blocks as one batch); every token for the baseline; every token but the junk for the oracle. What the
    sample cannot reproduce (a threshold over the run, block selection, a live reference's losses, the run's own
    random draws, several processes) is listed in ``unlike_the_run``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = Path(run_dir)
    info = json.loads((run_dir / RUN_INFO).read_text())
    saved = yaml.safe_load((run_dir / CONFIG).read_text())
    data = build(_from_launch_dir(saved["data"], info.get("launch_dir")))  # the run's packed data, from its cache
    ds = data["train"].select(range(min(n_blocks, len(data["train"]))))
    model = AutoModelForCausalLM.from_pretrained(run_dir / "model").eval()
    tok = AutoTokenizer.from_pretrained(run_dir / "model")
    ids, labels = torch.tensor(ds["input_ids"]), torch.tensor(ds["labels"])
    tl = token_losses(model, ids, labels, attention_mask=torch.tensor(ds["attention_mask"]))
    valid = shifted_valid(labels)
    clean = torch.tensor(ds["clean_mask"]) & valid if "clean_mask" in ds.column_names else None
    junk = None
    if clean is not None:
        marks = {c: torch.tensor(ds[c]) for c in ("clean_mask", "junk_kind") if c in ds.column_names}
        junk = valid & junk_mask(marks)
    selector = info.get("selector")
    if ratio is None:  # the run's ratio; of a schedule (run_info holds its label), the one it ends at
        schedule = ratio_schedule(
            info["ratio"] if isinstance(info["ratio"], (int, float)) else saved["selector"]["ratio"]
        )
        ratio = schedule.start if schedule.kind == "constant" else schedule.end
    scores, score, rule, unlike = tl, "train_loss", str(selector), []
    if selector == "oracle" and junk is not None:  # as the run trained: every token but the junk
        mask = valid & ~junk
    elif selector in ("all", "blocks") or ratio >= 1.0:
        mask = valid
    else:
        mask, scores, score, rule = _as_the_run(info, saved, data, tl, valid, ratio, len(ds), unlike)
    if float(info.get("blocks", 1.0)) < 1.0:
        unlike.append(
            f"the run kept {info['blocks']:.0%} of the blocks it read (by {saved['selector'].get('block_score')}); "
            "these blocks are shown as if each had been kept"
        )
    if int(info.get("processes", 1)) > 1:
        unlike.append(f"the run selected on each of its {info['processes']} processes; here on one")
    tokens = [tok.convert_ids_to_tokens(row) for row in ds["input_ids"]]
    names = data.labels.get("junk_kind")
    kind = np.asarray(ds["junk_kind"]) if names and "junk_kind" in ds.column_names else None
    return SelectionSample(
        tokens, scores.numpy(), mask.numpy(), valid.numpy(), ratio, None if clean is None else clean.numpy(), score,
        kind, names if kind is not None else None, rule, tuple(unlike), None if junk is None else junk.numpy(),
    )  # fmt: skip


def _as_the_run(info: dict, saved: dict, data, tl, valid, ratio: float, rows: int, unlike: list):
    """(mask, the scores shown, their name, the rule) of the run's selector at ``ratio``; notes what differs."""
    sel = saved["selector"]
    columns = _reference_columns(info, data, rows, unlike)
    gen = torch.Generator().manual_seed(int(info.get("seed", 0)))
    scope = sel.get("scope", "batch")
    if scope == "dataset":
        unlike.append(
            "the run kept the tokens above a threshold over the whole run; here the top share of these blocks"
        )
    if scope in ("dataset", "global"):
        scope = "batch"
    if info["selector"] == "random":
        unlike.append("random scores are a fresh draw, not the run's own")
    rule = f"{info['selector']} at {ratio:g} per {'sequence' if scope == 'sequence' else 'batch of these blocks'}"
    names = list(sel.get("scores") or []) if info["selector"] in COMBINATIONS else [info["selector"]]
    missing = [n for n in names if NEEDS.get(n) and NEEDS[n] not in columns]
    if missing:
        unlike.append(f"{', '.join(missing)} needs the reference's values, which are not stored: ranked by train_loss")
        names = ["train_loss" if n in missing else n for n in names]
    scored = [score_tokens(n, tl, columns.get("ref_loss"), gen, columns.get("ref_entropy")) for n in names]
    if len(scored) == 2:
        mask = select_combined(info["selector"], *scored, ratio, valid=valid, scope=scope, generator=gen)
        return mask, scored[0], names[0], f"{rule} ({names[0]} {info['selector']} {names[1]})"
    return select_tokens(scored[0], ratio, valid=valid, scope=scope, generator=gen), scored[0], names[0], rule


def _reference_columns(info: dict, data, rows: int, unlike: list) -> dict:
    """The reference values the run ranked by, for the sample's rows: its stored losses (and entropies where
    stored); a live reference's are not recomputed (noted)."""
    if info.get("scores_dir"):
        store = load_stored(info["scores_dir"], expected_store(data))
        return {c: store.rows(range(rows), c) for c in store.columns}
    if info.get("reference") == "live":
        unlike.append(
            "the run scored a live reference; without its losses here, the scores that need them are not shown"
        )
    return {}


def _from_launch_dir(data_cfg: dict, launch_dir: str | None) -> dict:
    """The run's data settings with a relative local source made absolute against the folder it was
    launched from (run_info.json records it), so the sample can be read from anywhere (a notebook's folder)."""
    source = data_cfg.get("source")
    if launch_dir and source and not os.path.isabs(os.path.expanduser(source)):
        there = os.path.join(launch_dir, source)
        if is_local(source) and (os.path.exists(there) or glob.glob(there)):
            return {**data_cfg, "source": there}
    return data_cfg


def highlight_html(sample: SelectionSample, rows: int = 3) -> str:
    """Selected tokens on a green background, rejected ones struck through in grey."""
    out = []
    for b in range(min(rows, len(sample.tokens))):
        spans = []
        for t, tok in enumerate(sample.tokens[b]):
            text = html.escape(tok.replace("\n", "⏎"))
            if not sample.valid[b, t]:
                style, title = "color:#bbb", ""
            elif sample.mask[b, t]:
                style, title = "background:#b7f0b1", f"{sample.excess[b, t]:.2f}"
            else:
                style, title = "color:#999;text-decoration:line-through", f"{sample.excess[b, t]:.2f}"
            spans.append(f"<span style='{style}' title='{title}'>{text}</span>")
        out.append("<div style='font-family:monospace;white-space:pre-wrap;margin:6px 0'>" + "".join(spans) + "</div>")
    return "\n".join(out)
