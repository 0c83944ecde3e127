"""Compose slm-train / slm-score configs for fast tests (tiny model, tiny corpus)."""

from pathlib import Path

from hydra import compose, initialize_config_dir

from slm.cli import CONF_DIR

TINY = [
    "model.config.hidden_size=32", "model.config.intermediate_size=64", "model.config.num_attention_heads=2",
    "model.config.num_key_value_heads=2", "data.block_size=32", "data.builtin.n_train_docs=120",
    "data.builtin.n_clean_docs=120", "data.builtin.n_val_docs=12", "trainer.batch_size=4",
    "trainer.max_steps=6", "trainer.eval_every=3", "trainer.log_every=1", "trainer.checkpoint_every=3",
    "trainer.warmup_steps=2", "trainer.eval_batch_size=8", "trainer.progress=false",
    "reference.trainer.max_steps=4", "reference.trainer.batch_size=4", "reference.trainer.progress=false",
    "reference.trainer.eval_every=4", "logger=none",
    # a 4-step reference is soon outgrown: tests of other features keep the selection they set
    # (tests/cli/test_outgrown.py tests the default, when_outgrown=all)
    "selector.when_outgrown=keep",
]  # fmt: skip


def compose_train(cache: Path, *overrides: str, config_name: str = "train"):
    base = [o for o in TINY if config_name == "train" or o.startswith(("model.", "data.", "reference."))]
    if any(o.startswith("reference=") and o not in ("reference=demo", "reference=train") for o in overrides):
        base = [o for o in base if not o.startswith("reference.trainer")]
    if any(o.startswith("model=") and o != "model=tiny" for o in overrides):
        base = [o for o in base if not o.startswith("model.config")]
    if any(o.startswith("data=") and o != "data=builtin" for o in overrides):
        base = [o for o in base if not o.startswith("data.builtin")]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name, overrides=[*base, f"data.cache_dir={cache}", *overrides])
