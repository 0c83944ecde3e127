"""The selection audit's labels on real packed text (issue 37 item 14): paragraph breaks and end-of-document
tokens are neither clean text nor junk; they count in neither share."""

import torch

from slm.model import shifted_valid
from slm.train import SelectionAudit, StepSelection, groupings


class _OneProcess:
    """What the audit asks of an accelerator, for one process on the CPU."""

    device = torch.device("cpu")
    is_main_process = True

    @staticmethod
    def reduce(t, op):
        return t


def _packed(corpus="realtext"):
    """32 blocks of a corpus that marks its clean text and its junk, packed as a run packs them."""
    from datasets import Dataset

    from slm.data import CorpusConfig, builtin_tokenizer
    from slm.data.builtin import arithmetic_documents
    from slm.data.packing import pack
    from slm.data.realtext import RealTextConfig, realtext_documents

    docs = (realtext_documents(RealTextConfig(), "train")[:30] if corpus == "realtext"
            else arithmetic_documents(CorpusConfig(n_train_docs=60, noise=0.5), "train"))  # fmt: skip
    packed = pack(Dataset.from_list(docs), builtin_tokenizer(), 64)
    return packed.column_names, packed.with_format("torch")[:32]


def test_structure_tokens_count_in_neither_share():
    columns, rows = _packed()
    valid = shifted_valid(rows["labels"])
    clean, junk = rows["clean_mask"].bool(), rows["junk_kind"] > 0
    structure = valid & ~clean & ~junk  # paragraph breaks, end-of-document tokens
    assert structure.any() and not (clean & junk).any()
    audit = SelectionAudit(groupings(columns, {}), torch.device("cpu"))
    run = type("Run", (), {"acc": _OneProcess(), "step": 1})()
    audit.read(rows)
    audit.trained(rows, structure)  # a step that trains only the structure tokens
    shares = audit.at_eval(run, {})
    assert shares["audit/clean_kept"] == 0.0 and shares["audit/junk_dropped"] == 1.0  # no junk was trained
    audit.read(rows)
    audit.trained(rows, valid & ~junk)  # every token but the junk
    shares = audit.at_eval(run, {})
    assert shares["audit/clean_kept"] == 1.0 and shares["audit/junk_dropped"] == 1.0


def test_the_oracle_trains_every_token_but_the_junk():
    """Clean text and its structure (paragraph breaks, document ends) train; the junk does not."""
    for corpus in ("realtext", "builtin"):
        columns, rows = _packed(corpus)
        oracle = StepSelection(oracle=True)
        assert set(oracle.columns(columns)) == {"clean_mask", "junk_kind"}
        assert torch.equal(oracle.mask(rows), rows["junk_kind"] == 0)
        assert (oracle.mask(rows) & ~rows["clean_mask"].bool() & shifted_valid(rows["labels"])).any()


def test_a_rising_eval_loss_is_reported_once_from_where_it_began(caplog):
    """The watch added without a Trainer keyword or a CLI change (issue 36): eval/loss rising at 3 eval points in a
    row is reported once, from the first of them; a fall in between starts the count again."""
    import logging
    from types import SimpleNamespace

    from slm.train import RisingEval

    watch, run = RisingEval(patience=3), SimpleNamespace(step=0)
    losses = [3.0, 2.5, 2.6, 2.4, 2.45, 2.5, 2.55, 2.6, 2.7]  # rises at steps 2; 4, 5, 6 (reported), 7, 8
    with caplog.at_level(logging.WARNING, logger="slm.train.watchers"):
        for step, loss in enumerate(losses):
            run.step = step
            watch.at_eval(run, {"eval/loss": loss})
    assert watch.result() == {"eval_rising_since": 4}
    assert sum("has risen at 3 eval points" in r.message for r in caplog.records) == 1
    again = RisingEval(patience=3)
    again.load(watch.state(run), run)
    assert again.result() == watch.result() and again.last == 2.7


def test_every_run_carries_the_rising_eval_watch_in_its_checkpoints(tmp_path):
    import json

    from support.compose import compose_train

    from slm.cli import train_composed
    from slm.runs import checkpoints, read_metrics

    train_composed(compose_train(tmp_path / "c", "reference=none", "trainer.max_steps=3", "trainer.eval_every=1"),
                   tmp_path / "run")  # fmt: skip
    state = json.loads((checkpoints.latest(tmp_path / "run") / "slm_state.json").read_text())
    last_eval = [e["eval/loss"] for e in read_metrics(tmp_path / "run") if "eval/loss" in e][-1]
    assert state["rising_eval"]["last"] == last_eval
