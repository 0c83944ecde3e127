"""Run directories: nothing lost, nothing silently changed, interruptions that say what happened."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.compose import TINY, compose_train

from slm.cli import one_line_errors, train_composed
from slm.runs import ResumeMismatch, RunDirExists, checkpoints, read_metrics
from slm.train import RunInterrupted, Trainer

FAST = ("reference=none", "selector.ratio=0.5")


def interrupt_at(monkeypatch, step: int, signum=signal.SIGINT):
    real = Trainer.train_step

    def step_then_signal(self):
        if self.step == step - 1:
            os.kill(os.getpid(), signum)  # arrives mid-step: the step finishes, then the run stops
        return real(self)

    monkeypatch.setattr(Trainer, "train_step", step_then_signal)
    return real


def test_relaunching_into_a_run_without_resume_is_refused(tmp_path):
    train_composed(compose_train(tmp_path / "c", *FAST), tmp_path / "run")
    before = read_metrics(tmp_path / "run")
    with pytest.raises(RunDirExists, match=r"trainer.resume=true.*hydra.run.dir=.*trainer.overwrite=true"):
        train_composed(compose_train(tmp_path / "c", *FAST), tmp_path / "run")
    assert read_metrics(tmp_path / "run") == before and (tmp_path / "run" / "model").is_dir()
    train_composed(
        compose_train(tmp_path / "c", *FAST, "trainer.overwrite=true", "trainer.max_steps=3"), tmp_path / "run"
    )
    assert read_metrics(tmp_path / "run")[-1]["step"] == 3


def test_a_failed_checkpoint_write_keeps_the_previous_one_and_resume_falls_back(tmp_path, monkeypatch):
    import torch

    real_save = torch.save

    def disk_full_at_step_6(obj, f, *a, **k):
        if "step_0000006" in str(f):
            raise RuntimeError("basic_ios::clear: iostream error")  # what a full disk looks like to torch
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", disk_full_at_step_6)
    with pytest.raises(checkpoints.CheckpointError, match=r"could not write checkpoint .*step_0000006.*step_0000003"):
        train_composed(compose_train(tmp_path / "c", *FAST), tmp_path / "run")
    root = tmp_path / "run" / "checkpoints"
    assert (root / "latest").read_text() == "step_0000003"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000003"]  # no half-written folder
    monkeypatch.setattr(torch, "save", real_save)

    # A damaged newest checkpoint: resume warns and takes the newest complete one.
    train_composed(compose_train(tmp_path / "c", *FAST, "trainer.resume=true", "trainer.max_steps=9"), tmp_path / "run")
    newest = checkpoints.latest(tmp_path / "run")
    assert newest.name == "step_0000009"
    with open(newest / "dcp" / "__0_0.distcp", "r+b") as f:
        f.truncate(100)
    assert checkpoints.latest(tmp_path / "run").name == "step_0000006"


def test_a_torn_last_metrics_line_is_tolerated_by_resume_and_curves(tmp_path, monkeypatch, caplog):
    from slm.analysis import main as curves

    interrupt_at(monkeypatch, 4)
    with pytest.raises(RunInterrupted):
        train_composed(compose_train(tmp_path / "c", *FAST, "trainer.checkpoint_every=2"), tmp_path / "run")
    with (tmp_path / "run" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "tokens_se')  # a crash mid-write
    assert read_metrics(tmp_path / "run")[-1]["step"] == 4 and "last line is incomplete" in caplog.text
    curves([str(tmp_path / "run"), "--out", str(tmp_path / "plots")])
    monkeypatch.undo()
    train_composed(compose_train(tmp_path / "c", *FAST, "trainer.resume=true"), tmp_path / "run")
    assert [e["step"] for e in read_metrics(tmp_path / "run") if "train/loss" in e] == [1, 2, 3, 4, 5, 6]


def test_a_partial_demo_reference_cache_is_resumed_or_rebuilt(tmp_path, caplog):
    import shutil

    train_composed(compose_train(tmp_path / "c", "trainer.max_steps=2"), tmp_path / "a")
    (cached,) = (tmp_path / "c" / "reference").glob("*/DONE")
    cached.unlink()  # as if the run that trained it had been killed before the end
    (cached.parent / "model" / "model.safetensors").unlink()
    train_composed(compose_train(tmp_path / "c", "trainer.max_steps=2"), tmp_path / "b")
    assert "resuming the interrupted reference" in caplog.text and cached.exists()  # from its checkpoint
    cached.unlink()
    shutil.rmtree(cached.parent / "run" / "checkpoints")  # killed before its first checkpoint
    train_composed(compose_train(tmp_path / "c", "trainer.max_steps=2"), tmp_path / "d")
    assert "partial reference" in caplog.text and cached.exists()


def test_sigterm_checkpoints_and_stops_with_a_requeue_status(tmp_path, monkeypatch, capsys):
    interrupt_at(monkeypatch, 2, signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped, one_line_errors():
        train_composed(compose_train(tmp_path / "c", *FAST), tmp_path / "run")
    assert stopped.value.code == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "slm: interrupted at step 2" in err.strip().splitlines()[-1] and "trainer.resume=true" in err
    assert json.loads((tmp_path / "run" / "result.json").read_text())["signal"] == signal.SIGTERM
    assert checkpoints.latest(tmp_path / "run").name == "step_0000002"


def test_ctrl_c_outside_training_is_one_line(capsys):
    with pytest.raises(SystemExit) as stopped, one_line_errors():
        raise KeyboardInterrupt  # e.g. while the reference trains or slm-score scores
    assert stopped.value.code == 130 and len(capsys.readouterr().err.strip().splitlines()) == 1


def test_resume_reuses_the_runs_own_config_and_refuses_changes_to_what_is_trained(tmp_path, monkeypatch):
    interrupt_at(monkeypatch, 3)
    with pytest.raises(RunInterrupted):
        train_composed(compose_train(tmp_path / "c", "reference=none", "selector.ratio=0.3"), tmp_path / "run",
              overrides=["reference=none", "selector.ratio=0.3"])  # fmt: skip
    monkeypatch.undo()
    with pytest.raises(ResumeMismatch, match=r"selector.ratio: the run has 0.3, this launch asks for 0.6"):
        train_composed(compose_train(tmp_path / "c", "reference=none", "selector.ratio=0.6", "trainer.resume=true"),
              tmp_path / "run", overrides=["selector.ratio=0.6", "trainer.resume=true"])  # fmt: skip
    # Without repeating the override, the saved config (ratio 0.3) is what continues; a longer run is allowed.
    train_composed(compose_train(tmp_path / "c", "trainer.resume=true", "trainer.max_steps=8"), tmp_path / "run",
          overrides=["trainer.resume=true", "trainer.max_steps=8"])  # fmt: skip
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["ratio"] == 0.3 and info["reference"] == "none" and info["status"] == "finished"
    assert info["resumes"][-1] == {"trainer.max_steps": [6, 8], "trainer.resume": [False, True]}
    fracs = [e["train/selected_frac"] for e in read_metrics(tmp_path / "run") if "train/loss" in e]
    assert len(fracs) == 8 and all(f < 0.35 for f in fracs)


def test_bad_settings_are_refused_before_anything_slow_with_the_full_key(tmp_path):
    with pytest.raises(ValueError, match=r"selector.ratio must be in \(0, 1\]"):
        train_composed(compose_train(tmp_path / "c", "selector.ratio=1.5"), tmp_path / "run")
    assert not (tmp_path / "c").exists()  # no data was packed
    with pytest.raises(ValueError, match="reference=stored needs reference.scores_dir=.*run slm-score first"):
        train_composed(compose_train(tmp_path / "c", "reference=stored"), tmp_path / "run")
    with pytest.raises(ValueError, match="reference=live needs reference.path="):
        train_composed(compose_train(tmp_path / "c", "reference=live"), tmp_path / "run")
    with pytest.raises(ValueError, match="reference=none .* reference=live .* reference=stored"):
        train_composed(compose_train(tmp_path / "c", "data=files", f"data.source={tmp_path}/x.txt"), tmp_path / "run")
    # missing files, named by the setting that points at them, before any data is packed
    with pytest.raises(FileNotFoundError, match=r"data.eval.clean='.*nope.jsonl': no data files found"):
        train_composed(compose_train(tmp_path / "c", f"+data.eval.clean={tmp_path}/nope.jsonl"), tmp_path / "run")
    with pytest.raises(FileNotFoundError, match=r"reference.scores_dir='.*gone'.*run slm-score first"):
        train_composed(compose_train(tmp_path / "c", "reference=stored", f"reference.scores_dir={tmp_path}/gone"),
              tmp_path / "run")  # fmt: skip
    assert not (tmp_path / "c").exists()


def test_output_folders_and_curves_inputs_that_do_not_exist_are_one_line_errors(tmp_path, capsys):
    from slm.analysis import main as curves
    from slm.cli.common import check_output_dirs

    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit) as stopped, one_line_errors():
        check_output_dirs([f"hydra.run.dir={tmp_path / 'afile'}"])
    assert stopped.value.code == 1 and "is a file; name a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="slm-curves: .*missing does not exist"):
        curves([str(tmp_path / "missing")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="slm-curves: no runs under .*empty"):
        curves([str(tmp_path / "empty")])


def test_runs_are_named_and_recorded_by_what_they_select(tmp_path):
    cfg = compose_train(tmp_path / "c", "reference=none", "trainer.max_steps=1")
    assert cfg.name == "train_loss-0.6-none-s0"
    train_composed(cfg, tmp_path / "run")
    assert json.loads((tmp_path / "run" / "run_info.json").read_text())["selector"] == "train_loss"
    assert compose_train(tmp_path / "c", "selector.ratio=1.0").name.startswith("all-1.0-demo")
    # the scope is part of the name where it decides what is kept (issue 26, item 12)
    assert compose_train(tmp_path / "c", "selector.ratio=0.5", "selector.scope=dataset").name == (
        "excess_loss-0.5-dataset-demo-s0"
    )
    assert compose_train(tmp_path / "c", "selector.ratio=0.5").name == "excess_loss-0.5-demo-s0"
    assert compose_train(tmp_path / "c", "selector.ratio=1.0", "selector.scope=dataset").name == "all-1.0-demo-s0"
    sparse = compose_train(tmp_path / "c", "selector.ratio=0.5", "trainer.sparse_backward=true")
    assert sparse.name == "excess_loss-0.5-sparse-demo-s0"
    assert compose_train(tmp_path / "c", "trainer.sparse_backward=1").name == "excess_loss-0.6-sparse1-demo-s0"


def test_saved_model_carries_the_tokenizers_special_ids_and_generation_stops_at_eos(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList

    train_composed(compose_train(tmp_path / "c", *FAST, "trainer.max_steps=1"), tmp_path / "run")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    tok = AutoTokenizer.from_pretrained(tmp_path / "run" / "model")
    for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
        assert getattr(model.config, name) == getattr(tok, name), name
        assert getattr(model.generation_config, name) == getattr(tok, name), name

    class AlwaysEos(LogitsProcessor):
        def __call__(self, input_ids, scores):
            scores[:] = float("-inf")
            scores[:, tok.eos_token_id] = 0.0
            return scores

    prompt = torch.tensor([tok("7*8=", add_special_tokens=False)["input_ids"]])
    eos_only = LogitsProcessorList([AlwaysEos()])
    out = model.generate(prompt, max_new_tokens=10, do_sample=False, logits_processor=eos_only)
    assert out.shape[1] == prompt.shape[1] + 1  # stopped at the first <eos>


@pytest.mark.slow
def test_ctrl_c_in_a_sweep_stops_the_sweep_with_a_non_zero_status(tmp_path):
    exe = str(Path(sys.executable).with_name("slm-train"))
    args = [o for o in TINY if not o.startswith(("trainer.max_steps", "reference."))]
    args += ["trainer.max_steps=100000", *FAST, f"data.cache_dir={tmp_path / 'c'}"]
    args += [f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = (tmp_path / "stderr.txt").open("w")  # a pipe would fill with progress bars and block the sweep
    proc = subprocess.Popen([exe, "-m", *args, "seed=0,1"], env=env, cwd=tmp_path, stderr=log, text=True)
    first = None
    for _ in range(600):
        time.sleep(0.5)
        assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()[-3000:]
        runs = sorted((tmp_path / "sweep").glob("0_*/metrics.jsonl"))
        if runs and len(read_metrics(runs[0])) >= 3:
            first = runs[0].parent
            break
    assert first is not None, "the first job did not start"
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=300)
    assert proc.returncode == 130, (tmp_path / "stderr.txt").read_text()[-3000:]
    assert json.loads((first / "result.json").read_text())["status"] == "interrupted"
    assert not (first / "model").exists()
    assert not list((tmp_path / "sweep").glob("1_*"))  # the next job was not launched


def test_resume_at_another_process_count_keeps_the_rows_per_step():
    from slm.runs import resume_config

    saved = {"trainer": {"batch_size": 2, "grad_accum": 1, "lr": 1e-3}, "seed": 0}
    # 2 processes x 2 rows -> 1 process x 4 rows (or 2 accumulated micro-batches of 2): the same rows per step
    for new in ({"batch_size": 4, "grad_accum": 1}, {"batch_size": 2, "grad_accum": 2}):
        cfg, changed = resume_config(saved, {**saved, "trainer": {**saved["trainer"], **new}},
                                     [f"trainer.{k}={v}" for k, v in new.items()], processes=(2, 1))  # fmt: skip
        assert cfg["trainer"]["batch_size"] * cfg["trainer"]["grad_accum"] == 4
    with pytest.raises(ResumeMismatch, match=r"trained 4 rows per step \(2 process\(es\) x trainer.batch_size=2.*"
                                             r"would train 2 .*trainer.batch_size=4"):  # fmt: skip
        resume_config(saved, saved, [], processes=(2, 1))
    with pytest.raises(ResumeMismatch, match="rows per step"):  # same process count, another split of the step
        resume_config(saved, {**saved, "trainer": {**saved["trainer"], "batch_size": 3}}, ["trainer.batch_size=3"])


# --- issue 19: nothing lost, round two ------------------------------------------------------------


def test_resume_with_nothing_to_resume_from_is_refused_and_keeps_the_run(tmp_path):
    import shutil

    train_composed(compose_train(tmp_path / "c", *FAST), tmp_path / "run")
    before = (read_metrics(tmp_path / "run"), (tmp_path / "run" / "result.json").read_text())
    shutil.rmtree(tmp_path / "run" / "checkpoints")
    with pytest.raises(RunDirExists, match=r"no complete checkpoint .*nothing to resume from.*trainer.overwrite=true"):
        train_composed(compose_train(tmp_path / "c", *FAST, "trainer.resume=true"), tmp_path / "run")
    assert (read_metrics(tmp_path / "run"), (tmp_path / "run" / "result.json").read_text()) == before
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()


def test_resume_past_a_damaged_latest_checkpoint_rewrites_that_step(tmp_path, caplog):
    train_composed(compose_train(tmp_path / "c", *FAST), tmp_path / "run")  # checkpoints at steps 3 and 6
    root = tmp_path / "run" / "checkpoints"
    with open(root / "step_0000006" / "dcp" / "__0_0.distcp", "r+b") as f:
        f.truncate(100)
    train_composed(
        compose_train(tmp_path / "c", *FAST, "trainer.resume=true"), tmp_path / "run"
    )  # falls back to step 3
    assert "moved it to" in caplog.text and checkpoints.latest(tmp_path / "run").name == "step_0000006"
    assert (root / "step_0000006.damaged").is_dir()
    assert json.loads((tmp_path / "run" / "result.json").read_text())["status"] == "finished"
    assert [e["step"] for e in read_metrics(tmp_path / "run") if "train/loss" in e] == [1, 2, 3, 4, 5, 6]


class FakeSafetensorError(Exception):
    """Like safetensors' SafetensorError: what a full disk looks like there (not an OSError)."""


def test_any_checkpoint_write_error_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import slm.parallel.state as state

    real = state.save_model_and_optimizer

    def full_at_6(lm, opt, path):
        if "step_0000006" in str(path):
            raise FakeSafetensorError("No space left on device (os error 28)")
        return real(lm, opt, path)

    monkeypatch.setattr(state, "save_model_and_optimizer", full_at_6)
    with pytest.raises(checkpoints.CheckpointError, match=r"No space left.*last complete checkpoint is .*step_0000003"):
        train_composed(compose_train(tmp_path / "c", *FAST), tmp_path / "run")
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["latest", "step_0000003"]


@pytest.mark.parametrize("what", ["full disk", "ctrl-c"])
def test_a_failed_or_interrupted_final_save_is_recorded_and_resumes(tmp_path, monkeypatch, capsys, what):
    import slm.parallel.engine as parallel

    real = parallel.save_inner_pretrained

    def breaks(lm, sd, out_dir, tokenizer=None):
        (out_dir / "config.json").parent.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text("{}")  # written before the weights, as save_pretrained does
        raise KeyboardInterrupt if what == "ctrl-c" else FakeSafetensorError("No space left on device")

    monkeypatch.setattr(parallel, "save_inner_pretrained", breaks)
    with pytest.raises(SystemExit) as stopped, one_line_errors():
        train_composed(compose_train(tmp_path / "c", *FAST), tmp_path / "run")
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"trainer.resume=true hydra.run.dir={tmp_path / 'run'}" in err
    assert stopped.value.code == (130 if what == "ctrl-c" else 1)
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["status"] == ("interrupted" if what == "ctrl-c" else "failed") and result["step"] == 6
    assert json.loads((tmp_path / "run" / "run_info.json").read_text())["status"] == result["status"]
    assert not (tmp_path / "run" / "model").exists() and not (tmp_path / "run" / "model.tmp").exists()
    monkeypatch.setattr(parallel, "save_inner_pretrained", real)
    train_composed(compose_train(tmp_path / "c", *FAST, "trainer.resume=true"), tmp_path / "run")  # the command it gave
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()
    assert json.loads((tmp_path / "run" / "result.json").read_text())["status"] == "finished"


def test_interrupting_the_reference_says_to_rerun_and_the_rerun_resumes_it(tmp_path, monkeypatch, capsys, caplog):
    import torch

    real = Trainer.train_step

    def sigterm_in_reference_step_2(self):
        if self.name == "reference" and self.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self)

    monkeypatch.setattr(Trainer, "train_step", sigterm_in_reference_step_2)
    with pytest.raises(SystemExit) as stopped, one_line_errors():
        train_composed(compose_train(tmp_path / "c", "trainer.max_steps=2"), tmp_path / "run")
    assert stopped.value.code == 128 + signal.SIGTERM
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "while training the reference model (step 2 of 4" in err and "run the same command again" in err
    assert "hydra.run.dir" not in err and "trainer.resume" not in err
    monkeypatch.setattr(Trainer, "train_step", real)
    train_composed(compose_train(tmp_path / "c", "trainer.max_steps=2"), tmp_path / "run")  # the same command
    assert "resuming the interrupted reference" in caplog.text
    train_composed(compose_train(tmp_path / "c2", "trainer.max_steps=2"), tmp_path / "whole")  # never interrupted
    (resumed,), (whole,) = ((tmp_path / c / "reference").glob("*/DONE") for c in ("c", "c2"))
    a, b = read_metrics(resumed.parent / "run"), read_metrics(whole.parent / "run")
    assert [e["step"] for e in a] == [e["step"] for e in b]  # nothing logged twice
    from safetensors.torch import load_file

    wa, wb = (load_file(str(p.parent / "model" / "model.safetensors")) for p in (resumed, whole))
    for k in wb:
        torch.testing.assert_close(wa[k], wb[k], atol=2e-5, rtol=1e-5)  # the resumed reference is the same model


def test_a_resume_that_adds_an_eval_set_keeps_eval_loss_on_the_runs_first_set(tmp_path):
    """Issue 37 item 11: a resume may add ``+data.eval.<name>``; ``eval/loss`` (what slm-curves, the outgrown
    watch and early stopping read) stays the set it followed from the start, not one curve of two sets."""
    train_composed(compose_train(tmp_path / "c", *FAST, "trainer.max_steps=4", "trainer.eval_every=2"),
                   tmp_path / "run", overrides=[*FAST, "trainer.max_steps=4", "trainer.eval_every=2"])  # fmt: skip
    more = ["trainer.resume=true", "trainer.max_steps=8", "+data.eval.clean={source: builtin, split: clean}"]
    train_composed(compose_train(tmp_path / "c", *FAST, "trainer.eval_every=2", *more), tmp_path / "run",
                   overrides=more)  # fmt: skip
    evals = [e for e in read_metrics(tmp_path / "run") if "eval/loss" in e]
    assert [e["step"] for e in evals] == [0, 2, 4, 6, 8]
    assert all(e["eval/loss"] == e["eval/validation/loss"] for e in evals)
    assert "eval/clean/loss" in evals[-1] and evals[-1]["eval/clean/loss"] != evals[-1]["eval/loss"]


def test_a_lost_cache_lock_is_one_line(capsys):
    """A job taken over while away (LockLost, before publishing a cache entry) stops with one line, not a traceback."""
    from slm.data import LockLost

    with pytest.raises(SystemExit) as stopped, one_line_errors():
        raise LockLost("the lock of the reference /c/reference/x was taken over by another job")
    err = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 1 and len(err) == 1 and "taken over by another job" in err[0]
