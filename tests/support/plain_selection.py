"""Plain reimplementations that slm.selection is checked against, and random cases for them."""

import torch


def plain_top_k(scores, valid, k):
    """Reference: walk tokens by (score desc, position asc) and keep the first k valid ones."""
    flat = [(-s, i) for i, (s, v) in enumerate(zip(scores.flatten().tolist(), valid.flatten().tolist())) if v]
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    for _, i in sorted(flat)[:k]:
        keep[i] = True
    return keep.view(scores.shape)


def random_case(seed, shape=(4, 9), ties=False):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(shape, generator=g)
    if ties:
        scores = scores.round()  # many equal scores
    valid = torch.rand(shape, generator=g) < 0.7
    return scores, valid
