"""What each training step trains, and by what: the selection ratio over the run, the reference's values,
whole blocks kept before tokens (:mod:`slm.train.block_filter`), or exactly the tokens a data column marks
(the oracle arm). One object, so that the loop takes what selection needs in one argument."""

from __future__ import annotations

from dataclasses import dataclass, field

from slm.reference import RefSource
from slm.selection import RatioSchedule
from slm.train.block_filter import BlockFilter


@dataclass
class StepSelection:
    ratio: RatioSchedule | float | None = None  # the ratio over the run; None: the model's own
    ref: RefSource = field(default_factory=RefSource)  # none | live | stored reference values
    blocks: BlockFilter | None = None  # sequence-level selection: the best candidate blocks of each micro-batch
    mask_column: str | None = None  # train exactly the tokens this training-data column marks (selector=oracle)

    def columns(self, available: list[str]) -> list[str]:
        """The training-data columns a step reads for this selection (its mask column, checked present)."""
        if self.mask_column is None:
            return []
        if self.mask_column not in available:
            raise ValueError(
                f"the training data has no {self.mask_column} column: selector=oracle needs a corpus that marks its "
                "clean tokens (data=realtext)"
            )
        return [self.mask_column]
