"""slm-bench: one training step (forward + backward) of each head strategy, against HF's.

Every case runs on the same model and inputs in one process; ratios are to the decoder alone
(the floor) and to the HF baseline (full logits + masked loss) measured in the same run. Peak
memory is CUDA's ``max_memory_allocated`` on GPU; on CPU it is the peak RSS growth of a step in
a fresh subprocess per case (RSS is monotonic within a process, so cases cannot share one),
with glibc's mmap threshold fixed so that RSS follows live memory. Gradients are set to None
before every step, as a trainer does.

Three tables: ``slm-bench`` (training steps), ``--scoring`` (no-grad per-token losses, tokens/s)
and ``--sparse-mask`` (peak memory of a sparse ``loss_mask`` step at Phi-2 width, batches 1-8:
what ``SelectiveTrainer`` runs against the hand-written masked loss and HF's plain loss).
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
    "phi2-1layer": ("phi", dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=1,
                                num_attention_heads=32, vocab_size=51200), 1, 512),
    "qwen2.5-0.5b": ("qwen2", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                   num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                   tie_word_embeddings=True), 8, 2048),
    "tinyllama-1.1b": ("llama", dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                                     num_attention_heads=32, num_key_value_heads=4, vocab_size=32000), 8, 2048),
}  # fmt: skip

BASELINE = "hf_full_logits_masked"
FLOOR = "backbone_only (floor)"
SPARSE_CASES = ("selective_loss_mask", "hand_written_masked_loss", "hf_plain_loss")


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


def _masked_ce(logits, ids, keep):
    """The hand-written loss a loss_mask user writes: full logits, per-token CE, masked mean."""
    logits = logits[:, :-1].float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    keep = keep[:, 1:].reshape(-1)
    return (ce * keep).sum() / keep.sum()


def cases(model, ids, ref_loss, mask) -> dict:
    """name -> zero-argument callable returning a scalar loss to backpropagate."""
    import slm

    lm = slm.SelectiveLM(model)
    m3, m6 = mask(0.3), mask(0.6)
    out = {
        BASELINE: lambda: _masked_ce(model(input_ids=ids).logits, ids, m6),
        FLOOR: lambda: model.base_model(input_ids=ids).last_hidden_state.float().square().mean(),
        "slm_loss_mask_0.3": lambda: lm(input_ids=ids, labels=ids, loss_mask=m3).loss,
        "slm_loss_mask_0.6": lambda: lm(input_ids=ids, labels=ids, loss_mask=m6).loss,
    }
    for r in (1.0, 0.6, 0.3):
        out[f"slm_excess_{r}"] = lambda r=r: lm(input_ids=ids, labels=ids, ref_loss=ref_loss, ratio=r).loss
    out.update(_library_cases(model, ids, ref_loss, m6))
    return out


def sparse_cases(model, ids) -> dict:
    """2 of every 512 tokens trained: what the Phi-2 user's SelectiveTrainer step runs, and the two
    losses it replaces."""
    import slm

    keep = torch.zeros_like(ids, dtype=torch.bool)
    keep[:, 1 :: max(2, ids.shape[1] // 2)] = True  # two tokens per row
    lm = slm.SelectiveLM(model)
    return {
        "selective_loss_mask": lambda: lm(input_ids=ids, labels=ids, loss_mask=keep).loss,
        "hand_written_masked_loss": lambda: _masked_ce(model(input_ids=ids).logits, ids, keep),
        "hf_plain_loss": lambda: model(input_ids=ids, labels=ids.masked_fill(~keep, -100)).loss,
    }


def scoring_cases(model, ids) -> dict:
    """No-grad per-token losses of every token: slm's scoring pass against CCE's and HF's logits."""
    import slm

    out = {
        "slm_token_losses": lambda: slm.token_losses(model, ids, ids),
        "hf_full_logits": lambda: _masked_ce(model(input_ids=ids).logits, ids, torch.ones_like(ids, dtype=torch.bool)),
    }
    if ids.device.type == "cuda":
        try:
            from cut_cross_entropy import linear_cross_entropy

            W = model.get_output_embeddings().weight
            hidden = lambda: model.base_model(input_ids=ids).last_hidden_state[:, :-1].reshape(-1, W.shape[1])
            out["cce_forward"] = lambda: linear_cross_entropy(hidden(), W, ids[:, 1:].reshape(-1), reduction="none")
        except ImportError:
            pass
    return out


def _library_cases(model, ids, ref_loss, m6) -> dict:
    """torch's own linear_cross_entropy (any device) and, on CUDA, Liger and Apple's CCE, each used
    the best way it allows. The masked ones train the same 60% of tokens as the HF baseline."""
    import slm

    extra = {}
    W = model.get_output_embeddings().weight
    hidden = lambda: model.base_model(input_ids=ids).last_hidden_state[:, :-1].reshape(-1, W.shape[1])
    tgt = ids[:, 1:].reshape(-1)
    masked_tgt = tgt.masked_fill(~m6[:, 1:].reshape(-1), -100)
    if hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions"):  # torch >= 2.13
        opts = torch.nn.LinearCrossEntropyOptions()  # the chunked path, never the full logits
        extra["torch_linear_ce_mask_0.6"] = lambda: F.linear_cross_entropy(hidden(), W, masked_tgt, options=opts)
    if ids.device.type != "cuda":
        return extra
    try:
        from cut_cross_entropy import linear_cross_entropy

        def cce_score_then_train():  # score all rows without grad, then CCE on the selected rows
            h = hidden()
            with torch.no_grad():
                tl = linear_cross_entropy(h.detach(), W.detach(), tgt, reduction="none", impl="cce_exact")
            scores = F.pad(tl.view(ids.shape[0], -1), (1, 0)) - ref_loss
            sel = slm.select_tokens(scores, 0.6)[:, 1:].reshape(-1)
            return linear_cross_entropy(h, W, tgt.masked_fill(~sel, -100), reduction="mean", impl="cce_exact")

        extra["cce_score_then_train_0.6"] = cce_score_then_train
    except ImportError:
        pass
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        extra["liger_flce_mask_0.6"] = lambda: liger_fused_linear_cross_entropy(hidden(), W, masked_tgt)
    except ImportError:
        pass
    return extra


def time_case(fn, model, steps: int, warmup: int, device: str, train: bool = True) -> float:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    for i in range(warmup + steps):
        model.zero_grad(set_to_none=True)
        sync()
        t0 = time.perf_counter()
        if train:
            fn().backward()
        else:
            with torch.no_grad():
                fn()
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


def measure_memory_subprocess(args, name: str, table: str, batch: int | None = None,
                              accumulating: bool = False) -> float:  # fmt: skip
    cmd = [sys.executable, "-m", "slm.bench", "--shape", args.shape, "--device", args.device, "--dtype", args.dtype,
           "--memory-case", name, "--memory-table", table] + (["--accumulating"] if accumulating else [])  # fmt: skip
    if batch or args.batch:
        cmd += ["--batch", str(batch or args.batch)]
    if args.seq:
        cmd += ["--seq", str(args.seq)]
    # A fixed mmap threshold: freed large blocks go back to the OS, so RSS follows live memory
    # instead of what glibc happens to keep from earlier allocations.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"slm-bench memory case {name} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_mib"]


def _memory_child(args, fns: dict, model) -> None:
    """Child process: peak RSS growth of two steps of one case. Gradients are reset to None before
    each step, or, with ``--accumulating``, kept (micro-steps after the first of an accumulated
    step: what a step allocates beyond the gradients it adds into)."""
    train = args.memory_table != "scoring"
    run = lambda: fns[args.memory_case]().backward() if train else _no_grad(fns[args.memory_case])
    run()  # warm-up: allocator pools and lazy initialisation, as in the timed steps
    if not args.accumulating:
        model.zero_grad(set_to_none=True)
    _reset_peak_rss()
    base = _proc_status_mib("VmRSS")
    for _ in range(2):
        if not args.accumulating:
            model.zero_grad(set_to_none=True)
        run()
    print(json.dumps({"peak_mib": _proc_status_mib("VmHWM") - base}))


def _no_grad(fn):
    with torch.no_grad():
        return fn()


def _table(title: str, results: dict, base: str | None, floor: str | None) -> None:
    print(title)
    accumulating = all("accumulating_peak_mib" in r for r in results.values())
    cols = ["case", "ms/step", "tokens/s", "peak MiB"] + (["peak MiB, accumulating"] if accumulating else [])
    cols += ["vs floor"] if floor else []
    cols += ["time vs HF", "memory vs HF"] if base else []
    print("| " + " | ".join(cols) + " |\n|---|" + "---:|" * (len(cols) - 1))
    for name, r in results.items():
        cells = [name, f"{r['ms']:.1f}", f"{r['tokens_per_s']:,.0f}", f"{r['peak_mib']:.0f}"]
        if accumulating:
            cells.append(f"{r['accumulating_peak_mib']:.0f}")
        if floor:
            r["floor_ratio"] = r["ms"] / results[floor]["ms"]
            cells.append(f"{r['floor_ratio']:.2f}x")
        if base:
            r["time_ratio"], r["mem_ratio"] = r["ms"] / results[base]["ms"], r["peak_mib"] / results[base]["peak_mib"]
            cells += [f"{r['time_ratio']:.2f}x", f"{r['mem_ratio']:.2f}x"]
        print("| " + " | ".join(cells) + " |")


def _measure(args, fns, model, ids, table: str, batch: int | None = None) -> dict:
    results = {}
    for name, fn in fns.items():
        model.zero_grad(set_to_none=True)  # the previous case's gradients are not this one's peak
        if args.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        ms = time_case(fn, model, args.steps, args.warmup, args.device, train=table != "scoring")
        if args.device == "cuda":
            mem = torch.cuda.max_memory_allocated() / 2**20
        else:
            mem = measure_memory_subprocess(args, name, table, batch)
        results[name] = {"ms": ms, "tokens_per_s": ids.numel() / ms * 1e3, "peak_mib": mem}
        # as it goes, so that a run cut short (a time limit on a lent GPU) still leaves its numbers
        print(f"  {name}: {ms:.1f} ms/step, peak {mem:.0f} MiB", file=sys.stderr, flush=True)
        if table == "sparse" and args.device != "cuda":
            results[name]["accumulating_peak_mib"] = measure_memory_subprocess(args, name, table, batch, True)
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="slm-bench", description=__doc__.split("\n")[0])
    p.add_argument(
        "--shape", choices=sorted(SHAPES), default=None, help="default: cpu (phi2-1layer with --sparse-mask)"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 on CPU, bfloat16 on CUDA by default")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--only", nargs="*", default=None, help="run only these cases (the baselines always run)")
    p.add_argument("--scoring", action="store_true", help="the no-grad scoring table instead of training steps")
    p.add_argument("--sparse-mask", action="store_true", help="the sparse loss_mask memory table (batches 1-8)")
    p.add_argument("--batches", type=int, nargs="*", default=[1, 2, 4, 8], help="--sparse-mask batch sizes")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--memory-case", default=None, help=argparse.SUPPRESS)
    p.add_argument("--memory-table", default="train", help=argparse.SUPPRESS)
    p.add_argument("--accumulating", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.shape = args.shape or ("phi2-1layer" if args.sparse_mask else "cpu")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    dtype = getattr(torch, args.dtype)
    model, ids, ref_loss, mask = build(args.shape, args.device, dtype, args.batch, args.seq)
    table = "scoring" if args.scoring else "sparse" if args.sparse_mask else "train"
    if args.memory_case:
        table = args.memory_table
        fns = {"scoring": lambda: scoring_cases(model, ids), "sparse": lambda: sparse_cases(model, ids),
               "train": lambda: cases(model, ids, ref_loss, mask)}[table]()  # fmt: skip
        return _memory_child(args, fns, model)

    b, t = ids.shape
    mem_kind = "max_memory_allocated" if args.device == "cuda" else "peak RSS growth"
    head = (f"slm-bench: shape={args.shape} (vocab {model.config.vocab_size}, hidden {model.config.hidden_size}), "
            f"{args.device}, {args.dtype}, median of {args.steps} steps; memory = {mem_kind}")  # fmt: skip
    out = {"shape": args.shape, "device": args.device, "dtype": args.dtype}
    if args.sparse_mask:
        out["batches"] = {}
        print(head + f"; 2 of {t} tokens per row trained")
        for batch in args.batches:
            model, ids, _, _ = build(args.shape, args.device, dtype, batch, args.seq)
            res = _measure(args, sparse_cases(model, ids), model, ids, "sparse", batch)
            _table(f"\nbatch {batch} x {t}:", res, "hand_written_masked_loss", None)
            out["batches"][batch] = res
    else:
        fns = scoring_cases(model, ids) if args.scoring else cases(model, ids, ref_loss, mask)
        keep = {BASELINE, FLOOR, "hf_full_logits"}
        fns = {n: f for n, f in fns.items() if args.only is None or n in keep or n in args.only}
        res = _measure(args, fns, model, ids, table)
        print(head + f"; {b}x{t} tokens per step")
        if args.scoring:
            _table("scoring (no grad):", res, "hf_full_logits", None)
        else:
            _table("", res, BASELINE, FLOOR)
        out["cases"] = res
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
