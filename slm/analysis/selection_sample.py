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

from slm.data import build, is_local
from slm.model import shifted_valid, token_losses
from slm.reference import expected_store, load_stored
from slm.runs import CONFIG, RUN_INFO
from slm.selection import excess_loss, ratio_schedule, select_tokens


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
    junk: np.ndarray | None = None  # [B, T] the corpus's junk (neither this nor clean: paragraph breaks, document ends)


def selection_sample(run_dir: str | Path, n_blocks: int = 8, ratio: float | None = None) -> SelectionSample:
    """Score the first ``n_blocks`` training blocks with the run's final model (and its stored reference
    losses), and select as the run did: top ``ratio`` by excess loss over the batch (by the model's own
    loss without a stored reference); every token for the baseline; every token but the junk for the oracle."""
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
    score, scores = "train_loss", tl
    if info.get("scores_dir"):
        ref_loss = load_stored(info["scores_dir"], expected_store(data)).rows(range(len(ds)))
        score, scores = "excess_loss", excess_loss(tl, ref_loss)
    valid = shifted_valid(labels)
    clean = torch.tensor(ds["clean_mask"]) & valid if "clean_mask" in ds.column_names else None
    junk = None
    if clean is not None:  # junk where the corpus marks it, else all that is not clean
        junk = valid & (torch.tensor(ds["junk_kind"]) > 0 if "junk_kind" in ds.column_names else ~clean)
    selector = info.get("selector")
    if ratio is None:  # the run's ratio; of a schedule (run_info holds its label), the one it ends at
        schedule = ratio_schedule(
            info["ratio"] if isinstance(info["ratio"], (int, float)) else saved["selector"]["ratio"]
        )
        ratio = schedule.start if schedule.kind == "constant" else schedule.end
    if selector == "oracle" and junk is not None:  # as the run trained: every token but the junk
        mask = valid & ~junk
    elif selector == "all" or ratio >= 1.0:
        mask = valid
    else:
        mask = select_tokens(scores, ratio, valid=valid)
    tokens = [tok.convert_ids_to_tokens(row) for row in ds["input_ids"]]
    names = data.labels.get("junk_kind")
    kind = np.asarray(ds["junk_kind"]) if names and "junk_kind" in ds.column_names else None
    return SelectionSample(
        tokens, scores.numpy(), mask.numpy(), valid.numpy(), ratio, None if clean is None else clean.numpy(), score,
        kind, names if kind is not None else None, None if junk is None else junk.numpy(),
    )  # fmt: skip


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
