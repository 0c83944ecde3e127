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
