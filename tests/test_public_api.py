"""The public faces resolve: every name in ``slm.__all__`` and in each package's ``__all__``, the
console scripts' targets, and ``python -m`` of the packages that have a ``__main__``."""

import importlib
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

import slm

PACKAGES = sorted(p.parent.name for p in Path(slm.__file__).parent.glob("*/__init__.py"))
SCRIPTS = {"slm-train", "slm-score", "slm-curves", "slm-bench", "slm-inspect"}


def test_every_name_of_the_top_level_face_resolves():
    assert "select_tokens" in slm.__all__ and "SelectiveLM" in slm.__all__
    for name in slm.__all__:
        assert getattr(slm, name) is not None, name


def test_importing_slm_stays_torch_only():
    code = "import sys, slm; print(sorted(m for m in ('transformers', 'hydra', 'datasets') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("package", PACKAGES)
def test_every_package_face_exports_what_it_names(package):
    face = importlib.import_module(f"slm.{package}")
    assert face.__doc__ and face.__doc__.strip(), f"slm.{package} needs a docstring that maps its files"
    names = getattr(face, "__all__", None)
    assert names, f"slm.{package} needs __all__"
    assert len(names) == len(set(names))
    for name in names:
        assert hasattr(face, name), f"slm.{package}.{name}"
    # the face's map names every file of the package
    files = {p.stem for p in Path(face.__file__).parent.glob("*.py")} - {"__init__", "__main__"}
    assert {f for f in files if not re.search(rf"\b{f}(\.py\b|`)", face.__doc__)} == set()


def test_the_console_scripts_resolve():
    scripts = {e.name: e for e in metadata.distribution("slm").entry_points if e.group == "console_scripts"}
    assert set(scripts) == SCRIPTS
    for entry in scripts.values():
        assert callable(entry.load()), entry.value


@pytest.mark.parametrize(("module", "expect"), [("slm.cli", "slm-train"), ("slm.bench", "slm-bench")])
def test_python_dash_m_runs_the_command(module, expect):
    done = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert expect in done.stdout


@pytest.mark.parametrize(
    "old, names",
    [("slm.hf_trainer", ["SelectiveTrainer", "SelectiveDataCollator"]),
     ("slm.trl_trainer", ["SelectiveSFTTrainer", "SelectiveGRPOTrainer"])],
)  # fmt: skip
def test_the_old_trainer_paths_import_the_same_classes_with_a_deprecation_warning(old, names):
    """The integrations moved to slm.trainers; their documented paths keep working for one release."""
    same = f"import {old} as old, slm.trainers as new; assert all(getattr(old, n) is getattr(new, n) for n in {names})"
    assert subprocess.run([sys.executable, "-c", same], capture_output=True, text=True).returncode == 0
    strict = f"import warnings; warnings.simplefilter('error', DeprecationWarning); import {old}"
    done = subprocess.run([sys.executable, "-c", strict], capture_output=True, text=True)
    assert done.returncode != 0 and f"{old} moved to slm.trainers" in done.stderr
