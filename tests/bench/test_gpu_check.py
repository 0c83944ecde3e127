"""scripts/gpu_check.sh runs where the lent GPU machine leaves it: torch, transformers, triton and pytest
(and what they need), without slm installed or any other package. Here, on CPU, it must still collect
and run everything, skipping only what needs CUDA."""

import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ONLY = ("torch", "transformers", "triton", "pytest")


def _requirements(name: str) -> list[str]:
    from packaging.requirements import Requirement

    out = []
    for line in metadata.distribution(name).requires or []:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            out.append(req.name)
    return out


def minimal_site(where: Path, roots=ONLY) -> list[str]:
    """A folder holding only ``roots`` and what they require (links into this environment)."""
    where.mkdir(parents=True)
    seen, stack = set(), list(roots)
    while stack:
        name = stack.pop().lower().replace("_", "-")
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # an optional platform requirement (e.g. a CUDA runtime of a CPU build)
        seen.add(name)
        stack += _requirements(name)
        for f in dist.files or []:
            top = Path(str(f)).parts[0]
            if top != ".." and not (where / top).exists() and Path(dist.locate_file(top)).exists():
                (where / top).symlink_to(Path(dist.locate_file(top)).resolve())
    return sorted(seen)


@pytest.mark.slow
def test_the_gpu_check_runs_with_only_torch_transformers_triton_and_pytest(tmp_path):
    site = tmp_path / "site"
    kept = minimal_site(site)
    assert not {"hydra-core", "omegaconf", "datasets", "wandb", "accelerate"} & set(kept)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')  # no site-packages: only `site`
    (bin_dir / "python3").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    hidden = subprocess.run([str(bin_dir / "python3"), "-c", "import hydra"], env=env, capture_output=True)
    assert hidden.returncode != 0  # the other packages really are out of reach
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path / "out")], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    setup = (tmp_path / "out" / "setup.txt").read_text()
    assert "head backend (auto): torch" in setup and "cut_cross_entropy not installed" in setup
    tests = (tmp_path / "out" / "tests.txt").read_text()
    assert " skipped" in tests and "error" not in tests.lower() and "failed" not in tests
    table = (tmp_path / "out" / "bench_tiny_cpu.md").read_text()
    assert "| slm_excess_0.6 |" in table and "failed" not in table
    decoder = (tmp_path / "out" / "decoder_tiny_cpu.md").read_text()
    assert "| slm_sparse_all_excess_0.3 |" in decoder and "failed" not in decoder
