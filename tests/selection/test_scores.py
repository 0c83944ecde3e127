"""The score functions, and reference entropy keeping the most certain tokens."""

import pytest
import torch
from support.plain_selection import plain_top_k, random_case

from slm.selection import excess_loss, num_to_keep, random_scores, score_tokens, select_tokens


def test_score_functions():
    tl, ref = torch.tensor([[3.0, 1.0, 2.0]]), torch.tensor([[1.0, 1.5, 0.0]])
    assert torch.equal(excess_loss(tl, ref), tl - ref)
    assert torch.equal(score_tokens("train_loss", tl), tl)
    assert torch.equal(score_tokens("reference_loss", tl, ref), -ref)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert torch.equal(random_scores(tl, g1), random_scores(tl, g2))
    with pytest.raises(ValueError, match="unknown selector"):
        score_tokens("oracle", tl)
    with pytest.raises(ValueError, match="ref_loss has shape"):
        excess_loss(tl, ref[:, :2])


def test_reference_entropy_keeps_the_most_certain_tokens():
    from slm.selection import reference_entropy

    scores, valid = random_case(3, ties=True)
    entropy = scores.abs()  # entropies are >= 0; ties included
    got = select_tokens(score_tokens("reference_entropy", torch.zeros_like(entropy), ref_entropy=entropy), 0.4,
                        valid=valid)  # fmt: skip
    k = num_to_keep(0.4, int(valid.sum()))
    assert torch.equal(got, plain_top_k(-entropy, valid, k))  # lowest entropy first, earlier position on ties
    assert torch.equal(reference_entropy(entropy), -entropy)
    with pytest.raises(ValueError, match="needs ref_entropy"):
        score_tokens("reference_entropy", entropy)
