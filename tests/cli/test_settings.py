"""The one typed boundary: a composed config becomes frozen settings (each group a dataclass that checks
its own fields), unknown keys are named, and the selector names come from one registry."""

import dataclasses
from pathlib import Path

import pytest
import yaml
from support.compose import compose_train

from slm.cli import CONF_DIR
from slm.cli.validation import score_settings, validate
from slm.data import DataConfig, SourceSpec
from slm.model import SCORES, SELECTORS, ModelConfig
from slm.recipes import ConvergeConfig, ReferenceConfig, RunSettings
from slm.selection import COMBINATIONS, SCORERS
from slm.train import SELECTOR_NAMES, DownstreamConfig, SelectorConfig, TrainConfig


def test_validate_returns_frozen_typed_settings(tmp_path):
    s = validate(compose_train(tmp_path, "selector.ratio=0.3", "selector.blocks=0.5"))
    assert isinstance(s, RunSettings)
    assert isinstance(s.data, DataConfig) and isinstance(s.trainer, TrainConfig)
    assert isinstance(s.selector, SelectorConfig) and isinstance(s.reference, ReferenceConfig)
    assert isinstance(s.downstream, DownstreamConfig) and s.logger is None  # logger=none
    assert (s.selector.ratio, s.selector.blocks, s.reference.kind) == (0.3, 0.5, "demo")
    assert isinstance(s.model, ModelConfig) and s.model.config["model_type"] == "llama"
    ref = s.reference  # the reference's own settings are typed too
    assert isinstance(ref.data, SourceSpec) and (ref.data.source, ref.data.split) == ("builtin", "clean")
    assert isinstance(ref.trainer, TrainConfig) and isinstance(ref.converge, ConvergeConfig)
    assert ref.trainer.max_steps == 4 and ref.converge.holdout == 0.0
    for frozen, field in ((s.selector, "ratio"), (s.trainer, "resume"), (s.model, "dtype"), (ref.trainer, "lr"),
                          (ref.converge, "holdout"), (s.data, "block_size")):  # fmt: skip
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(frozen, field, None)


def test_validate_writes_nothing_back_into_the_config(tmp_path):
    """The config is read once: validation and a run's start leave the composed config as it was."""
    from omegaconf import OmegaConf

    cfg = compose_train(tmp_path, "data.block_size=null", "trainer.max_steps=1")
    before = OmegaConf.to_container(cfg, resolve=False)
    settings = validate(cfg)
    from slm.recipes import resolve_block_size

    assert resolve_block_size(settings).data.block_size == 512 and settings.data.block_size is None
    assert OmegaConf.to_container(cfg, resolve=False) == before


def test_each_default_is_written_once_and_matches_the_shipped_configs():
    """A key missing from a config takes the dataclass's default; the shipped files agree with it."""
    for group, cls in (("selector/excess_loss.yaml", SelectorConfig), ("reference/train.yaml", ReferenceConfig)):
        shipped = yaml.safe_load((Path(CONF_DIR) / group).read_text())
        defaults = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
        for key in ("scope", "blocks", "block_score", "init", "seed", "evolve_ema"):
            if key in shipped and key in defaults:
                assert shipped[key] == defaults[key], f"{group}: {key}"


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("+selector.topk=3", "selector.topk is not a setting of selector"),
        ("+reference.trainer.steps=3", "reference.trainer.steps is not a setting of reference.trainer"),
        ("+trainer.epochs=2", "trainer.epochs is not a setting of trainer"),
        ("reference.init=warm", "reference.init must be scratch or pretrained"),
    ],
)
def test_an_unknown_or_bad_key_is_named(tmp_path, override, match):
    with pytest.raises(ValueError, match=match):
        validate(compose_train(tmp_path, override))


def test_slm_score_settings_refuse_a_reference_it_cannot_score_with(tmp_path):
    with pytest.raises(ValueError, match="slm-score needs reference=demo, train or live"):
        score_settings(compose_train(tmp_path, "reference=none", config_name="score"))
    s = score_settings(compose_train(tmp_path, "store_dtype=bfloat16", config_name="score"))
    assert (s.store_dtype, s.reference.kind, s.entropy) == ("bfloat16", "demo", False)


def test_selector_names_come_from_one_registry():
    assert SCORES == tuple(SCORERS)
    assert SELECTORS == (*SCORERS, *COMBINATIONS)
    assert set(SELECTOR_NAMES) == {*SCORERS, *COMBINATIONS, "all", "oracle"}
    shipped = {yaml.safe_load(p.read_text())["name"] for p in (Path(CONF_DIR) / "selector").glob("*.yaml")}
    assert shipped <= set(SELECTOR_NAMES)


def test_what_a_selector_needs_from_its_reference():
    assert SelectorConfig("excess_loss").needs() == {"loss": True, "entropy": False}
    assert SelectorConfig("train_loss").needs() == {"loss": False, "entropy": False}
    union = SelectorConfig("union", scores=["train_loss", "reference_entropy"])
    assert union.needs() == {"loss": False, "entropy": True} and union.scores == ("train_loss", "reference_entropy")
    assert SelectorConfig("train_loss", blocks=0.5, block_score="reference_loss").needs()["loss"]
    assert not SelectorConfig("excess_loss", ratio=1.0).selects
    assert SelectorConfig(ratio={"schedule": "linear", "start": 0.9, "end": 0.3}).selects
