"""Checkpoints that are damaged, fail to write or cannot be loaded by this launch: the run falls back to
the previous intact checkpoint or stops with one line, and its records say what happened (issue 26,
items 1-3). torch.distributed.checkpoint raises CheckpointException, a BaseException."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from support.compose import compose_train
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

from slm.cli import one_line_errors, train_composed
from slm.runs import checkpoints, read_metrics

FAST = ("reference=none", "selector.ratio=0.5")  # 6 steps, checkpoints at 3 and 6


def _weights(run):
    return load_file(str(run / "model" / "model.safetensors"))


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture
def finished_run(tmp_path):
    """A finished 6-step run, and its final weights."""
    run = tmp_path / "run"
    train_composed(compose_train(tmp_path / "c", *FAST), run)
    return run, _weights(run)


def _flip_bytes_in_place(path, at: float = 0.5):
    data = bytearray(path.read_bytes())
    i = int(len(data) * at)
    data[i : i + 8] = bytes(b ^ 0xFF for b in data[i : i + 8])
    path.write_bytes(bytes(data))  # same size, same name: only its content says it is damaged


def test_a_shard_damaged_in_place_is_found_and_the_run_resumes_from_the_previous_checkpoint(finished_run, caplog):
    run, whole = finished_run
    shard = run / "checkpoints" / "step_0000006" / "dcp" / "__0_0.distcp"
    size = shard.stat().st_size
    _flip_bytes_in_place(shard)
    assert shard.stat().st_size == size
    train_composed(compose_train(run.parent / "c", *FAST, "trainer.resume=true"), run)
    assert "step_0000006 is damaged" in caplog.text and "does not match" in caplog.text
    assert (run / "checkpoints" / "step_0000006.damaged").is_dir()  # set aside when step 6 was written again
    _assert_same_weights(_weights(run), whole)  # retrained from step 3: the same weights as the first time
    assert [e["step"] for e in read_metrics(run) if "train/loss" in e] == [1, 2, 3, 4, 5, 6]
    assert json.loads((run / "result.json").read_text())["status"] == "finished"


def test_a_checkpoint_that_fails_to_load_falls_back_to_the_previous_one(finished_run, monkeypatch, caplog):
    run, whole = finished_run
    real = FileSystemReader.read_data

    def unreadable_step_6(self, plan, planner):
        if "step_0000006" in str(self.path):
            raise OSError(5, "Input/output error")  # DCP re-raises it as a CheckpointException (a BaseException)
        return real(self, plan, planner)

    monkeypatch.setattr(FileSystemReader, "read_data", unreadable_step_6)
    train_composed(compose_train(run.parent / "c", *FAST, "trainer.resume=true"), run)
    assert "step_0000006 is damaged" in caplog.text and "Input/output error" in caplog.text
    _assert_same_weights(_weights(run), whole)
    assert json.loads((run / "run_info.json").read_text())["status"] == "finished"


def test_a_full_disk_during_a_sharded_save_keeps_the_previous_checkpoint_and_records_the_failure(
    tmp_path, monkeypatch, capsys
):
    real = FileSystemWriter.write_data

    def full_at_step_6(self, plan, planner):
        if "step_0000006" in str(self.path):
            raise OSError(28, "No space left on device")
        return real(self, plan, planner)

    monkeypatch.setattr(FileSystemWriter, "write_data", full_at_step_6)
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as stop, one_line_errors():
        train_composed(compose_train(tmp_path / "c", *FAST), run)
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert "could not write checkpoint" in err and "No space left on device" in err and "step_0000003" in err
    assert "Traceback" not in err
    root = run / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000003"]  # no half-written folder
    info = json.loads((run / "run_info.json").read_text())
    assert info["status"] == "failed"
    assert json.loads((run / "result.json").read_text())["status"] == "failed"


def test_a_refused_resume_leaves_the_runs_records_as_they_were(finished_run, capsys):
    run, _ = finished_run
    before = {name: (run / name).read_text() for name in ("run_info.json", "result.json")}
    state = run / "checkpoints" / "step_0000006" / checkpoints.STATE_FILE
    saved = json.loads(state.read_text())
    saved.pop("format")  # as an older version of slm wrote it: this launch cannot load it
    state.write_text(json.dumps(saved))
    shutil.rmtree(run / "checkpoints" / "step_0000003")
    with pytest.raises(SystemExit), one_line_errors():
        train_composed(compose_train(run.parent / "c", *FAST, "trainer.resume=true"), run)
    assert "earlier version of slm" in capsys.readouterr().err
    assert {name: (run / name).read_text() for name in before} == before
