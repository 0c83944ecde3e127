"""Continued pretraining (``base=train``): a small base model pretrained once on general text, cached like a
trained reference (:func:`slm.recipes.cached_training.train_stage`), from which the training model starts, and
the reference too where ``reference.init=pretrained`` (Rho-1's shape: the reference is the base fine-tuned on
clean domain text). Its quality is reported as a trained reference's is."""

from __future__ import annotations

import logging
from dataclasses import replace

from slm.data import PackedData
from slm.recipes.cached_training import train_stage
from slm.recipes.references import describe_quality, measured_quality, reference_eval, trained_quality
from slm.recipes.settings import RunSettings
from slm.reference import reference_identity

log = logging.getLogger(__name__)


def continue_from_base(settings: RunSettings, data: PackedData, acc) -> tuple[RunSettings, dict | None]:
    """(the settings with ``model.pretrained`` set to the cached base's folder, the base's quality: its loss on
    the run's eval sets and on the held-out part of its own text, and its steps). Settings without a base stage
    come back unchanged, with None."""
    if not settings.base.trained:
        return settings, None
    folder, base = train_stage(settings, data, acc, "base")
    losses = reference_eval(settings, data, acc, reference_identity(base, folder), base)  # cached per weights
    quality = measured_quality(trained_quality(folder), losses, next(iter(data.eval_sets), None))
    log.info("base: %s; the training model continues from it (%s)", describe_quality(quality), folder)
    del base
    return replace(settings, model=replace(settings.model, pretrained=folder)), quality
