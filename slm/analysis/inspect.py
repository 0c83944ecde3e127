"""``slm-inspect RUN``: a page showing, token by token, what a finished run keeps of sample training blocks.

It scores the first blocks of the run's training data with the run's final model (and its stored
reference losses) and selects as the run did (:func:`slm.analysis.selection_sample`). Kept tokens are
green, dropped ones struck through, every token's score in its tooltip; where the corpus marks its clean
text, junk tokens are underlined in red, so a kept junk token or a dropped clean one stands out. A
histogram compares the scores of kept and dropped tokens. Works on any run, own data given by
relative paths included (the run records the folder it was launched from).
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
from pathlib import Path

import numpy as np

from slm.analysis.selection_sample import SelectionSample, selection_sample
from slm.runs import RUN_INFO

PAGE = "inspect.html"
STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; max-width: 1100px; }
.tokens { font-family: monospace; white-space: pre-wrap; line-height: 1.6; border: 1px solid #ddd; padding: 8px; }
.tok.kept { background: #b7f0b1; }
.tok.dropped { color: #888; text-decoration: line-through; }
.tok.pad { color: #ccc; }
.tok.junk { border-bottom: 2px solid #e0413a; }
.legend span { margin-right: 18px; }
"""


def render(sample: SelectionSample, title: str, info: dict) -> str:
    """The page for one sample (self-contained: the histogram is embedded)."""
    kept, valid = int(sample.mask.sum()), int(sample.valid.sum())
    facts = [
        f"selector {info.get('selector')}",
        f"ratio {info.get('ratio')}",
        f"selected by {sample.rule} (scores shown: {sample.score.replace('_', ' ')})",
        f"kept {kept} of {valid} tokens ({kept / max(valid, 1):.0%}) in these {len(sample.tokens)} blocks",
    ]
    if sample.clean is not None:
        clean, junk = sample.clean.astype(bool), sample.junk.astype(bool)  # what is neither counts in neither
        mask = sample.mask.astype(bool)
        if clean.any():
            facts.append(f"clean tokens kept {(mask & clean).sum() / clean.sum():.0%}")
        if junk.any():
            facts.append(f"junk tokens dropped {1 - (mask & junk).sum() / junk.sum():.0%}")
    for label, name in enumerate((sample.kind_names or [])[1:], 1):  # label 0: not junk
        of_kind = sample.valid.astype(bool) & (sample.kind == label)
        if of_kind.any():
            facts.append(f"{name} dropped {1 - (sample.mask.astype(bool) & of_kind).sum() / of_kind.sum():.0%}")
    blocks = "\n".join(_block(sample, b) for b in range(len(sample.tokens)))
    legend = (
        "<span class='tok kept'>kept</span><span class='tok dropped'>dropped</span>"
        + ("<span class='tok junk'>junk (the corpus says)</span>" if sample.clean is not None else "")
        + "<span>hover a token for its score</span>"
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>slm-inspect: {html.escape(title)}</title><style>{STYLE}</style></head>
<body>
<h1>What {html.escape(title)} keeps</h1>
<p id="summary" data-kept="{kept}" data-valid="{valid}">{html.escape("; ".join(facts))}</p>
<p id="about">{html.escape(_about(sample))}</p>
{_unlike(sample)}
<p class="legend">{legend}</p>
{_histogram(sample)}
{blocks}
</body></html>
"""


def _about(sample: SelectionSample) -> str:
    return (
        f"The first {len(sample.tokens)} training blocks, scored by the run's final model (and its reference's stored "
        "values), then selected by the run's rule: so the shares here can differ from the run's own audit, which "
        "counts what the model of each step kept. The histogram's x-axis is the score selection ranks by "
        "(excess loss: the model's loss minus the reference's; higher is kept first)."
    )


def _unlike(sample: SelectionSample) -> str:
    if not sample.unlike_the_run:
        return ""
    items = "".join(f"<li>{html.escape(n)}</li>" for n in sample.unlike_the_run)
    return f"<div id='unlike'><p>What this page cannot reproduce of the run's selection:</p><ul>{items}</ul></div>"


def _block(sample: SelectionSample, b: int) -> str:
    spans = []
    for t, token in enumerate(sample.tokens[b]):
        text = html.escape(token.replace("\n", "⏎\n"))
        if not sample.valid[b, t]:
            spans.append(f"<span class='tok pad'>{text}</span>")
            continue
        cls = "kept" if sample.mask[b, t] else "dropped"
        if sample.junk is not None and sample.junk[b, t]:
            cls += " junk"
        score = f"{sample.excess[b, t]:.3f}"
        kind = sample.kind_names[sample.kind[b, t]] if sample.kind is not None and sample.kind[b, t] else None
        about = (
            f" data-kind='{kind}' title='{sample.score} {score}; junk: {kind}'"
            if kind
            else f" title='{sample.score} {score}'"
        )
        spans.append(f"<span class='tok {cls}' data-score='{score}'{about}>{text}</span>")
    kept, valid = int(sample.mask[b].sum()), int(sample.valid[b].sum())
    return (
        f"<section class='block' data-kept='{kept}' data-valid='{valid}'><h3>block {b}: kept {kept} of {valid}</h3>"
        f"<div class='tokens'>{''.join(spans)}</div></section>"
    )


def _histogram(sample: SelectionSample) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    valid, mask = sample.valid.astype(bool), sample.mask.astype(bool)
    kept, dropped = sample.excess[valid & mask], sample.excess[valid & ~mask]
    fig = Figure(figsize=(7, 2.6))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    both = np.concatenate([kept, dropped]) if kept.size + dropped.size else np.zeros(1)
    bins = np.linspace(float(both.min()), float(both.max()) + 1e-6, 40)
    ax.hist(dropped, bins=bins, alpha=0.6, label=f"dropped ({dropped.size})", color="#999")
    ax.hist(kept, bins=bins, alpha=0.6, label=f"kept ({kept.size})", color="#3a9e3a")
    ax.set_xlabel(sample.score.replace("_", " "))
    ax.legend(frameon=False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    data = base64.b64encode(buf.getvalue()).decode()
    return f"<img id='histogram' alt='scores of kept and dropped tokens' src='data:image/png;base64,{data}'>"


def write_page(run_dir: str | Path, out: str | Path | None = None, n_blocks: int = 8) -> Path:
    run_dir = Path(run_dir)
    info = json.loads((run_dir / RUN_INFO).read_text())
    sample = selection_sample(run_dir, n_blocks=n_blocks)
    out = Path(out) if out else run_dir / PAGE
    out.write_text(render(sample, info.get("name") or run_dir.name, info))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="slm-inspect", description=__doc__.split("\n")[0])
    p.add_argument("run", help="a finished run's folder (it holds model/ and run_info.json)")
    p.add_argument("--blocks", type=int, default=8, help="training blocks to show (default 8)")
    p.add_argument("--out", default=None, help=f"the page to write (default: RUN/{PAGE})")
    args = p.parse_args(argv)
    run = Path(args.run)
    if not (run / RUN_INFO).exists() or not (run / "model").exists():
        raise SystemExit(f"slm-inspect: {run} is not a finished run (it needs run_info.json and model/)")
    print(f"slm-inspect: wrote {write_page(run, args.out, args.blocks)}")
