"""select_tokens and its relatives against plain reference implementations, in every scope."""

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from support.plain_selection import plain_top_k, random_case

from slm.selection import (
    num_to_keep,
    select_tokens,
)


def _global_worker(rank, world, port, scores, valid, ratio, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out[rank] = select_tokens(scores[rank], ratio, valid=valid[rank], scope="global")
    finally:
        dist.destroy_process_group()


def _non_finite_worker(rank, world, port, out):
    from slm.selection import NonFiniteScores

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=__import__("datetime").timedelta(seconds=20))
    try:
        first = torch.randn(2, 5)
        if rank == 1:
            first[0, 2] = float("nan")
        try:
            select_tokens(first, 0.5, scope="global")
            out[rank] = "no error"
        except NonFiniteScores:
            out[rank] = "raised"
        second = torch.arange(10.0).reshape(2, 5) + 10 * rank  # a loop that caught the error goes on
        out[f"{rank}-next"] = select_tokens(second, 0.3, scope="global")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ratio", [0.05, 0.3, 0.5, 0.6, 0.99, 1.0])
def test_batch_scope_matches_plain_top_k(seed, ratio):
    scores, valid = random_case(seed, ties=seed % 2 == 0)
    got = select_tokens(scores, ratio, valid=valid, scope="batch")
    k = num_to_keep(ratio, int(valid.sum()))
    assert int(got.sum()) == k
    assert torch.equal(got, plain_top_k(scores, valid, k))


@pytest.mark.parametrize("seed", range(4))
def test_sequence_scope_is_per_row_top_k(seed):
    scores, valid = random_case(seed, ties=True)
    got = select_tokens(scores, 0.4, valid=valid, scope="sequence")
    for b in range(scores.shape[0]):
        k = num_to_keep(0.4, int(valid[b].sum()))
        assert torch.equal(got[b], plain_top_k(scores[b], valid[b], k))


def test_rounding_and_minimum_one():
    assert num_to_keep(0.5, 5) == 3  # halves round up
    assert num_to_keep(0.3, 10) == 3
    assert num_to_keep(0.01, 3) == 1  # at least one
    assert num_to_keep(0.6, 0) == 0
    valid = torch.zeros(2, 4, dtype=torch.bool)
    valid[1, 2] = True
    got = select_tokens(torch.zeros(2, 4), 0.1, valid=valid, scope="sequence")
    assert torch.equal(got, valid)


def test_ratio_one_selects_exactly_valid_and_invalid_never_selected():
    scores, valid = random_case(0)
    assert torch.equal(select_tokens(scores, 1.0, valid=valid), valid)
    scores[~valid] = 1e9  # invalid tokens with the best scores still lose
    assert not (select_tokens(scores, 0.5, valid=valid) & ~valid).any()


def test_generator_breaks_ties_reproducibly():
    scores = torch.zeros(1, 40)
    a = select_tokens(scores, 0.25, generator=torch.Generator().manual_seed(1))
    b = select_tokens(scores, 0.25, generator=torch.Generator().manual_seed(1))
    c = select_tokens(scores, 0.25)
    assert torch.equal(a, b) and int(a.sum()) == 10
    assert torch.equal(c[0, :10], torch.ones(10, dtype=torch.bool))  # earlier position wins without one
    assert not torch.equal(a, c)


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.01, float("nan"), "high"])
def test_bad_ratio(ratio):
    with pytest.raises(ValueError, match="ratio"):
        select_tokens(torch.zeros(2, 3), ratio)


def test_bad_inputs():
    with pytest.raises(ValueError, match="shape"):
        select_tokens(torch.zeros(2, 3), 0.5, valid=torch.ones(3, 2, dtype=torch.bool))
    s = torch.zeros(2, 3)
    s[0, 1], s[1, 2] = float("nan"), float("inf")
    with pytest.raises(ValueError, match="2 valid token"):
        select_tokens(s, 0.5)
    valid = torch.ones(2, 3, dtype=torch.bool)
    valid[0, 1] = valid[1, 2] = False
    assert select_tokens(s, 0.5, valid=valid).sum() == 2  # non-finite scores on invalid tokens are fine
    with pytest.raises(ValueError, match="scope"):
        select_tokens(torch.zeros(2, 3), 0.5, scope="world")


def test_importing_selection_imports_no_framework():
    code = (
        "import sys, slm.selection, slm; "
        "bad = [m for m in ('transformers', 'accelerate', 'hydra', 'wandb', 'datasets') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("rows", [(2, 3), (2, 0)], ids=["uneven", "one-empty"])
def test_global_scope_equals_batch_scope_over_concatenated_batch(rows):
    # Uneven (even empty) local batches and ties: the selection must equal "batch" over the concatenation.
    g = torch.Generator().manual_seed(0)
    scores = [torch.randn(n, 7, generator=g).round() for n in rows]
    valid = [torch.rand(n, 7, generator=g) < 0.8 for n in rows]
    with mp.Manager() as manager:
        out = manager.dict()
        port = 29533 + rows[1]
        mp.spawn(_global_worker, args=(2, port, scores, valid, 0.37, out), nprocs=2, join=True)
        got = torch.cat([out[0], out[1]])
    expected = select_tokens(torch.cat(scores), 0.37, valid=torch.cat(valid), scope="batch")
    assert torch.equal(got, expected)
    assert select_tokens(torch.cat(scores), 0.37, valid=torch.cat(valid), scope="global").equal(expected)


def test_global_scope_non_finite_scores_raise_on_every_process():
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_non_finite_worker, args=(2, 29541, out), nprocs=2, join=True)
        assert out[0] == out[1] == "raised"
        got = torch.cat([out["0-next"], out["1-next"]])
    both = torch.cat([torch.arange(10.0).reshape(2, 5), torch.arange(10.0).reshape(2, 5) + 10])
    assert torch.equal(got, select_tokens(both, 0.3, scope="batch"))


def test_keep_counts_on_a_tensor_equal_num_to_keep_for_every_count_and_ratio():
    """The device-side count (no host read) is the host rule's integer, float edges included."""
    from slm.selection import keep_counts

    n = torch.arange(0, 5001)
    for ratio in (0.01, 0.1, 0.15, 0.3, 1 / 3, 0.37, 0.5, 0.6, 0.7, 0.9, 0.999, 1.0):
        assert keep_counts(ratio, n).tolist() == [num_to_keep(ratio, i) for i in range(5001)], ratio


def test_num_selected_counts_what_select_tokens_keeps():
    from slm.selection import num_selected

    for seed in range(5):
        scores, valid = random_case(seed, shape=(5, 11))
        for scope in ("sequence", "batch"):
            for ratio in (0.1, 0.37, 0.6, 1.0):
                assert num_selected(valid, ratio, scope) == int(select_tokens(scores, ratio, valid, scope).sum())


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("scope", ["batch", "sequence"])
def test_union_and_intersection_of_exact_top_k_sets(seed, scope):
    from slm.selection import select_combined

    a, valid = random_case(seed, ties=True)
    b = random_case(seed + 10, ties=True)[0]
    rows = range(a.shape[0]) if scope == "sequence" else [None]
    expect_u, expect_i = torch.zeros_like(valid), torch.zeros_like(valid)
    for r in rows:
        sl = slice(None) if r is None else r
        k = num_to_keep(0.3, int(valid[sl].sum()))
        top_a, top_b = plain_top_k(a[sl], valid[sl], k), plain_top_k(b[sl], valid[sl], k)
        expect_u[sl], expect_i[sl] = top_a | top_b, top_a & top_b
    assert torch.equal(select_combined("union", a, b, 0.3, valid, scope), expect_u)
    assert torch.equal(select_combined("intersection", a, b, 0.3, valid, scope), expect_i)
    assert not (expect_u & ~valid).any()  # invalid tokens never selected
    with pytest.raises(ValueError, match="combination must be one of"):
        select_combined("xor", a, b, 0.3, valid)


def test_top_k_is_unchanged_by_the_package_split():
    scores, valid = torch.tensor([[3.0, 1.0, 2.0, 0.5]]), torch.tensor([[False, True, True, True]])
    assert select_tokens(scores, 0.67, valid=valid).tolist() == [[False, True, True, False]]
