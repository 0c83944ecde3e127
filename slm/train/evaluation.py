"""Evaluation on a packed split: loss over every valid token and, where the split marks answers
(the built-in corpus), the share of answers predicted exactly."""

from __future__ import annotations

import math

import torch

from slm.model import shifted_valid
from slm.train.batches import fetch, to_device


def answer_accuracy(answer_mask: torch.Tensor, hits: torch.Tensor, valid: torch.Tensor) -> tuple[int, int]:
    """(correct, total) answers: runs of answer tokens, correct when every token is the arg-max.

    Answers cut by a block boundary (a token without a prediction) are not counted.
    """
    ans = answer_mask.bool()
    start = ans & ~torch.nn.functional.pad(ans[:, :-1], (1, 0), value=False)
    run = torch.cumsum(start.flatten().long(), 0) * ans.flatten()  # 0 = not an answer token
    n_runs = int(start.sum())
    if n_runs == 0:
        return 0, 0
    ok_valid = torch.ones(n_runs + 1, dtype=torch.long, device=ans.device)
    ok_hit = torch.ones_like(ok_valid)
    ok_valid.scatter_reduce_(0, run, valid.flatten().long(), "amin")
    ok_hit.scatter_reduce_(0, run, hits.flatten().long(), "amin")
    counted = ok_valid[1:].bool()
    return int((counted & ok_hit[1:].bool()).sum()), int(counted.sum())


@torch.no_grad()
def evaluate(engine, ds, batch_size: int) -> dict:
    """Loss over all valid tokens of ``ds`` and, if it has ``answer_mask``, answer accuracy."""
    acc, lm = engine.acc, engine.lm
    lm.eval()
    rank, world = acc.process_index, acc.num_processes
    sums = torch.zeros(4, dtype=torch.float64, device=acc.device)  # loss, tokens, correct, answers
    mine = list(range(rank, len(ds), world))
    # Every process runs the same number of forwards (FSDP and ZeRO-3 gather weights inside each
    # one): a process out of rows runs row 0 with every label ignored, which adds nothing.
    n_batches = math.ceil(math.ceil(len(ds) / world) / batch_size)
    for i in range(n_batches):
        b = fetch(ds, mine[i * batch_size : (i + 1) * batch_size] or [0])
        if i * batch_size >= len(mine):
            b["labels"] = torch.full_like(b["labels"], -100)
        b = to_device(b, acc.device)
        with engine.autocast():
            out = lm(
                input_ids=b["input_ids"],
                labels=b["labels"],
                attention_mask=b["attention_mask"],
                ratio=1.0,
                return_hits=True,
            )
        sums[0] += out.token_loss.sum().double()
        sums[1] += out.n_valid
        if "answer_mask" in b:
            correct, total = answer_accuracy(b["answer_mask"], out.hits, shifted_valid(b["labels"]))
            sums[2] += correct
            sums[3] += total
    sums = acc.reduce(sums, "sum")
    engine.reshard()
    lm.train()
    res = {"eval/loss": (sums[0] / sums[1].clamp(min=1)).item(), "eval/tokens": int(sums[1])}
    if sums[3] > 0:
        res["eval/answer_acc"] = (sums[2] / sums[3]).item()
    return res
