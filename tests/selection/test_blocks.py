"""Whole-block ranking and selection against a plain reimplementation."""

import pytest
import torch

from slm.selection import block_scores, select_blocks


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
