"""Every shipped config composes; the CLI documents its groups; README and CI agree."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from slm.cli import CONF_DIR

ROOT = Path(__file__).resolve().parents[2]
REQUIRED = {"data=files": ["data.source=x.jsonl"], "data=hub": ["data.source=org/name"],
            "reference=live": ["reference.path=/m"], "reference=stored": ["reference.scores_dir=/s"],
            "reference=train": ["reference.data.source=clean.txt"]}  # fmt: skip


def options():
    for group in ("model", "data", "reference", "selector", "trainer", "logger", "experiment"):
        for f in sorted((Path(CONF_DIR) / group).glob("*.yaml")):
            yield f"{group}={f.stem}"


@pytest.mark.parametrize("override", list(options()))
def test_every_option_composes(override):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[override, *REQUIRED.get(override, [])], return_hydra_config=True)
    for key in ("model", "data", "reference", "selector", "trainer", "logger"):
        assert key in cfg
    assert cfg.data.tokenizer == cfg.model.tokenizer


def test_score_config_composes():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("score", overrides=["reference=live", "reference.path=/m"])
    assert cfg.reference.kind == "live" and cfg.data.source == "builtin"


def test_help_lists_the_groups():
    out = subprocess.run([sys.executable, "-m", "slm.cli", "--help"], capture_output=True, text=True, check=True).stdout
    for group in ("model:", "data:", "reference:", "selector:", "trainer:", "logger:", "experiment:"):
        assert group in out


def test_the_configs_sit_at_the_top_of_the_repository_and_are_found_through_the_package():
    """conf/ is the top-level folder of the checkout (installed as slm.conf; the wheel test checks a wheel)."""
    assert Path(CONF_DIR).resolve() == (ROOT / "conf").resolve()
    assert not (ROOT / "slm" / "conf").exists()


@pytest.mark.parametrize("how", ["searchpath", "config_dir"])
def test_a_users_own_experiment_config_composes_with_the_shipped_ones(tmp_path, how):
    """What docs/training.md tells a user: their experiment files in a folder of their own."""
    (tmp_path / "my_conf" / "experiment").mkdir(parents=True)
    (tmp_path / "my_conf" / "experiment" / "mine.yaml").write_text(
        "# @package _global_\nexperiment_name: mine\nselector:\n  ratio: 0.3\n"
    )
    where = [f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]"] if how == "searchpath" else [
        "--config-dir", str(tmp_path / "my_conf")]  # fmt: skip
    out = subprocess.run([sys.executable, "-m", "slm.cli", *where, "experiment=mine", "--cfg", "job"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    cfg = yaml.safe_load(out)
    assert cfg["experiment_name"] == "mine" and cfg["selector"]["ratio"] == 0.3 and cfg["model"]["name"] == "tiny-llama"


def test_slurm_launcher_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")


@pytest.mark.parametrize("name", ["one_gpu", "ddp", "fsdp", "deepspeed_zero2"])
def test_accelerate_configs_parse(name):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(ROOT / "accelerate_configs" / f"{name}.yaml"))
    assert cfg.distributed_type is not None
    assert yaml.safe_load((ROOT / "accelerate_configs" / f"{name}.yaml").read_text())["mixed_precision"] == "bf16"


def test_readme_commands_are_what_ci_runs():
    readme = (ROOT / "README.md").read_text().splitlines()
    block = readme[readme.index("```bash") + 1 : readme.index("```")]
    commands = [re.sub(r"\s+#.*$", "", line).strip() for line in block]
    installs, (main_job, test) = commands[:-2], commands[-2:]  # an install line per kind of machine
    ci = (ROOT / ".ci" / "run").read_text()
    assert len(installs) == 2 and any(line in ci for line in installs) and test in ci
    assert "--index-url https://download.pytorch.org/whl/cpu" in installs[0]  # a CPU machine gets the CPU build
    assert main_job == "slm-train"


def test_readme_core_api_example_runs():
    """The README's core-API block, with a tiny model in place of the hub download."""
    import torch
    from support.archs import tiny_model

    readme = (ROOT / "README.md").read_text()
    block = readme.split("## The core API", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    block = block.replace('AutoModelForCausalLM.from_pretrained("Qwen/Qwen2.5-0.5B")', "tiny_model('qwen2')")
    ids = torch.randint(1, 101, (2, 10))
    scope = {"tiny_model": tiny_model, "ids": ids, "labels": ids.clone(), "am": torch.ones_like(ids),
             "loss_mask": torch.rand(2, 10) < 0.5, "reference_model": tiny_model("qwen2", seed=1)}  # fmt: skip
    exec(block, scope)
    assert scope["out"].mask.sum() == round(0.6 * 18)


def test_each_commands_help_opens_with_what_it_does_its_options_and_examples():
    """Issue 38 item 3: --help says what the command does, its main options and an example before Hydra's
    groups; slm-score lists only the groups that apply to it (no arm, selector, trainer), each with the options
    shipped in conf/, and names --verify."""
    train = subprocess.run([sys.executable, "-m", "slm.cli", "--help"], capture_output=True, text=True, check=True)
    score = subprocess.run([sys.executable, "-c", "from slm.cli import main_score; main_score()", "--help"],
                           capture_output=True, text=True, check=True)  # fmt: skip
    for out, opening in ((train.stdout, "slm-train: train a causal LM"), (score.stdout, "slm-score: store a")):
        assert out.startswith(opening)
        head = out.split("== Configuration groups ==")[0]
        assert "Main options" in head and "Examples:" in head
    assert "--verify" in score.stdout.split("== Configuration groups ==")[0]
    groups = score.stdout.split("== Configuration groups ==")[1].split("== Config ==")[0]
    listed = dict(line.split(": ", 1) for line in groups.strip().splitlines())
    assert set(listed) == {"model", "data", "reference"}
    for group, options in listed.items():
        shipped = {p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml")} - {"none", "stored"}
        assert set(options.split(", ")) == shipped, group
    assert "arm:" in train.stdout and "selector:" in train.stdout  # every group applies to slm-train
