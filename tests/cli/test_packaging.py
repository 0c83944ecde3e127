"""A wheel of the project runs by itself: built and installed non-editably into a fresh virtual
environment, the commands compose their configs from the installed package (``conf/`` ships as
``slm.conf``) and train from a folder outside the checkout."""

import json
import os
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY_RUN = [
    "model.config.hidden_size=32", "model.config.intermediate_size=64", "model.config.num_attention_heads=2",
    "model.config.num_key_value_heads=2", "data.block_size=32", "data.builtin.n_train_docs=60",
    "data.builtin.n_clean_docs=60", "data.builtin.n_val_docs=8", "trainer.batch_size=4", "trainer.eval_every=2",
    "trainer.progress=false", "reference.trainer.max_steps=2", "reference.trainer.batch_size=4",
    "reference.trainer.progress=false", "logger=none",
]  # fmt: skip


def _isolation() -> list[str]:
    """Build with this environment's setuptools when it is new enough for pyproject.toml, else in pip's own
    isolated build environment (which fetches one from the package index)."""
    try:
        from importlib.metadata import version

        major = int(version("setuptools").split(".")[0])
    except Exception:
        return []
    return ["--no-build-isolation"] if major >= 77 else []


def _run(args, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run(args, capture_output=True, text=True, **kw)
    assert done.returncode == 0, f"{args}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.mark.slow
def test_a_wheel_installed_non_editably_trains_from_any_folder(tmp_path):
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            *_isolation(),
            "-q",
            "-w",
            str(tmp_path / "dist"),
        ]
    )
    wheel = next((tmp_path / "dist").glob("slm-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "slm/conf/train.yaml" in names and "slm/conf/score.yaml" in names
    assert "slm/conf/reference/demo.yaml" in names and "slm/conf/hydra/launcher/slurm.yaml" in names

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    py = venv / "bin" / "python"
    ours = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    # The dependencies come from this environment; its editable slm does not (a plain path entry in a
    # .pth file adds the folder, but the .pth files inside it, the editable finder's among them, stay unread).
    (ours / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q", str(wheel)])
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = _run([str(py), "-c", "import slm.cli; print(slm.cli.CONF_DIR)"], cwd=work).stdout.strip()
    assert where.startswith(str(ours)), where  # the installed package, not the checkout
    env = {**os.environ, "SLM_CACHE": str(tmp_path / "cache"), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    _run([str(venv / "bin" / "slm-train"), "trainer.max_steps=2", "hydra.run.dir=run", *TINY_RUN], cwd=work, env=env)
    info = json.loads((work / "run" / "run_info.json").read_text())
    assert info["status"] == "finished" and info["reference"] == "demo"
    assert json.loads((work / "run" / "result.json").read_text())["step"] == 2
    assert "reference" in _run([str(venv / "bin" / "slm-score"), "--help"], cwd=work, env=env).stdout
    assert "wrote run/curves.png" in _run([str(venv / "bin" / "slm-curves"), "run"], cwd=work, env=env).stdout
    assert (work / "run" / "curves.png").stat().st_size > 0
    assert "--quick" in _run([str(venv / "bin" / "slm-bench"), "--help"], cwd=work, env=env).stdout
