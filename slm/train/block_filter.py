"""Sequence-level selection inside a training step: which of a micro-batch's candidate blocks train.

A step reads ``batch_size / ratio`` candidate blocks per micro-batch and keeps the ``batch_size``
best by a block score (:mod:`slm.selection.blocks`); only the kept blocks go through the training
forward and backward (token selection inside them as configured). Scoring by the training model's
loss (``excess_loss``, ``train_loss``) costs one no-grad forward of every candidate; by the
reference's stored losses (``reference_loss``), nothing. Each process keeps the best of its own
candidates, so W processes equal one process with W accumulated micro-batches (``BatchStream``
deals them the same rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slm.model import shifted_valid
from slm.selection import BLOCK_SCORES, block_scores, check_ratio, select_blocks
from slm.train.batches import to_device


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
        return max(self.batch_size, round(self.batch_size / self.ratio))

    @property
    def forwards(self) -> bool:
        """Whether scoring runs the training model (a no-grad forward of every candidate)."""
        return self.score != "reference_loss"

    @torch.no_grad()
    def keep(self, batch: dict, engine, ref) -> dict:
        """The ``batch_size`` best blocks of a CPU batch of candidates (still on the CPU)."""
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
        kept = select_blocks(scores, self.batch_size).cpu()
        return {k: v[kept] for k, v in batch.items()}
