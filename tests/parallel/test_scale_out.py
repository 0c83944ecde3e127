"""Every shipped launch config gives the same updates as one process (2 CPU processes, gloo).

FSDP2 and DeepSpeed run through the real ``accelerate launch --config_file accelerate_configs/...``
(with ``--mixed_precision no`` so that float32 runs can be compared exactly). Also: mixed
precision details that need no second process (fp32 master weights, fp16 with a loss scaler).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.compose import TINY, compose_train

from slm.cli import train_composed
from slm.runs import read_metrics

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ARGS = [o for o in TINY if not o.startswith("reference.")] + ["reference=none", "trainer.max_steps=3"]
QWEN_TIED = ["model.config.model_type=qwen2", "model.config.tie_word_embeddings=true"]


def run(cmd: list[str], tmp_path: Path) -> str:
    """Run ``cmd``; its stderr (where warnings go)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SLM_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-6000:]
    return done.stderr


def one_process(tmp_path: Path, name: str, *overrides: str) -> Path:
    out = tmp_path / name
    run([str(BIN / "slm-train"), *ARGS, f"data.cache_dir={tmp_path / 'cache'}", *overrides, f"hydra.run.dir={out}"],
        tmp_path)  # fmt: skip
    return out


def launched(tmp_path: Path, config: str, name: str, *overrides: str, precision: str = "no") -> Path:
    """``accelerate launch`` with a shipped config, 2 processes, float32 (or ``precision``)."""
    out = tmp_path / name
    config_file = str(ROOT / "accelerate_configs" / f"{config}.yaml")
    stderr = run([str(BIN / "accelerate"), "launch", "--config_file", config_file, "--num_processes", "2",
                  "--mixed_precision", precision, "-m", "slm.cli", *ARGS, f"data.cache_dir={tmp_path / 'cache'}",
                  *overrides, f"hydra.run.dir={out}"], tmp_path)  # fmt: skip
    (tmp_path / f"{name}.stderr").write_text(stderr)
    return out


def assert_same_run(a: Path, b: Path, atol: float, rel: float = 1e-5, processes: int | None = 2) -> None:
    from safetensors.torch import load_file

    ea, eb = read_metrics(a), read_metrics(b)
    assert [e["step"] for e in ea] == [e["step"] for e in eb] and len(ea) >= 5
    for x, y in zip(ea, eb):
        audit = [k for k in x if k.startswith("audit/")]  # what selection kept, counted over every process
        for k in ("train/loss", "train/grad_norm", "train/lr", "eval/loss", "tokens_seen", "tokens_selected", *audit):
            if k in x:
                assert y[k] == pytest.approx(x[k], rel=rel), (x["step"], k)
    wa, wb = load_file(str(a / "model" / "model.safetensors")), load_file(str(b / "model" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=atol, rtol=1e-4, msg=lambda m, k=k: f"{k}: {m}")
    if processes is not None:
        assert json.loads((b / "run_info.json").read_text())["processes"] == processes


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2-tied"])
def test_fsdp2_two_processes_equal_one_process(tmp_path, arch):
    extra = QWEN_TIED if arch == "qwen2-tied" else []
    one = one_process(tmp_path, "one", "trainer.batch_size=4", "selector.scope=global", *extra)
    two = launched(tmp_path, "fsdp", "two", "trainer.batch_size=2", "selector.scope=global", *extra)
    assert json.loads((two / "run_info.json").read_text())["mode"] == "fsdp2"
    assert "fsdp2: 2 decoder layer units" in (two / "train.log").read_text()
    assert "falling back" not in (tmp_path / "two.stderr").read_text()
    assert_same_run(one, two, atol=1e-5)
    if arch == "qwen2-tied":
        from transformers import AutoModelForCausalLM

        ckpt = dcp_state(two / "checkpoints" / "step_0000003")
        assert torch.equal(ckpt["model"]["model.lm_head.weight"], ckpt["model"]["model.model.embed_tokens.weight"])
        assert "model.lm_head.weight" not in ckpt["optim"]["state"]  # one parameter, one optimizer state
        again = AutoModelForCausalLM.from_pretrained(two / "model")
        assert again.lm_head.weight is again.get_input_embeddings().weight


@pytest.mark.slow
def test_a_threshold_over_the_run_on_two_processes_equals_one_process(tmp_path):
    """scope=dataset: every process's scores set one threshold, and the count each step trains (known only
    after the forward) normalises the step on the device: 2 processes x batch 2 = 1 process x batch 4."""
    how = ("selector.scope=dataset", "selector.ratio=0.4")
    one = one_process(tmp_path, "one", "trainer.batch_size=4", *how)
    two = launched(tmp_path, "ddp", "two", "trainer.batch_size=2", *how)
    assert_same_run(one, two, atol=1e-5)
    fracs = {round(e["train/selected_frac"], 4) for e in read_metrics(two) if "train/selected_frac" in e}
    assert len(fracs) > 1  # the steps trained data-dependent shares


@pytest.mark.slow
def test_block_selection_on_two_processes_equals_one_process_accumulating(tmp_path):
    """selector.blocks: each process keeps the best of its own candidates on the device and the step counts the
    kept tokens there; 2 processes x batch 2 = 1 process x 2 accumulated micro-batches of 2 (the same rows)."""
    how = (
        "selector=train_loss",
        "selector.ratio=0.6",
        "selector.blocks=0.5",
        "selector.block_score=train_loss",
        "trainer.batch_size=2",
    )
    one = one_process(tmp_path, "one", "trainer.grad_accum=2", *how)
    two = launched(tmp_path, "ddp", "two", *how)
    assert_same_run(one, two, atol=1e-5)


def dcp_state(folder: Path) -> dict:
    """A sharded checkpoint's model and optimizer state, read back whole (for tests only)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(folder / "dcp", folder.parent / "whole.pt")
    return torch.load(folder.parent / "whole.pt", weights_only=True)


@pytest.mark.slow
def test_a_sharded_checkpoint_resumes_at_another_process_count(tmp_path):
    """FSDP2 (2 processes) -> 1 process and 1 process -> FSDP2 (2 processes), each equal to an
    uninterrupted 1-process run. A constant LR after warm-up, so a 3-step run resumed to 6 steps is
    the 6-step run; a step trains the same 4 rows in every launch."""
    common = ("selector.scope=sequence", "trainer.min_lr_ratio=1.0", "trainer.checkpoint_every=3")
    full = one_process(tmp_path, "full", "trainer.batch_size=4", "trainer.max_steps=6", *common)
    ARGS_3 = ("trainer.max_steps=3", *common)
    two = launched(tmp_path, "fsdp", "two_then_one", "trainer.batch_size=2", *ARGS_3)
    assert json.loads((two / "checkpoints" / "step_0000003" / "slm_state.json").read_text())["processes"] == 2
    one_process(tmp_path, "two_then_one", "trainer.batch_size=4", "trainer.max_steps=6", "trainer.resume=true")
    one = one_process(tmp_path, "one_then_two", "trainer.batch_size=4", *ARGS_3)
    launched(tmp_path, "fsdp", "one_then_two", "trainer.batch_size=2", "trainer.max_steps=6", "trainer.resume=true")
    for resumed in (two, one):
        info = json.loads((resumed / "run_info.json").read_text())
        assert [r["processes"] for r in info["resumes"]] in ([[2, 1]], [[1, 2]])
        assert_same_run(full, resumed, atol=1e-5, processes=None)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_two_processes_with_accumulation_equal_one_process(tmp_path, stage):
    """DeepSpeed steps inside backward: normalisation must happen before it, and only the last
    micro-batch of a step may step. Hidden size 1024 makes ZeRO-3 partition the output layer."""
    pytest.importorskip("deepspeed")
    common = ("model.config.hidden_size=1024", "selector.scope=sequence")
    one = one_process(tmp_path, "one", "trainer.batch_size=4", *common)
    two = launched(tmp_path, f"deepspeed_{stage}", "two", "trainer.batch_size=1", "trainer.grad_accum=2", *common)
    assert json.loads((two / "run_info.json").read_text())["mode"] == "deepspeed"
    assert "ran HF's full logits" not in (tmp_path / "two.stderr").read_text()  # registered before step 1
    assert_same_run(one, two, atol=1e-4, rel=1e-4)  # DeepSpeed sums the norm over flat partitions


@pytest.mark.slow
@pytest.mark.parametrize("config", ["ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"])
def test_sparse_backward_on_two_processes_equals_one_process(tmp_path, config):
    """The sparse backward's kept rows are each process's own: the updates equal one process's (which the
    model tests hold to the hand-masked reference). DeepSpeed accumulates two micro-batches of 1, and its
    width makes ZeRO-3 partition the decoder's linear layers, whose weights the backward reads back."""
    common = ["selector.scope=sequence", "trainer.sparse_backward=true"]
    split = ["trainer.batch_size=2"]
    if config.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
        common.append("model.config.hidden_size=1024")
        split = ["trainer.batch_size=1", "trainer.grad_accum=2"]
    one = one_process(tmp_path, "one", "trainer.batch_size=4", *common)
    two = launched(tmp_path, config, "two", *split, *common)
    assert_same_run(one, two, atol=1e-4 if config.startswith("deepspeed") else 1e-5, rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["fsdp", "deepspeed_zero2", "deepspeed_zero3"])
def test_bf16_two_processes_land_within_bf16_precision_of_one_process(tmp_path, config):
    """Each mode mixes precision its own way (1 process and DDP: bf16 autocast over float32 weights;
    FSDP2: bf16 parameters, float32 gradient reduction; DeepSpeed: bf16 weights and gradient
    communication, float32 optimizer state), so bf16 runs agree to bf16's precision, not exactly.
    Stated tolerance: losses within 1e-3 relative, gradient norms within 5%, final weights within a
    mean absolute difference of 1e-3 (as far apart as a float32 and a bf16 run of one process)."""
    if config.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
    common = ("selector.scope=sequence", "trainer.max_steps=6", "trainer.mixed_precision=bf16")
    one = one_process(tmp_path, "one", "trainer.batch_size=4", *common)
    two = launched(tmp_path, config, "two", "trainer.batch_size=2", *common, precision="bf16")
    ea, eb = read_metrics(one), read_metrics(two)
    assert [e["step"] for e in ea] == [e["step"] for e in eb]
    for x, y in zip(ea, eb):
        for k, rel in (("train/loss", 1e-3), ("eval/loss", 1e-3), ("train/grad_norm", 5e-2)):
            if k in x:
                assert y[k] == pytest.approx(x[k], rel=rel), (x["step"], k)
    from safetensors.torch import load_file

    wa, wb = load_file(str(one / "model" / "model.safetensors")), load_file(str(two / "model" / "model.safetensors"))
    diff = torch.cat([(wb[k].float() - wa[k].float()).abs().flatten() for k in wa])
    assert diff.mean() < 1e-3 and diff.max() < 3e-2, (diff.mean(), diff.max())


@pytest.mark.slow
def test_fsdp2_shards_every_large_tensor_saves_only_shards_and_keeps_reference_losses_float32(tmp_path):
    """The shipped FSDP config's environment, bf16: tests/support/launch/fsdp_probe.py checks the units, the shards
    held between steps, the largest tensor a checkpoint save materialises, the tie and ref_loss."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(
        ["--config_file", str(ROOT / "accelerate_configs" / "fsdp.yaml"), "--num_processes", "2", "x.py"]
    )
    args = _validate_launch_command(args)[0]
    env = {**os.environ, **prepare_multi_gpu_env(args), "OMP_NUM_THREADS": "1"}
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    probe = str(Path(__file__).resolve().parents[1] / "support" / "launch" / "fsdp_probe.py")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", probe],
                          env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-5000:]
    assert done.stdout.count("fsdp probe ok") == 4 and "falling back" not in done.stderr  # 2 ranks x 2 models


def test_a_model_loaded_in_bf16_trains_fp32_master_weights(tmp_path):
    """An update far below bf16's rounding step is kept (pure bf16 weights would drop it)."""
    from safetensors.torch import load_file

    from slm.data import build
    from slm.model import build_model

    base = ("model.dtype=bfloat16", "reference=none", "selector=all", "trainer.lr=1e-6", "trainer.max_steps=1",
            "trainer.warmup_steps=1", "trainer.weight_decay=0")  # fmt: skip
    cfg = compose_train(tmp_path / "cache", *base)
    train_composed(cfg, tmp_path / "fp32")
    data = build(cfg.data)
    start = build_model(cfg.model, len(data.tokenizer), cfg.seed, data.tokenizer).state_dict()
    after = load_file(str(tmp_path / "fp32" / "model" / "model.safetensors"))

    def changed(weights: dict) -> float:  # the share of all weights this 1e-6 update moved
        moved = sum(int((weights[k].float() != start[k].float()).sum()) for k in start)
        return moved / sum(t.numel() for t in start.values())

    assert all(t.dtype == torch.float32 for t in after.values()) and changed(after) > 0.9
    train_composed(compose_train(tmp_path / "cache", *base, "trainer.master_dtype=null"), tmp_path / "bf16")
    pure = load_file(str(tmp_path / "bf16" / "model" / "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in pure.values()) and changed(pure) < 0.1  # rounded away


def test_fp16_mixed_precision_with_a_loss_scaler_trains_like_fp32(tmp_path):
    base = ("reference=none", "selector.ratio=0.5", "trainer.max_steps=4")
    train_composed(compose_train(tmp_path / "cache", *base), tmp_path / "fp32")
    train_composed(compose_train(tmp_path / "cache", *base, "trainer.mixed_precision=fp16"), tmp_path / "fp16")
    a = [e["train/loss"] for e in read_metrics(tmp_path / "fp32") if "train/loss" in e]
    b = [e["train/loss"] for e in read_metrics(tmp_path / "fp16") if "train/loss" in e]
    assert len(a) == 4 and b == pytest.approx(a, rel=5e-3)
