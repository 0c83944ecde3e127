"""Runs that start together on one empty cache (a sweep's jobs, a SLURM array) all succeed (issue 29).

Real processes, started at once, sharing SLM_CACHE and the Hugging Face datasets cache. Before each
process built local files in its own folder, 1 of 3 runs on a new file succeeded: the others died on
``No such file or directory: <HF datasets cache>/json/.../tmpXXXX``, the builder's temporary folder that
the process that won had renamed away."""

import json
import os
import subprocess
import sys

import pytest

TINY = ("reference=none", "trainer.max_steps=1", "logger=none", "trainer.progress=false", "data.block_size=32",
        "model.config.hidden_size=32", "model.config.intermediate_size=64", "model.config.num_attention_heads=2",
        "model.config.num_key_value_heads=2", "trainer.batch_size=4")  # fmt: skip


def start_together(command: list[str], runs: int, tmp_path, env: dict, prefix: str = "run") -> list[str]:
    """``runs`` processes of ``command`` (each with its own hydra.run.dir) started at once; their outputs, after
    asserting that every one succeeded."""
    procs = [
        subprocess.Popen(
            [*command, f"hydra.run.dir={tmp_path / f'{prefix}{i}'}"],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for i in range(runs)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * runs, [out[-1500:] for out in outputs]
    return outputs


@pytest.mark.slow
def test_four_runs_started_together_on_a_new_local_file_all_succeed(tmp_path):
    words = ["alpha", "beta", "gamma", "delta", "epsilon"]
    docs = [" ".join(words[(i * 7 + j) % 5] for j in range(40)) for i in range(300)]
    (tmp_path / "new.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    env = {**os.environ, "SLM_CACHE": str(tmp_path / "cache"), "HF_DATASETS_CACHE": str(tmp_path / "hf"),
           "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path / "tmp")}  # fmt: skip
    (tmp_path / "tmp").mkdir()
    train = [sys.executable, "-m", "slm.cli", "data=files", f"data.source={tmp_path / 'new.jsonl'}", *TINY]
    outputs = start_together(train, 4, tmp_path, env)
    finished = [json.loads((tmp_path / f"run{i}" / "result.json").read_text()) for i in range(4)]
    assert all(f["status"] == "finished" for f in finished)
    assert len({f["tokens_seen"] for f in finished}) == 1  # one packing of the file, read by all
    assert sum("data: packed" in out for out in outputs) == 1  # packed by one process, loaded by the others
    assert list((tmp_path / "tmp").glob("slm-raw-*")) == []  # each process's own raw build is gone with it


@pytest.mark.slow
def test_four_runs_with_reference_train_started_together_train_the_reference_once(tmp_path):
    """The reference of a sweep (reference=train) is trained by one job; the others wait, say so, and reuse it."""
    words = ["alpha", "beta", "gamma", "delta"]
    for name, n in (("noisy.jsonl", 300), ("clean.jsonl", 200)):
        docs = [" ".join(words[(i * 5 + j) % 4] for j in range(40)) for i in range(n)]
        (tmp_path / name).write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    env = {**os.environ, "SLM_CACHE": str(tmp_path / "cache"), "HF_DATASETS_CACHE": str(tmp_path / "hf"),
           "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}  # fmt: skip
    reference = ("reference=train", f"reference.data.source={tmp_path / 'clean.jsonl'}",
                 "reference.trainer.max_steps=3", "reference.trainer.batch_size=4",
                 "reference.trainer.progress=false")  # fmt: skip
    train = [sys.executable, "-m", "slm.cli", "data=files", f"data.source={tmp_path / 'noisy.jsonl'}", *TINY[1:]]
    outputs = start_together([*train, *reference], 4, tmp_path, env)
    trained = sum("training the reference on" in out for out in outputs)
    assert trained == 1, outputs
    assert sum("reusing the cached reference" in out for out in outputs) == 3
    assert len(list((tmp_path / "cache" / "reference").glob("*/DONE"))) == 1


@pytest.mark.slow
def test_a_sweep_runs_its_jobs_side_by_side_with_the_joblib_launcher(tmp_path):
    """hydra/launcher=joblib (pip install -e ".[parallel]"): the jobs of a sweep run at once in worker processes,
    each with OMP_NUM_THREADS = cores / jobs (joblib sets it), on one cache; every job finishes."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    env = {**os.environ, "SLM_CACHE": str(tmp_path / "cache"), "WANDB_MODE": "offline"}
    env.pop("OMP_NUM_THREADS", None)
    sweep = [sys.executable, "-m", "slm.cli", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
             "selector=train_loss", "selector.ratio=0.5,1.0", f"hydra.sweep.dir={tmp_path / 'sweep'}",
             *TINY]  # fmt: skip
    done = subprocess.run(sweep, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    results = [json.loads(p.read_text()) for p in sorted((tmp_path / "sweep").glob("*/result.json"))]
    assert [r["status"] for r in results] == ["finished", "finished"]


@pytest.mark.slow
def test_a_preparer_killed_mid_build_leaves_nothing_half_written_and_the_next_runs_succeed(tmp_path):
    """A job killed (SIGKILL) while it packs a new file: its lock goes with it, its half-written folder is
    never read and is cleared by the next preparer, and two runs started after it both succeed."""
    import signal
    import time

    docs = [" ".join(f"w{(i * 13 + j) % 97}" for j in range(60)) for i in range(20000)]
    (tmp_path / "big.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    env = {**os.environ, "SLM_CACHE": str(tmp_path / "cache"), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    train = [sys.executable, "-m", "slm.cli", "data=files", f"data.source={tmp_path / 'big.jsonl'}", *TINY]
    first = subprocess.Popen([*train, f"hydra.run.dir={tmp_path / 'killed'}"], env=env, cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    packed = tmp_path / "cache" / "packed"
    deadline = time.time() + 300
    while not list(packed.glob("*.lock")) and time.time() < deadline:  # it holds the entry's lock: packing
        time.sleep(0.05)
    assert first.poll() is None, "the first run finished before it could be killed mid-build"
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert not list(packed.glob("*/meta.json"))  # no entry published
    outputs = start_together(train, 2, tmp_path, env)
    assert sum("data: packed" in out for out in outputs) == 1
    assert not list(packed.glob("*.tmp*"))  # the dead preparer's half-written folder is gone


@pytest.mark.slow
def test_four_slm_score_runs_started_together_score_the_store_once(tmp_path):
    """slm-score of one reference on one data set, from four processes at once: the reference is trained once,
    the store scored once, and every process ends with the same store (issue 29, item 5c)."""
    env = {**os.environ, "SLM_CACHE": str(tmp_path / "cache"), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    score = [sys.executable, "-c", "from slm.cli import main_score; main_score()", "data.block_size=32",
             "model.config.hidden_size=32", "model.config.intermediate_size=64", "model.config.num_attention_heads=2",
             "model.config.num_key_value_heads=2", "data.builtin.n_train_docs=60", "data.builtin.n_clean_docs=60",
             "data.builtin.n_val_docs=8", "reference.trainer.max_steps=2", "reference.trainer.batch_size=4",
             "reference.trainer.progress=false"]  # fmt: skip
    outputs = start_together(score, 4, tmp_path, env, prefix="score")
    assert sum("training the reference on" in out for out in outputs) == 1
    assert sum("scored at" in out for out in outputs) == 1 and sum("reused" in out for out in outputs) == 3
    stores = {line.split(" in ", 1)[1].split(" (")[0] for out in outputs for line in out.splitlines()
              if line.startswith("slm-score: stored ref_loss")}  # fmt: skip
    assert len(stores) == 1
