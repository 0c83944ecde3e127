"""The scripts that tests launch under torchrun (tests/support/launch/) run their job only when launched:
imported by mistake (a collector, an editor's import, ``python -c``), they define their functions and stop,
leaving nothing behind (issue 37 item 19: one wrote a stray ``-q/`` folder into the checkout)."""

import subprocess
import sys
from pathlib import Path

import pytest

LAUNCH = Path(__file__).resolve().parent / "support" / "launch"


@pytest.mark.parametrize("script", sorted(p.name for p in LAUNCH.glob("*.py")))
def test_a_launch_script_imported_runs_nothing(tmp_path, script):
    load = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('probe', sys.argv[1]); "
            "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module); "
            "assert callable(module.main)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", load, str(LAUNCH / script), "-q"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []
