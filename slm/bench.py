"""slm-bench: one training step (forward + backward) of each head strategy, against HF's.

Every case runs on the same model and inputs in one process; ratios are to the HF baseline
(full logits + masked loss) measured in the same run. Peak memory is CUDA's
``max_memory_allocated`` on GPU; on CPU it is the peak RSS growth of a fresh subprocess per
case (RSS is monotonic within a process, so cases cannot share one).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = {
    # name: (model_type, config kwargs, batch, seq)
    "tiny": ("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=2, vocab_size=2000), 2, 32),
    "cpu": ("llama", dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=4, vocab_size=32000), 4, 256),
    "qwen2.5-0.5b": ("qwen2", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                   num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                   tie_word_embeddings=True), 8, 2048),
    "tinyllama-1.1b": ("llama", dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                                     num_attention_heads=32, num_key_value_heads=4, vocab_size=32000), 8, 2048),
}  # fmt: skip

BASELINE = "hf_full_logits_masked"


def build(shape: str, device: str, dtype: torch.dtype, batch: int | None, seq: int | None):
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, kwargs, b, t = SHAPES[shape]
    b, t = batch or b, seq or t
    cfg = AutoConfig.for_model(model_type, max_position_embeddings=max(t, 2048), **kwargs)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).to(device=device, dtype=dtype).train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (b, t), generator=g).to(device)
    ref_loss = (torch.rand(b, t, generator=g) * 8).to(device)
    mask = lambda r: (torch.rand(b, t, generator=torch.Generator().manual_seed(1)) < r).to(device)
    return model, ids, ref_loss, mask


def cases(model, ids, ref_loss, mask) -> dict:
    """name -> zero-argument callable returning a scalar loss to backpropagate."""
    import slm

    lm = slm.SelectiveLM(model)
    m3, m6 = mask(0.3), mask(0.6)

    def hf_masked():  # what a user with a loss_mask writes today
        logits = model(input_ids=ids).logits[:, :-1].float()
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        keep = m6[:, 1:].reshape(-1)
        return (ce * keep).sum() / keep.sum()

    def backbone_only():  # the floor: decoder forward + backward, no output layer at all
        return model.base_model(input_ids=ids).last_hidden_state.float().square().mean()

    out = {
        BASELINE: hf_masked,
        "backbone_only (floor)": backbone_only,
        "slm_loss_mask_0.3": lambda: lm(input_ids=ids, labels=ids, loss_mask=m3).loss,
    }
    for r in (1.0, 0.6, 0.3):
        out[f"slm_excess_{r}"] = lambda r=r: lm(input_ids=ids, labels=ids, ref_loss=ref_loss, ratio=r).loss
    out.update(_gpu_library_cases(model, ids, ref_loss, m6))
    return out


def _gpu_library_cases(model, ids, ref_loss, m6) -> dict:
    """Liger and Apple's CCE, each used the best way it allows, when installed on CUDA."""
    if ids.device.type != "cuda":
        return {}
    import slm

    extra = {}
    W = model.get_output_embeddings().weight
    hidden = lambda: model.base_model(input_ids=ids).last_hidden_state[:, :-1].reshape(-1, W.shape[1])
    try:
        from cut_cross_entropy import linear_cross_entropy

        def cce_score_then_train():  # score all rows without grad, then CCE on the selected rows
            h = hidden()
            tgt = ids[:, 1:].reshape(-1)
            with torch.no_grad():
                tl = linear_cross_entropy(h.detach(), W, tgt, reduction="none")
            scores = F.pad(tl.view(ids.shape[0], -1), (1, 0)) - ref_loss
            sel = slm.select_tokens(scores, 0.6)[:, 1:].reshape(-1)
            return linear_cross_entropy(h, W, tgt.masked_fill(~sel, -100), reduction="mean")

        extra["cce_score_then_train_0.6"] = cce_score_then_train
    except ImportError:
        pass
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        def liger_mask():  # Liger computes every row, then zeroes the masked ones
            tgt = ids[:, 1:].reshape(-1).masked_fill(~m6[:, 1:].reshape(-1), -100)
            return liger_fused_linear_cross_entropy(hidden(), W, tgt)

        extra["liger_flce_mask_0.6"] = liger_mask
    except ImportError:
        pass
    return extra


def time_case(fn, model, steps: int, warmup: int, device: str) -> float:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    for i in range(warmup + steps):
        model.zero_grad(set_to_none=True)
        sync()
        t0 = time.perf_counter()
        fn().backward()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _proc_status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # reported in kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    # "5" resets VmHWM (the peak RSS) to the current RSS (Linux >= 4.0).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure_memory_subprocess(args, name: str) -> float:
    cmd = [
        sys.executable,
        "-m",
        "slm.bench",
        "--shape",
        args.shape,
        "--device",
        args.device,
        "--dtype",
        args.dtype,
        "--memory-case",
        name,
    ]
    if args.batch:
        cmd += ["--batch", str(args.batch)]
    if args.seq:
        cmd += ["--seq", str(args.seq)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_mib"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="slm-bench", description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="cpu")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 on CPU, bfloat16 on CUDA by default")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--only", nargs="*", default=None, help="run only these cases (baseline always runs)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--memory-case", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    dtype = getattr(torch, args.dtype)
    model, ids, ref_loss, mask = build(args.shape, args.device, dtype, args.batch, args.seq)
    fns = cases(model, ids, ref_loss, mask)

    if args.memory_case:  # child process: one case, report peak RSS growth of its steps
        fns[args.memory_case]().backward()  # grads exist from here on, as in the timed steps
        _reset_peak_rss()
        base = _proc_status_mib("VmRSS")
        for _ in range(2):
            fns[args.memory_case]().backward()
        print(json.dumps({"peak_mib": _proc_status_mib("VmHWM") - base}))
        return

    names = [n for n in fns if args.only is None or n == BASELINE or n in args.only]
    results = {}
    for name in names:
        if args.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        ms = time_case(fns[name], model, args.steps, args.warmup, args.device)
        if args.device == "cuda":
            mem = torch.cuda.max_memory_allocated() / 2**20
        else:
            mem = measure_memory_subprocess(args, name)
        results[name] = {"ms": ms, "tokens_per_s": ids.numel() / ms * 1e3, "peak_mib": mem}

    base = results[BASELINE]
    b, t = ids.shape
    mem_kind = "max_memory_allocated" if args.device == "cuda" else "peak RSS growth"
    print(
        f"slm-bench: shape={args.shape} ({b}x{t} tokens, vocab {model.config.vocab_size}), "
        f"{args.device}, {args.dtype}, median of {args.steps} steps; memory = {mem_kind}"
    )
    print("| case | ms/step | tokens/s | peak MiB | time vs HF | memory vs HF |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        r["time_ratio"], r["mem_ratio"] = r["ms"] / base["ms"], r["peak_mib"] / base["peak_mib"]
        print(
            f"| {name} | {r['ms']:.1f} | {r['tokens_per_s']:,.0f} | {r['peak_mib']:.0f} | "
            f"{r['time_ratio']:.2f}x | {r['mem_ratio']:.2f}x |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": args.shape, "device": args.device, "dtype": args.dtype, "cases": results}, f, indent=1)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
