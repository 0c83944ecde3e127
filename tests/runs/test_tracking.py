"""metrics.jsonl and W&B fallbacks."""

import math

from slm.runs import Tracker, read_metrics


def test_online_without_an_account_falls_back_to_metrics_file(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    t = Tracker(tmp_path / "run", enabled=True, wandb_cfg={"project": "slm"}, config={})
    assert t.wandb is None and "W&B disabled for this run" in caplog.text
    t.log({"step": 1, "tokens_seen": 8, "train/loss": 2.0})
    t.finish()
    assert read_metrics(tmp_path / "run") == [{"step": 1, "tokens_seen": 8, "train/loss": 2.0}]


def test_non_finite_values_are_written_as_null_and_resume_truncates(tmp_path):
    t = Tracker(tmp_path, enabled=True)
    for step in (1, 2, 3):
        t.log({"step": step, "train/loss": math.inf if step == 2 else float(step)})
    assert [e["train/loss"] for e in read_metrics(tmp_path)] == [1.0, None, 3.0]
    Tracker(tmp_path, enabled=True, resume_step=2)  # events after the checkpoint are redone
    assert [e["step"] for e in read_metrics(tmp_path)] == [1, 2]
    Tracker(tmp_path, enabled=True)  # a fresh run starts a fresh file
    assert read_metrics(tmp_path) == []
    Tracker(tmp_path / "other", enabled=False).log({"step": 1})
    assert not (tmp_path / "other").exists()
