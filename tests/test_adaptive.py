"""Selection that adapts to the corpus: a threshold over the run, and whole blocks (issue 20)."""

import pytest
import torch

from slm.selection import RunningThreshold, block_scores, select_blocks, select_tokens


def test_a_running_threshold_keeps_more_of_a_clean_batch_and_meets_the_ratio_over_the_run():
    g = torch.Generator().manual_seed(0)
    sel, ratio = RunningThreshold(window=4096), 0.4
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
    """Against a plain re-implementation: the (1 - level) quantile of the last `window` scores."""
    g = torch.Generator().manual_seed(1)
    sel, seen, kept, recent = RunningThreshold(window=100), 0, 0, []
    for _ in range(10):
        scores, valid = torch.randn(4, 16, generator=g), torch.rand(4, 16, generator=g) > 0.2
        level = min(1.0, max(0.0, 0.3 + (0.3 * seen - kept) / 100))
        recent = (recent + scores[valid].tolist())[-100:]
        threshold = torch.quantile(torch.tensor(recent), 1 - level)
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
