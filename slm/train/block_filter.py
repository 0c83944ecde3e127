"""Sequence-level selection inside a training step: which of a micro-batch's candidate blocks train.

A step reads ``batch_size / ratio`` candidate blocks per micro-batch and keeps the ``batch_size``
best by a block score (:mod:`slm.selection.blocks`); only the kept blocks go through the training
forward and backward (token selection inside them as configured). Scoring by the training model's
loss (``excess_loss``, ``train_loss``) costs one no-grad forward of every candidate; a live reference
runs on every candidate its score asks about (``excess_loss``, ``reference_loss``); by the reference's
stored losses (``reference_loss``), nothing. Each process keeps the best of its own
candidates, so W processes equal one process with W accumulated micro-batches (``BatchStream``
deals them the same rows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from slm.model import shifted_valid
from slm.selection import BLOCK_SCORES, block_scores, check_ratio, select_blocks
from slm.train.batches import to_device


def candidates(batch_size: int, blocks: float) -> int:
    """Candidate blocks a micro-batch of ``batch_size`` reads when a share ``blocks`` of them is kept."""
    return max(batch_size, round(batch_size / blocks))


def check_blocks(batch_size: int, blocks: float) -> None:
    """Refuse a block share that keeps every candidate at this batch size (no block is ever dropped),
    naming the nearest settings that select."""
    if blocks < 1.0 and candidates(batch_size, blocks) == batch_size:
        share = batch_size / (batch_size + 0.5)  # the largest share with one candidate more than is kept
        least = math.ceil(0.5 * blocks / (1.0 - blocks) - 1e-9)  # the smallest batch with one more candidate
        raise ValueError(
            f"selector.blocks={blocks} with trainer.batch_size={batch_size} reads round({batch_size}/{blocks}) = "
            f"{batch_size} candidate block(s) per micro-batch and keeps them all: no block selection happens. Use "
            f"selector.blocks<={share:.3f} (at this batch size) or trainer.batch_size>={max(least, batch_size + 1)}"
        )


@dataclass
class BlockFilter:
    ratio: float  # the share of candidate blocks kept
    score: str  # excess_loss | train_loss | reference_loss
    batch_size: int  # blocks kept per micro-batch

    def __post_init__(self):
        self.ratio = check_ratio(self.ratio, "selector.blocks")
        if self.score not in BLOCK_SCORES:
            raise ValueError(f"selector.block_score must be one of {BLOCK_SCORES}, got {self.score!r}")

    @property
    def candidates(self) -> int:
        """Blocks read per micro-batch."""
        return candidates(self.batch_size, self.ratio)

    @property
    def forwards(self) -> bool:
        """Whether scoring runs the training model (a no-grad forward of every candidate)."""
        return self.score != "reference_loss"

    def first(self, batch: dict) -> dict:
        """The first ``batch_size`` candidates (a random draw of them: the stream shuffles): block selection off."""
        return {k: v[: self.batch_size] for k, v in batch.items()}

    @torch.no_grad()
    def keep(self, batch: dict, engine, ref) -> dict:
        """The ``batch_size`` best blocks of a CPU batch of candidates, on the engine's device: which ones
        is never read to the host (the step counts its tokens there, in its one reduce)."""
        on_device = to_device(batch, engine.device)
        valid = shifted_valid(on_device["labels"])
        token_loss = None
        if self.forwards:
            engine.lm.eval()  # scoring, not training: no dropout
            with engine.autocast():
                out = engine.model(
                    input_ids=on_device["input_ids"],
                    labels=on_device["labels"],
                    attention_mask=on_device["attention_mask"],
                    ratio=1.0,
                )
            engine.lm.train()
            token_loss = out.token_loss
        ref_loss = ref.values(on_device).get("ref_loss") if self.score != "train_loss" else None
        scores = block_scores(self.score, valid, token_loss=token_loss, ref_loss=ref_loss)
        kept = select_blocks(scores, self.batch_size)
        return {k: v[kept] for k, v in on_device.items()}
