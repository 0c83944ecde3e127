"""Selection that adapts to the corpus: a threshold over the run, and whole blocks (issue 20)."""

import pytest
import torch

from slm.selection import RunningThreshold, block_scores, select_blocks, select_tokens


def test_a_running_threshold_keeps_more_of_a_clean_batch_and_meets_the_ratio_over_the_run():
    g = torch.Generator().manual_seed(0)
    sel, ratio = RunningThreshold(window=8), 0.4
    kept = valid_total = 0
    clean_kept, junk_kept = [], []
    for step in range(60):
        junky = step % 3 == 0  # every third batch is mostly low-score junk
        scores = torch.randn(8, 64, generator=g) - step * 0.02  # scores drift down as the model learns
        if junky:
            scores[:6] -= 3.0
        valid = torch.rand(8, 64, generator=g) > 0.1
        mask = sel.select(scores, valid, ratio)
        assert not (mask & ~valid).any()
        kept, valid_total = kept + int(mask.sum()), valid_total + int(valid.sum())
        if step:  # the first batch has nothing to be ranked against: it keeps the ratio
            (junk_kept if junky else clean_kept).append(float(mask.sum() / valid.sum()))
    assert kept / valid_total == pytest.approx(ratio, abs=0.01)  # the share over the run meets the ratio
    assert min(clean_kept) > ratio > max(junk_kept)  # a junk-heavy batch trains fewer tokens, a clean one more
    assert (sel.kept, sel.seen) == (kept, valid_total)


def test_the_running_threshold_is_a_plain_quantile_of_the_recent_scores():
    """Against a plain re-implementation: the (1 - level) quantile of the last `window` steps' scores."""
    g = torch.Generator().manual_seed(1)
    sel, seen, kept, recent = RunningThreshold(window=3), 0, 0, []
    for _ in range(10):
        scores, valid = torch.randn(4, 16, generator=g), torch.rand(4, 16, generator=g) > 0.2
        n = int(valid.sum())
        level = min(1.0, max(0.0, 0.3 + (0.3 * seen - kept) / (4 * n)))
        recent = (recent + [scores[valid].tolist()])[-3:]
        threshold = torch.quantile(torch.tensor([x for step in recent for x in step]), 1 - level)
        expected = valid & (scores >= threshold)
        assert torch.equal(sel.select(scores, valid, 0.3), expected)
        seen, kept = seen + int(valid.sum()), kept + int(expected.sum())
    state = sel.state_dict()
    again = RunningThreshold()
    again.load_state_dict(state)  # resumes with the same recent scores and counts
    scores, valid = torch.randn(4, 16, generator=g), torch.ones(4, 16, dtype=torch.bool)
    assert torch.equal(again.select(scores, valid, 0.3), sel.select(scores, valid, 0.3))


def test_block_scores_and_selection_against_a_plain_reimplementation():
    g = torch.Generator().manual_seed(2)
    tl, ref = torch.rand(6, 10, generator=g) * 5, torch.rand(6, 10, generator=g) * 5
    valid = torch.rand(6, 10, generator=g) > 0.3
    valid[4] = False  # a block without a valid token is never kept
    for name, per_token in (("excess_loss", tl - ref), ("train_loss", tl), ("reference_loss", -ref)):
        got = block_scores(name, valid, token_loss=tl, ref_loss=ref)
        for b in range(6):
            expected = per_token[b][valid[b]].mean() if valid[b].any() else float("-inf")
            assert float(got[b]) == pytest.approx(float(expected)), (name, b)
        keep = select_blocks(got, 3)
        assert keep.tolist() == sorted(sorted(range(6), key=lambda b: -float(got[b]))[:3])
        assert 4 not in keep.tolist()
    with pytest.raises(ValueError, match="needs ref_loss"):
        block_scores("excess_loss", valid, token_loss=tl)
    assert torch.equal(select_blocks(torch.tensor([1.0, 1.0, 0.0]), 1), torch.tensor([0]))  # ties: the earlier


def test_top_k_is_unchanged_by_the_package_split():
    scores, valid = torch.tensor([[3.0, 1.0, 2.0, 0.5]]), torch.tensor([[False, True, True, True]])
    assert select_tokens(scores, 0.67, valid=valid).tolist() == [[False, True, True, False]]


# --- through slm-train -----------------------------------------------------------------------------

import os  # noqa: E402
import signal  # noqa: E402

from helpers import compose_train  # noqa: E402

from slm.cli import train  # noqa: E402
from slm.runs import read_metrics  # noqa: E402
from slm.train import RunInterrupted, Trainer  # noqa: E402


def _steps(run, key):
    return [e[key] for e in read_metrics(run) if key in e and "train/loss" in e]


def _resumed_equals_whole(tmp_path, monkeypatch, *overrides):
    """Ctrl-C at step 3 of 6, resume: the same metrics and weights as a run never interrupted."""
    from safetensors.torch import load_file

    common = ("trainer.checkpoint_every=100", *overrides)
    train(compose_train(tmp_path / "c", *common), tmp_path / "whole")
    real = Trainer.train_step

    def ctrl_c_in_step_3(self):
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self)

    monkeypatch.setattr(Trainer, "train_step", ctrl_c_in_step_3)
    with pytest.raises(RunInterrupted):
        train(compose_train(tmp_path / "c", *common), tmp_path / "cut")
    monkeypatch.setattr(Trainer, "train_step", real)
    train(compose_train(tmp_path / "c", *common, "trainer.resume=true"), tmp_path / "cut")
    for key in ("train/loss", "tokens_seen", "tokens_selected", "flops"):
        assert _steps(tmp_path / "cut", key) == pytest.approx(_steps(tmp_path / "whole", key), rel=1e-6), key
    a, b = (load_file(str(tmp_path / d / "model" / "model.safetensors")) for d in ("whole", "cut"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=1e-5)


def test_a_threshold_over_the_run_trains_data_dependent_counts_and_resumes_exactly(tmp_path, monkeypatch):
    train(compose_train(tmp_path / "c", "selector.scope=dataset", "selector.ratio=0.4"), tmp_path / "run")
    fracs = _steps(tmp_path / "run", "train/selected_frac")
    assert len(set(round(f, 4) for f in fracs)) > 1  # batches train different shares
    seen, sel = _steps(tmp_path / "run", "tokens_seen")[-1], _steps(tmp_path / "run", "tokens_selected")[-1]
    assert 0.25 < sel / seen < 0.5  # the ratio of the valid tokens, paid back within a few steps
    with pytest.raises(ValueError, match="selector.scope=dataset keeps a data-dependent number.*grad_accum must be 1"):
        train(compose_train(tmp_path / "c", "selector.scope=dataset", "trainer.grad_accum=2"), tmp_path / "x")
    _resumed_equals_whole(tmp_path / "resume", monkeypatch, "selector.scope=dataset", "selector.ratio=0.4")


@pytest.mark.parametrize("score", ["excess_loss", "reference_loss"])
def test_whole_blocks_are_selected_and_only_the_kept_ones_train(tmp_path, score):
    base = ("selector.ratio=1.0", "trainer.batch_size=4")
    train(compose_train(tmp_path / "c", *base), tmp_path / "all")
    train(compose_train(tmp_path / "c", *base, "selector.blocks=0.5", f"selector.block_score={score}"),
          tmp_path / "blocks")  # fmt: skip
    seen_all, seen_blocks = _steps(tmp_path / "all", "tokens_seen"), _steps(tmp_path / "blocks", "tokens_seen")
    sel_blocks = _steps(tmp_path / "blocks", "tokens_selected")
    # each step reads 8 candidate blocks and trains 4 of them, every valid token of those
    assert seen_blocks[-1] > 1.8 * seen_all[-1] and sel_blocks[-1] < 0.6 * seen_blocks[-1]
    flops_all, flops_blocks = _steps(tmp_path / "all", "flops"), _steps(tmp_path / "blocks", "flops")
    if score == "excess_loss":  # a no-grad forward of every candidate: more than the plain run's FLOPs
        assert flops_blocks[-1] > flops_all[-1]
    else:  # stored reference losses: no forward, so about the plain run's
        assert flops_blocks[-1] == pytest.approx(flops_all[-1], rel=0.1)


def test_whole_block_selection_resumes_exactly(tmp_path, monkeypatch):
    _resumed_equals_whole(tmp_path, monkeypatch, "selector.blocks=0.5", "selector.ratio=0.6")


def test_an_evolving_reference_is_refreshed_on_schedule_scored_live_and_resumes_exactly(tmp_path, monkeypatch):
    train(compose_train(tmp_path / "c", "reference.evolve_every=2", "reference.evolve_ema=0.5"), tmp_path / "run")
    ckpt = sorted((tmp_path / "run" / "checkpoints").glob("step_*"))[-1]
    assert torch.load(ckpt / "reference.pt", weights_only=True)["refreshes"] == 3  # steps 2, 4 and 6
    # scored live: every step pays a reference forward, which the FLOPs count
    train(compose_train(tmp_path / "c"), tmp_path / "fixed")
    assert _steps(tmp_path / "run", "flops")[-1] > 1.2 * _steps(tmp_path / "fixed", "flops")[-1]
    with pytest.raises(ValueError, match="reference.evolve_every refreshes a reference model.*reference=stored"):
        train(compose_train(tmp_path / "c", "reference=stored", "reference.scores_dir=/x", "+reference.evolve_every=2"),
              tmp_path / "x")  # fmt: skip
    _resumed_equals_whole(tmp_path / "resume", monkeypatch, "reference.evolve_every=2")


def test_the_realtext_corpus_is_prose_and_junk_half_and_half_with_clean_splits():
    from slm.data.realtext import RealTextConfig, generate

    cfg = RealTextConfig()
    splits = {s: [d["text"] for d in generate(cfg, s)] for s in ("train", "clean", "validation")}
    assert splits == {s: [d["text"] for d in generate(cfg, s)] for s in splits}  # deterministic
    assert min(len(v) for v in splits.values()) > 50
    printable = set(__import__("string").printable) - {"\x0b", "\x0c", "\r"}
    assert all(set(t) <= printable for v in splits.values() for t in v)  # the built-in tokenizer covers it
    clean_docs = set(splits["clean"]) | set(splits["validation"])
    assert not set(splits["clean"]) & set(splits["validation"])
    train_text = "\n\n".join(splits["train"])
    leaked = [d for d in clean_docs if d[:200] in train_text]
    assert not leaked  # no clean or held-out document appears in the training text
    paragraphs = _prose_paragraphs(cfg)
    prose = sum(len(p) for t in splits["train"] for p in t.split("\n\n") if p and p in paragraphs)
    assert 0.4 < prose / len(train_text) < 0.6  # about half of the training text is junk


def _prose_paragraphs(cfg):
    import re

    from slm.data import prose_documents

    return {p.strip("\n") for d in prose_documents(cfg.min_chars) for p in re.split(r"\n\s*\n", d) if p.strip()}
