"""Reading runs: data-efficiency curves, savings against the baseline, plots, what a run kept. Imports
slm.data, slm.model, slm.reference, slm.runs and slm.selection; never the training loop, so slm-curves stays light.

  efficiency.py       RunRecord, Curve, load_runs, curves (grouped by settings, paired by seed), tokens_to_reach
  savings.py          the table: baseline's tokens, time and FLOPs each group needs to reach its loss
  plots.py            the figure: loss (and accuracy) against tokens, time and FLOPs
  tables.py           a table of rows written as CSV and Markdown (the savings table, the audit)
  audit_report.py     the selection audit per group: clean kept, junk dropped (by kind), per source and block part
  report.py           main of slm-curves
  selection_sample.py what the selector keeps in a finished run (notebooks, slm-inspect)
  inspect.py          slm-inspect: a page showing, token by token, what a run keeps
  fidelity.py         python -m slm.analysis.fidelity: the sparse backward's gradient against the exact one, per layer
"""

from slm.analysis.efficiency import Curve, RunRecord, curves, load_runs, tokens_to_reach
from slm.analysis.plots import plot
from slm.analysis.report import main
from slm.analysis.savings import savings_table, write_table
from slm.analysis.selection_sample import SelectionSample, highlight_html, selection_sample

__all__ = [
    "Curve",
    "RunRecord",
    "SelectionSample",
    "curves",
    "highlight_html",
    "load_runs",
    "main",
    "plot",
    "savings_table",
    "selection_sample",
    "tokens_to_reach",
    "write_table",
]
