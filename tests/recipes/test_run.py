"""The recipes run from Python without Hydra (issue 36): settings built by hand are a complete run, and the
settings the CLI validates, trained by the recipe in a process that never imports Hydra, give the CLI's run."""

import json
import pickle
import subprocess
import sys

import pytest
from support.compose import compose_train

from slm.cli import train_composed
from slm.cli.validation import validate
from slm.runs import read_metrics

BY_HAND = """
import json, sys
from slm.data import DataConfig
from slm.model import ModelConfig
from slm.recipes import ReferenceConfig, RunSettings, train
from slm.train import DownstreamConfig, SelectorConfig, TrainConfig

settings = RunSettings(
    model=ModelConfig(name="tiny", tokenizer="builtin", config=dict(
        model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=512)),
    data=DataConfig(block_size=32, cache_dir=sys.argv[1], builtin=dict(n_train_docs=60, n_clean_docs=60, n_val_docs=8)),
    reference=ReferenceConfig(kind="none"),
    selector=SelectorConfig(name="train_loss", ratio=0.5),
    trainer=TrainConfig(max_steps=3, batch_size=4, eval_every=3, progress=False),
    downstream=DownstreamConfig(),
    logger=None,
    name="by-hand",
)
result = train(settings, sys.argv[2])
assert not [m for m in sys.modules if m.split(".")[0] in ("hydra", "omegaconf")], "a recipe imported Hydra"
print(json.dumps(result))
"""

PICKLED = """
import json, pickle, sys
from slm.recipes import train
settings = pickle.load(open(sys.argv[1], "rb"))
result = train(settings, sys.argv[2])
assert not [m for m in sys.modules if m.split(".")[0] in ("hydra", "omegaconf")], "a recipe imported Hydra"
print(json.dumps(result))
"""


def _python(code: str, *args) -> dict:
    done = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_settings_built_in_python_train_a_run_without_hydra(tmp_path):
    result = _python(BY_HAND, tmp_path / "cache", tmp_path / "run")
    assert result["step"] == 3 and result["tokens_selected"] < result["tokens_seen"]
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert (info["status"], info["selector"], info["ratio"]) == ("finished", "train_loss", 0.5)
    assert (tmp_path / "run" / "config.yaml").exists() and (tmp_path / "run" / "model" / "config.json").exists()


@pytest.mark.parametrize("overrides", [("reference=none", "selector=train_loss", "selector.ratio=0.5"), ()],
                         ids=["no_reference", "demo_reference"])  # fmt: skip
def test_the_recipe_without_hydra_equals_the_cli_run(tmp_path, overrides):
    cfg = compose_train(tmp_path / "c", *overrides, "trainer.max_steps=4", "trainer.eval_every=2")
    (tmp_path / "settings.pkl").write_bytes(pickle.dumps(validate(cfg)))
    ours = _python(PICKLED, tmp_path / "settings.pkl", tmp_path / "recipe")
    theirs = train_composed(cfg, tmp_path / "cli")
    assert ours == pytest.approx(theirs, rel=1e-6)
    for key in ("train/loss", "eval/loss", "tokens_selected", "flops"):
        a, b = ([e[key] for e in read_metrics(tmp_path / d) if key in e] for d in ("recipe", "cli"))
        assert a == pytest.approx(b, rel=1e-6) and a, key
