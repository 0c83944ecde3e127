"""Bad inputs met through the commands: the documented files command, unreachable hub names."""

import time

import pytest
from support.compose import compose_train

from slm.cli import train_composed


def test_the_documented_files_command_runs_on_a_small_text_file(tmp_path):
    """README: slm-train data=files data.source=my.txt reference=none (block size fits the default model)."""
    paragraphs = [f"Paragraph {i}: the quick brown fox jumps over the lazy dog {i} times." for i in range(60)]
    (tmp_path / "my.txt").write_text("\n\n".join(paragraphs))
    cfg = compose_train(
        tmp_path / "c", "data=files", f"data.source={tmp_path / 'my.txt'}", "reference=none", "data.block_size=null"
    )  # the files option's default (the tests' base config sets 32)
    result = train_composed(cfg, tmp_path / "run")
    assert result["step"] == 6 and result["eval/tokens"] > 0
    from omegaconf import OmegaConf

    assert OmegaConf.load(tmp_path / "run" / "config.yaml").data.block_size == 512  # the tiny model's context


def test_an_unreachable_hub_name_fails_fast_with_one_message(tmp_path, monkeypatch):
    import socket

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def no_network(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", no_network)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"model.pretrained='TinyLlama/TinyLlama_v1.1' is not a local folder .*cannot "
                       r"be reached.*huggingface-cli download"):  # fmt: skip
        train_composed(compose_train(tmp_path / "c", "model=tinyllama", "reference=none"), tmp_path / "run")
    assert time.perf_counter() - t0 < 20  # no minute of retries
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE=1 is set"):
        train_composed(compose_train(tmp_path / "c", "model=tinyllama", "reference=none"), tmp_path / "run")
