"""What each training step trains, and by what: the selection ratio over the run, the reference's values,
whole blocks kept before tokens (:mod:`slm.train.block_filter`), or the oracle arm's tokens (every token its
corpus does not mark as junk). One object, so that the loop takes what selection needs in one argument."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from slm.data import junk_mask
from slm.reference import RefSource
from slm.selection import RatioSchedule
from slm.train.block_filter import BlockFilter


@dataclass
class StepSelection:
    ratio: RatioSchedule | float | None = None  # the ratio over the run; None: the model's own
    ref: RefSource = field(default_factory=RefSource)  # none | live | stored reference values
    blocks: BlockFilter | None = None  # sequence-level selection: the best candidate blocks of each micro-batch
    oracle: bool = False  # train exactly the tokens the corpus does not mark as junk (selector=oracle)

    def columns(self, available: list[str]) -> list[str]:
        """The training-data columns a step reads for this selection (the oracle's, checked present)."""
        if not self.oracle:
            return []
        if "clean_mask" not in available:
            raise ValueError(
                "the training data has no clean_mask column: selector=oracle needs a corpus that marks its clean "
                "tokens (data=realtext)"
            )
        return ["clean_mask", *(["junk_kind"] if "junk_kind" in available else [])]

    def mask(self, batch: dict) -> Tensor | None:
        """The tokens the oracle trains in ``batch``: clean text and its structure (paragraph breaks, document
        ends), everything but the junk; where the corpus marks only its clean text, that. None: not the oracle."""
        return ~junk_mask(batch) if self.oracle else None
