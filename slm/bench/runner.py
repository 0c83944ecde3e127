"""slm-bench: one training step (forward + backward) of each head strategy, against HF's.

Every case runs on the same model and inputs in one process; ratios are to the decoder alone
(the floor) and to the HF baseline (full logits + masked loss) measured in the same run. Peak
memory is CUDA's ``max_memory_allocated`` on GPU; on CPU it is the peak RSS growth of a step in
a fresh subprocess per case (RSS is monotonic within a process, so cases cannot share one),
with glibc's mmap threshold fixed so that RSS follows live memory. Gradients are set to None
before every step, as a trainer does.

Four tables: ``slm-bench`` (training steps), ``--scoring`` (no-grad per-token losses, tokens/s),
``--sparse-mask`` (peak memory of a sparse ``loss_mask`` step at Phi-2 width, batches 1-8:
what ``SelectiveTrainer`` runs against the hand-written masked loss and HF's plain loss) and
``--decoder`` (the sparse backward at a decoder-dominated shape, against the exact selective step
and HF's, timed in alternating repetitions so that drift hits every case alike). A case
that fails is reported and the others still run; with ``--json`` the results so far are written
after every case, so a run cut short (a time limit on a lent GPU) keeps them.

Runs with torch and transformers alone (``python3 -m slm.bench`` on a machine without the rest
of slm's dependencies); Triton, Liger and cut-cross-entropy join the table where installed.
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

from slm.bench import perf_model
from slm.bench.workloads import (
    BASELINE,
    EXACT,
    FLOOR,
    SHAPES,
    SPARSE_CASES,
    build_workload,
    cases,
    decoder_cases,
    scoring_cases,
    sparse_cases,
)
from slm.head.matmul import fast_path


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


def time_alternating(fns: dict, model, reps: int, warmup: int, device: str) -> dict[str, float]:
    """Median ms of a training step per case, the cases taking turns step by step (pairs, not blocks)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(warmup + reps):
        for name, fn in fns.items():
            model.zero_grad(set_to_none=True)
            sync()
            t0 = time.perf_counter()
            fn().backward()
            sync()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
        print(f"  repetition {i + 1}/{warmup + reps} done", file=sys.stderr, flush=True)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


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


def measure_memory_subprocess(
    args, name: str, table: str, batch: int | None = None, accumulating: bool = False
) -> float:
    python = [sys.executable] + (["-S"] if sys.flags.no_site else [])  # the same packages as this process
    cmd = [
        *python,
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
        "--memory-table",
        table,
        "--backends",
        *args.backends,
    ]
    cmd += ["--accumulating"] if accumulating else []
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
    ok = {n: r for n, r in results.items() if "error" not in r}
    accumulating = bool(ok) and all("accumulating_peak_mib" in r for r in ok.values())
    cols = ["case", "ms/step", "tokens/s", "peak MiB"] + (["peak MiB, accumulating"] if accumulating else [])
    floor, base = (floor if floor in ok else None), (base if base in ok else None)
    cols += ["vs floor"] if floor else []
    cols += ["time vs HF", "memory vs HF"] if base else []
    print("| " + " | ".join(cols) + " |\n|---|" + "---:|" * (len(cols) - 1))
    for name, r in results.items():
        if "error" in r:
            print(f"| {name} | failed: {r['error'][:80]} |" + " |" * (len(cols) - 2))
            continue
        cells = [name, f"{r['ms']:.1f}", f"{r['tokens_per_s']:,.0f}", f"{r['peak_mib']:.0f}"]
        if accumulating:
            cells.append(f"{r['accumulating_peak_mib']:.0f}")
        if floor:
            r["floor_ratio"] = r["ms"] / ok[floor]["ms"]
            cells.append(f"{r['floor_ratio']:.2f}x")
        if base:
            r["time_ratio"], r["mem_ratio"] = r["ms"] / ok[base]["ms"], r["peak_mib"] / ok[base]["peak_mib"]
            cells += [f"{r['time_ratio']:.2f}x", f"{r['mem_ratio']:.2f}x"]
        print("| " + " | ".join(cells) + " |")


def _save(args, out: dict) -> None:
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(out, f, indent=1)
        os.replace(tmp, args.json)


def _measure(args, fns, model, ids, table: str, out: dict, results: dict, batch: int | None = None) -> dict:
    for name, fn in fns.items():
        model.zero_grad(set_to_none=True)  # the previous case's gradients are not this one's peak
        try:
            if args.device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            ms = time_case(fn, model, args.steps, args.warmup, args.device, train=table != "scoring")
            if args.device == "cuda":
                mem = torch.cuda.max_memory_allocated() / 2**20
            else:
                mem = measure_memory_subprocess(args, name, table, batch)
            results[name] = {"ms": ms, "tokens_per_s": ids.numel() / ms * 1e3, "peak_mib": mem}
            if table == "sparse" and args.device != "cuda":
                results[name]["accumulating_peak_mib"] = measure_memory_subprocess(args, name, table, batch, True)
            print(f"  {name}: {ms:.1f} ms/step, peak {mem:.0f} MiB", file=sys.stderr, flush=True)
        except Exception as e:  # one case's failure (a library's kernel, memory) leaves the others' numbers
            results[name] = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}"}
            print(f"  {name}: failed ({results[name]['error']})", file=sys.stderr, flush=True)
        _save(args, out)
    return results


def available_backends(device: str) -> list[str]:
    """Head backends that run on ``device``: torch everywhere; compiled and triton on CUDA."""
    if device != "cuda":
        return ["torch"]
    from slm.head import fused

    return ["torch", "compiled"] + (["triton"] if fused.unavailable(torch.device("cuda")) is None else [])


def describe_setup(args) -> str:
    """What this run really uses: device, versions, the head backends and CUDA's matmul paths."""
    lines = [
        f"device {args.device}" + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else ""),
        f"torch {torch.__version__}",
    ]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except ImportError:
        lines.append("triton not installed")
    lines.append(f"head backends measured: {', '.join(args.backends)}")
    if args.device == "cuda":
        a = torch.zeros(2, 2, device="cuda", dtype=getattr(torch, args.dtype))
        for op in ("mm", "addmm"):
            how = "yes" if fast_path(op, a) else "NO (float32 GEMMs)"
            lines.append(f"{op}(out_dtype=float32) for {args.dtype}: {how}")
    return "; ".join(lines)


def _decoder(args, dtype, out: dict) -> None:
    model, ids, ref_loss, mask = build_workload(args.shape, args.device, dtype, args.batch, args.seq)
    fns = decoder_cases(model, ids, ref_loss, mask)
    always = (BASELINE, f"{EXACT}_excess_0.6")
    fns = {n: f for n, f in fns.items() if args.only is None or n in always or n in args.only}
    cfg = model.config
    body = sum(p.numel() for n, p in model.named_parameters() if "layers." in n)
    head = cfg.vocab_size * cfg.hidden_size
    print(
        f"slm-bench --decoder: shape={args.shape} ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, vocab "
        f"{cfg.vocab_size}; the head is {head / (head + body):.0%} of the weights' matmul work), {args.device}, "
        f"{args.dtype}, {ids.shape[0]}x{ids.shape[1]} tokens; {len(fns)} cases taking turns, {args.warmup} + "
        f"{args.steps} repetitions",
        flush=True,
    )
    ms = time_alternating(fns, model, args.steps, args.warmup, args.device)
    results = out["cases"]
    for name, fn in fns.items():
        results[name] = {"ms": ms[name], "tokens_per_s": ids.numel() / ms[name] * 1e3}
        try:
            if args.device == "cuda":
                model.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                fn().backward()
                results[name]["peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
            else:
                results[name]["peak_mib"] = measure_memory_subprocess(args, name, "decoder")
        except Exception as e:
            results[name]["peak_mib"] = float("nan")
            print(f"  {name}: memory not measured ({type(e).__name__}: {e})", file=sys.stderr, flush=True)
        _save(args, out)
    print("| case | ms/step | tokens/s | peak MiB | time vs HF | time vs exact | memory vs exact |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        exact = results.get(_exact_twin(name))
        cells = [name, f"{r['ms']:.0f}", f"{r['tokens_per_s']:,.0f}", f"{r['peak_mib']:.0f}"]
        cells.append(f"{r['ms'] / results[BASELINE]['ms']:.2f}x")
        if exact is not None and name != BASELINE:
            r["time_vs_exact"], r["mem_vs_exact"] = r["ms"] / exact["ms"], r["peak_mib"] / exact["peak_mib"]
            cells += [f"{r['time_vs_exact']:.2f}x", f"{r['mem_vs_exact']:.2f}x"]
        else:
            cells += ["", ""]
        print("| " + " | ".join(cells) + " |")
    _save(args, out)


def _exact_twin(name: str) -> str:
    """The exact selective case that trains the same tokens as ``name``."""
    for tag in ("slm_sparse_all", "slm_sparse_top_half"):
        if name.startswith(tag):
            return EXACT + name[len(tag) :]
    return name


def _sparse(args, dtype, out: dict) -> None:
    out["batches"] = {}
    batches = args.batches
    n_cases = len(SPARSE_CASES)
    per_case = "" if args.device == "cuda" else " and 2 memory subprocesses"
    print(
        f"slm-bench --sparse-mask plan: {n_cases} cases x batches {batches}, {args.warmup + args.steps} steps "
        f"each{per_case}; batch {batches[0]} runs first and gives the time estimate for the rest"
        f"{'' if args.quick else ' (--quick: batches 1 and 2, 3 steps)'}",
        flush=True,
    )
    started = time.perf_counter()
    for i, batch in enumerate(batches):
        model, ids, _, _ = build_workload(args.shape, args.device, dtype, batch, args.seq)
        res = _measure(
            args, sparse_cases(model, ids), model, ids, "sparse", out, out["batches"].setdefault(batch, {}), batch
        )
        _table(f"\nbatch {batch} x {ids.shape[1]}:", res, "hand_written_masked_loss", None)
        if i == 0 and len(batches) > 1:
            first = time.perf_counter() - started
            rest = first * sum(b / batches[0] for b in batches[1:])
            print(
                f"\nbatch {batches[0]} took {first / 60:.1f} min; batches {batches[1:]} should take about "
                f"{rest / 60:.0f} min more (time grows with the batch)",
                flush=True,
            )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="slm-bench", description=__doc__.split("\n")[0])
    p.add_argument(
        "--shape", choices=sorted(SHAPES), default=None, help="default: cpu (phi2-1layer with --sparse-mask)"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 on CPU, bfloat16 on CUDA by default")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="timed steps per case (20; 3 with --decoder on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (3; 1 with --decoder on CPU)")
    p.add_argument(
        "--backends",
        nargs="*",
        default=None,
        help="head backends to measure (default: every one the device runs: torch on CPU; torch, "
        "compiled and triton on CUDA)",
    )
    p.add_argument("--only", nargs="*", default=None, help="run only these cases (the baselines always run)")
    p.add_argument("--scoring", action="store_true", help="the no-grad scoring table instead of training steps")
    p.add_argument("--sparse-mask", action="store_true", help="the sparse loss_mask memory table (batches 1-8)")
    p.add_argument(
        "--decoder", action="store_true", help="the sparse backward's step times at a decoder-dominated shape"
    )
    p.add_argument("--batches", type=int, nargs="*", default=[1, 2, 4, 8], help="--sparse-mask batch sizes")
    p.add_argument("--quick", action="store_true", help="--sparse-mask on batches 1 and 2 with 3 steps (minutes)")
    p.add_argument("--json", default=None, help="also write the results here (after every case)")
    p.add_argument(
        "--model", action="store_true", help="print the expected H100/H200 head times (FLOPs, bytes) and exit"
    )
    p.add_argument("--memory-case", default=None, help=argparse.SUPPRESS)
    p.add_argument("--memory-table", default="train", help=argparse.SUPPRESS)
    p.add_argument("--accumulating", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.model:  # arithmetic only: no model is built
        tables = [perf_model.perf_table(gpu) for gpu in perf_model.GPUS]
        tables += [perf_model.sparse_table(gpu) for gpu in perf_model.GPUS]
        print("\n\n".join(tables), flush=True)
        return
    args.shape = args.shape or ("phi2-1layer" if args.sparse_mask else "llama-768x12" if args.decoder else "cpu")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    slow = args.decoder and args.device != "cuda"
    args.steps = args.steps or (3 if slow else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if slow else 3)
    args.backends = args.backends or available_backends(args.device)
    if args.quick:
        args.batches, args.steps, args.warmup = [b for b in args.batches if b <= 2] or [1], 3, 1
    dtype = getattr(torch, args.dtype)
    if args.decoder and not args.memory_case:
        out = {"shape": args.shape, "device": args.device, "dtype": args.dtype, "setup": describe_setup(args)}
        out["cases"] = {}
        print(f"slm-bench: {out['setup']}", flush=True)
        return _decoder(args, dtype, out)
    if args.sparse_mask and not args.memory_case:
        out = {"shape": args.shape, "device": args.device, "dtype": args.dtype, "setup": describe_setup(args)}
        print(f"slm-bench: {out['setup']}", flush=True)
        return _sparse(args, dtype, out)
    model, ids, ref_loss, mask = build_workload(args.shape, args.device, dtype, args.batch, args.seq)
    table = "scoring" if args.scoring else "sparse" if args.sparse_mask else "train"
    if args.memory_case:
        table = args.memory_table
        fns = {
            "scoring": lambda: scoring_cases(model, ids, args.backends),
            "sparse": lambda: sparse_cases(model, ids),
            "decoder": lambda: decoder_cases(model, ids, ref_loss, mask),
            "train": lambda: cases(model, ids, ref_loss, mask, args.backends),
        }[table]()
        return _memory_child(args, fns, model)

    b, t = ids.shape
    out = {"shape": args.shape, "device": args.device, "dtype": args.dtype, "setup": describe_setup(args), "cases": {}}
    print(f"slm-bench: {out['setup']}", flush=True)
    mem_kind = "max_memory_allocated" if args.device == "cuda" else "peak RSS growth"
    head = (
        f"slm-bench: shape={args.shape} (vocab {model.config.vocab_size}, hidden {model.config.hidden_size}), "
        f"{args.device}, {args.dtype}, median of {args.steps} steps; memory = {mem_kind}"
    )
    fns = scoring_cases(model, ids, args.backends) if args.scoring else cases(model, ids, ref_loss, mask, args.backends)
    keep = {BASELINE, FLOOR, "hf_full_logits"}
    fns = {n: f for n, f in fns.items() if args.only is None or n in keep or n in args.only}
    res = _measure(args, fns, model, ids, table, out, out["cases"])
    print(head + f"; {b}x{t} tokens per step")
    if args.scoring:
        _table("scoring (no grad):", res, "hf_full_logits", None)
    else:
        _table("", res, BASELINE, FLOOR)
    _save(args, out)
