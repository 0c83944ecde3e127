"""What a GPU step of the selective head should cost, before any GPU has run it: FLOPs and bytes moved
per kernel of the triton backend for a model shape, turned into expected milliseconds on a named GPU
(the larger of the compute time at a stated share of the bf16 tensor-core peak and the memory time at
a stated share of the HBM bandwidth), printed beside the decoder floor and the measured anchors, so
the first lent GPU run compares measurement with expectation line by line (``slm-bench --model``).

Per optimizer step of ``N`` tokens (``B x T``), width ``H``, vocabulary ``V``, compute dtype of ``s``
bytes, ``k`` trained rows (``ratio x N``, or the loss_mask's count):

* scoring (every valid row, no grad): ``2 N H V`` FLOPs; reads the hidden rows once and the weight once
  per wave of concurrent programs (``N H s + waves x V H s``: the programs of a wave walk the vocabulary
  in step and share each weight tile through L2), writes 8 bytes a row (loss, log-sum-exp). A
  ``loss_mask`` or ratio 1.0 scores only the ``k`` trained rows (their log-sum-exp);
* gradient kernel (``k`` rows): the logits again (``2 k H V``) and ``g`` written once (``k V s``);
* the two matmuls of the backward: ``dW = g^T h`` and ``dh = g W`` (``2 x 2 k V H``), reading ``g``
  twice and ``W`` and ``h`` once, writing ``dW`` in float32 (``4 V H``).

Estimates, not measurements: if the programs of a wave did not share weight tiles, every row block
would read the whole weight (``ceil(N / BLOCK_N)`` times instead of ``waves``) and the scoring kernel
would be memory-bound; element-wise work inside the kernels is left out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Dense bf16 tensor-core peak (TFLOP/s), HBM bandwidth (TB/s) and SMs, vendor datasheets (SXM parts).
GPUS = {"H100": (989.0, 3.35, 132), "H200": (989.0, 4.8, 132)}
EFFICIENCY = {"compute": 0.7, "memory": 0.8}  # the share of peak a well-tuned kernel reaches
# Measured on an H200 for DESIGN.md (bf16, Qwen2.5-0.5B, 8 x 2048 tokens, one training step, ratio 0.6).
ANCHORS_H200_MS = {
    "decoder alone": 139.0,
    "HF full logits + mask": 190.0,
    "CCE score-then-train": 169.0,
    "Liger FLCE": 213.0,
}
QWEN = {"tokens": 8 * 2048, "hidden": 896, "vocab": 151936}


@dataclass(frozen=True)
class Kernel:
    name: str
    flops: float
    bytes: float

    def ms(self, gpu: str) -> float:
        tflops, tbs, _ = GPUS[gpu]
        compute = self.flops / (tflops * 1e12 * EFFICIENCY["compute"])
        memory = self.bytes / (tbs * 1e12 * EFFICIENCY["memory"])
        return 1e3 * max(compute, memory)


def head_kernels(
    tokens: int,
    hidden: int,
    vocab: int,
    trained: int,
    scored: int | None = None,
    dtype_bytes: int = 2,
    block_n: int = 64,
    sms: int = 132,
) -> list[Kernel]:
    """The triton backend's work for one step: ``scored`` rows through the scoring kernel (default: every
    token), ``trained`` rows through the gradient kernel and the two backward matmuls."""
    n = tokens if scored is None else scored
    k, h, v, s = trained, hidden, vocab, dtype_bytes
    waves = lambda rows: math.ceil(math.ceil(rows / block_n) / sms)  # weight reads: once per wave
    return [
        Kernel("scoring kernel", 2 * n * h * v, n * h * s + waves(n) * v * h * s + 8 * n),
        Kernel("gradient kernel", 2 * k * h * v, k * h * s + waves(k) * v * h * s + k * v * s),
        Kernel("dW = g^T h", 2 * k * v * h, k * v * s + k * h * s + 4 * v * h),
        Kernel("dh = g W", 2 * k * v * h, k * v * s + v * h * s + 4 * k * h),
    ]


def perf_table(gpu: str = "H200", decoder_ms: float = ANCHORS_H200_MS["decoder alone"], shape: dict = QWEN) -> str:
    """Expected head milliseconds per kernel and per step at ratios 0.3 / 0.6 and a loss_mask of 0.3, beside the
    decoder floor and the measured anchors (measured on an H200: on another GPU they are for orientation)."""
    n, h, v, sms = shape["tokens"], shape["hidden"], shape["vocab"], GPUS[gpu][2]
    settings = {
        "excess 0.3": head_kernels(n, h, v, round(0.3 * n), sms=sms),
        "excess 0.6": head_kernels(n, h, v, round(0.6 * n), sms=sms),
        "loss_mask 0.3": head_kernels(n, h, v, round(0.3 * n), scored=round(0.3 * n), sms=sms),
    }
    rows = [f"| kernel | {' | '.join(settings)} |", "|---|" + "---|" * len(settings)]
    names = [k.name for k in next(iter(settings.values()))]
    for i, name in enumerate(names):
        cells = [
            f"{ks[i].flops / 1e12:.2f} TFLOP, {ks[i].bytes / 1e9:.2f} GB: {ks[i].ms(gpu):.1f} ms"
            for ks in settings.values()
        ]
        rows.append(f"| {name} | {' | '.join(cells)} |")
    head = {label: sum(k.ms(gpu) for k in ks) for label, ks in settings.items()}
    rows.append(f"| head, expected | {' | '.join(f'{ms:.1f} ms' for ms in head.values())} |")
    rows.append(
        f"| step = decoder {decoder_ms:.0f} ms + head | "
        + " | ".join(f"{decoder_ms + ms:.0f} ms ({(decoder_ms + ms) / decoder_ms:.2f}x)" for ms in head.values())
        + " |"
    )
    anchors = ", ".join(f"{name} {ms:.0f} ms" for name, ms in ANCHORS_H200_MS.items())
    tflops, tbs, _ = GPUS[gpu]
    eff = f"{EFFICIENCY['compute']:.0%} of {tflops:.0f} TFLOP/s, {EFFICIENCY['memory']:.0%} of {tbs} TB/s"
    return (
        f"Expected on {gpu} ({eff}), {n} tokens, H={shape['hidden']}, V={shape['vocab']}, bf16:\n\n"
        + "\n".join(rows)
        + f"\n\nMeasured anchors (H200, ratio 0.6): {anchors}."
    )


# The decoder shapes of the sparse backward's table: tokens per step, sequence, hidden, intermediate,
# layers, query heads, key/value heads, vocabulary.
DECODER_SHAPES = {
    "Qwen2.5-0.5B": dict(tokens=8 * 2048, seq=2048, hidden=896, inter=4864, layers=24, heads=14, kv=2, vocab=151936),
    "TinyLlama-1.1B": dict(tokens=8 * 2048, seq=2048, hidden=2048, inter=5632, layers=22, heads=32, kv=4, vocab=32000),
}


def decoder_kernels(shape: dict, kept: int | None, dtype_bytes: int = 2) -> list[Kernel]:
    """One step of the decoder (forward and backward, every layer), with the linear layers' backward over
    ``kept`` rows (the sparse backward) or every row (``None``). Linear matmuls: ``2 N in out`` forward,
    twice that backward (``dx = g W``, ``dW = g^T x``; reading ``g``, ``x`` and ``W``, writing ``dW`` in
    float32). Attention (flash, causal): ``4 N T H / 2`` forward, 2.5x that backward, on every row in both
    modes. The sparse mode adds its row traffic: gathering ``g`` per projection and ``x`` per shared input,
    and a zero-filled ``dx`` per projection with the kept rows copied in."""
    n, t, h, s = shape["tokens"], shape["seq"], shape["hidden"], dtype_bytes
    kv = h // shape["heads"] * shape["kv"]
    inputs = [(h, (h, kv, kv)), (h, (h,)), (h, (shape["inter"], shape["inter"])), (shape["inter"], (h,))]
    k = n if kept is None else kept
    fwd = bwd = traffic = 0.0
    fwd_bytes = bwd_bytes = 0.0
    for d_in, outs in inputs:
        for d_out in outs:
            fwd += 2 * n * d_in * d_out
            fwd_bytes += (n * d_in + d_in * d_out + n * d_out) * s
            bwd += 2 * 2 * k * d_in * d_out
            bwd_bytes += (2 * k * d_out + k * d_in + d_in * d_out) * s + 4 * d_in * d_out
            bwd_bytes += n * d_in * s if kept is None else 0  # dx (the sparse mode's is in its row traffic)
            if kept is not None:  # gather g; zero dx and copy the kept rows in
                traffic += (2 * k * d_out + n * d_in + k * d_in) * s
        if kept is not None:
            traffic += 2 * k * d_in * s  # gather x once for the projections that share it
    attn = 4 * n * t * h / 2
    layers = shape["layers"]
    kernels = [
        Kernel("linear forward", layers * fwd, layers * fwd_bytes),
        Kernel("linear backward", layers * bwd, layers * bwd_bytes),
        Kernel("attention forward + backward", layers * 3.5 * attn, layers * 4 * 4 * n * h * s),
    ]
    if kept is not None:
        kernels.append(Kernel("row gathers and scatters", 0.0, layers * traffic))
    return kernels


def sparse_table(gpu: str = "H200") -> str:
    """Expected decoder step (ms) with the exact and the sparse backward at ratios 0.6 and 0.3, beside the head's
    expected time at that ratio (the same in both modes), on each of :data:`DECODER_SHAPES`."""
    out = [f"Sparse backward, expected on {gpu} (bf16; decoder forward + backward, head from the table above):", ""]
    out += ["| shape | ratio | decoder exact | decoder sparse | head | step sparse / exact |"]
    out += ["|---|---|---:|---:|---:|---:|"]
    for name, shape in DECODER_SHAPES.items():
        exact = sum(k.ms(gpu) for k in decoder_kernels(shape, None))
        for ratio in (0.6, 0.3):
            kept = round(ratio * shape["tokens"])
            sparse = sum(k.ms(gpu) for k in decoder_kernels(shape, kept))
            head = sum(
                k.ms(gpu)
                for k in head_kernels(shape["tokens"], shape["hidden"], shape["vocab"], kept, sms=GPUS[gpu][2])
            )
            ratio_step = (sparse + head) / (exact + head)
            out.append(f"| {name} | {ratio} | {exact:.0f} ms | {sparse:.0f} ms | {head:.0f} ms | {ratio_step:.2f}x |")
    return "\n".join(out)
