"""SelectiveSFTTrainer against TRL's SFTTrainer: one training step's time and peak memory, in one run.

Each case runs in a fresh process (so its peak RSS, or CUDA's max_memory_allocated, is its own) on the
same model, batches and settings; TRL's own trainer is the baseline every ratio is divided by. The model
is one whose output layer dominates (a large vocabulary over a small decoder), where selection pays.

    python scripts/trl_bench.py                      # CPU: vocab 32768, hidden 256, 2 layers, 8 x 256 tokens
    python scripts/trl_bench.py --device cuda --vocab 151936 --hidden 896 --layers 4 --batch 8 --seq 2048
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CASES = {  # name -> (trainer, selection_ratio or GRPO's top_entropy_quantile)
    "trl SFTTrainer": ("trl", 1.0),
    "SelectiveSFTTrainer, ratio 1.0": ("slm", 1.0),
    "SelectiveSFTTrainer, ratio 0.6": ("slm", 0.6),
    "SelectiveSFTTrainer, ratio 0.3": ("slm", 0.3),
    "trl GRPOTrainer, top_entropy_quantile 0.2": ("trl-grpo", 0.2),
    "SelectiveGRPOTrainer, top_entropy_quantile 0.2": ("slm-grpo", 0.2),
}


def _case(args) -> dict:
    import torch
    import trl
    from datasets import Dataset

    from slm.data import builtin_tokenizer
    from slm.trainers import SelectiveSFTTrainer

    which, ratio = CASES[args.case]
    if which.endswith("grpo"):
        return _grpo_case(args, which, ratio)
    model = _model(args)
    g = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(args.batch * (args.steps + 2)):  # prompt-completion rows: the last 3/4 of each trains
        ids = torch.randint(2, args.vocab, (args.seq,), generator=g).tolist()
        cut = args.seq // 4
        rows.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:]})  # TRL keeps given labels
    data = Dataset.from_list(rows)
    targs = trl.SFTConfig(
        output_dir="/tmp/slm_trl_bench", per_device_train_batch_size=args.batch, max_length=None, report_to=[],
        use_cpu=args.device == "cpu", bf16=args.device == "cuda", max_steps=args.steps + 2, logging_steps=10**6,
        save_strategy="no",
    )  # fmt: skip
    tok = builtin_tokenizer()
    extra = {"selection_ratio": ratio, "selector": "train_loss"} if which == "slm" else {}
    cls = SelectiveSFTTrainer if which == "slm" else trl.SFTTrainer
    trainer = cls(model=model, args=targs, train_dataset=data, processing_class=tok, **extra)
    batches = [trainer._prepare_inputs(b) for b, _ in zip(trainer.get_train_dataloader(), range(args.steps + 2))]
    model.train()

    def step(b):
        n = trainer._get_num_items_in_batch([b], trainer.args.device)
        loss = trainer.compute_loss(model, dict(b), num_items_in_batch=n)
        loss.backward()
        model.zero_grad(set_to_none=True)

    return _measure(args, step, batches)


def _model(args):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    heads = max(1, args.hidden // 64)
    cfg = AutoConfig.for_model(
        "llama", vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads,
        max_position_embeddings=args.seq, pad_token_id=0, bos_token_id=0, eos_token_id=1,
    )  # fmt: skip
    return AutoModelForCausalLM.from_config(cfg).to(args.device)


def _grpo_case(args, which: str, quantile: float) -> dict:
    """One GRPO loss and backward on fixed completions (generation aside: it is the same for both)."""
    import torch
    import trl
    from datasets import Dataset

    from slm.data import builtin_tokenizer
    from slm.trainers import SelectiveGRPOTrainer

    model = _model(args)
    cls = SelectiveGRPOTrainer if which == "slm-grpo" else trl.GRPOTrainer
    gargs = trl.GRPOConfig(
        output_dir="/tmp/slm_trl_bench", per_device_train_batch_size=args.batch, num_generations=args.batch,
        report_to=[], use_cpu=args.device == "cpu", bf16=args.device == "cuda", top_entropy_quantile=quantile,
        save_strategy="no",
    )  # fmt: skip
    tok = builtin_tokenizer()
    trainer = cls(model=model, args=gargs, reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                  train_dataset=Dataset.from_list([{"prompt": "x"}] * args.batch), processing_class=tok)  # fmt: skip
    g = torch.Generator().manual_seed(1)
    prompt, completion = args.seq // 4, args.seq - args.seq // 4

    def batch():
        return {
            "prompt_ids": torch.randint(2, args.vocab, (args.batch, prompt), generator=g).to(args.device),
            "prompt_mask": torch.ones(args.batch, prompt, dtype=torch.long, device=args.device),
            "completion_ids": torch.randint(2, args.vocab, (args.batch, completion), generator=g).to(args.device),
            "completion_mask": torch.ones(args.batch, completion, dtype=torch.long, device=args.device),
            "advantages": torch.randn(args.batch, generator=g).to(args.device),
            "num_items_in_batch": torch.tensor(float(args.batch * completion), device=args.device),
        }

    batches = [batch() for _ in range(args.steps + 2)]
    model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which this bypasses

    def step(b):
        trainer.compute_loss(model, b).backward()
        model.zero_grad(set_to_none=True)

    return _measure(args, step, batches)


def _measure(args, step, batches) -> dict:
    import torch

    for b in batches[:2]:  # warm-up
        step(b)
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS to the current RSS
        base = _rss("VmRSS")
    t0 = time.perf_counter()
    for b in batches[2:]:
        step(b)
    if args.device == "cuda":
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = _rss("VmHWM") - base
    return {"ms": 1000 * (time.perf_counter() - t0) / args.steps, "peak_mib": peak}


def _rss(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        print(json.dumps(_case(args)))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # freed large blocks go back: RSS follows live memory
    results = {}
    for name in CASES:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--case", name]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode:
            raise SystemExit(f"case {name} failed:\n{done.stderr[-3000:]}")
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    bases = {"trl": results["trl SFTTrainer"], "grpo": results["trl GRPOTrainer, top_entropy_quantile 0.2"]}
    print(
        f"\nSFT step, {args.device}: llama vocab {args.vocab}, hidden {args.hidden}, {args.layers} layers, "
        f"{args.batch} x {args.seq} tokens (3/4 of them completion), {args.steps} steps after 2 of warm-up\n"
    )
    print("| case | ms/step | peak MiB | time vs TRL | memory vs TRL |\n|---|---:|---:|---:|---:|")
    for name, r in results.items():
        base = bases["grpo" if "GRPO" in name else "trl"]
        print(
            f"| {name} | {r['ms']:.1f} | {r['peak_mib']:.0f} | {r['ms'] / base['ms']:.2f}x | "
            f"{r['peak_mib'] / base['peak_mib']:.2f}x |"
        )


if __name__ == "__main__":
    main()
