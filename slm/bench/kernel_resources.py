"""What the head's Triton kernels need on a GPU, found without one: each kernel compiled ahead of time for a
named target (sm_80: A100; sm_90a: H100/H200; sm_100a: B200 where the installed Triton knows it) in every
autotune config of :data:`slm.head.fused.AUTOTUNE_CONFIGS` (its dtype's family) and every constexpr flag set
the backend can launch, then ``ptxas -v`` (the one in Triton's wheel) reports registers and spill bytes per thread.

A case passes when it compiles, fits the target's shared memory and spills nothing: spills put the hot
loop of a kernel meant to run at matmul speed through local memory. ``python scripts/kernel_compile_check.py``
prints the table and exits non-zero on any failing case. Run with ``TRITON_INTERPRET`` unset (the
interpreter's kernels cannot be compiled).
"""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

from slm.head.fused import AUTOTUNE_CONFIGS

# Shared memory a block may use, per target (bytes): A100 164 KiB, H100/H200 and B200 227 KiB.
SHARED_LIMIT = {80: 164 * 1024, 90: 227 * 1024, 100: 227 * 1024}
ARCHS = {80: "sm_80", 90: "sm_90a", 100: "sm_100a"}
DTYPES = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


@dataclass(frozen=True)
class Case:
    kernel: str  # loss_kernel | grad_kernel
    config: tuple  # (BLOCK_N, BLOCK_V, BLOCK_H, num_warps, num_stages)
    dtype: str  # the compute dtype: bf16 | fp16 | fp32
    flags: tuple  # (name, value) of the constexpr switches besides the blocks
    cc: int  # compute capability: 80 | 90 | 100

    @property
    def label(self) -> str:
        on = [k.lower() for k, v in self.flags if v and k not in ("IEEE", "BF16_OUT")]
        return f"{self.kernel} {self.config} {self.dtype}{' ' + '+'.join(on) if on else ''} {ARCHS[self.cc]}"


@dataclass(frozen=True)
class Result:
    case: Case
    shared: int | None = None
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    error: str | None = None

    @property
    def problem(self) -> str | None:
        if self.error:
            return self.error
        if self.shared > SHARED_LIMIT[self.case.cc]:
            return f"shared memory {self.shared} > {SHARED_LIMIT[self.case.cc]}"
        if self.spill_stores or self.spill_loads:
            return f"spills {self.spill_stores} B stored, {self.spill_loads} B loaded per thread"
        return None


def flag_sets(kernel: str, dtype: str, full: bool) -> list[tuple]:
    """Every constexpr switch combination the backend launches for ``kernel`` in ``dtype`` (``full=False``:
    the default one: no bias, no soft-cap, no hits or entropy)."""
    fixed = {"UPCAST": False, "IEEE": dtype == "fp32"}
    if kernel == "grad_kernel":
        fixed["BF16_OUT"] = False  # rounding by hand is for the interpreter only
    names = ["HAS_BIAS", "SOFTCAP"] + (["HITS", "ENTROPY"] if kernel == "loss_kernel" else [])
    values = itertools.product((False, True), repeat=len(names)) if full else [(False,) * len(names)]
    return [tuple(sorted({**fixed, **dict(zip(names, v))}.items())) for v in values]


def kernel_cases(archs=(90,), dtypes=("bf16",), full: bool = False) -> list[Case]:
    """Every (target, kernel, dtype, flag set, config) to compile: the configs of each dtype's family."""
    family = {"bf16": "16-bit", "fp16": "16-bit", "fp32": "float32"}
    return [
        Case(kernel, config, dtype, flags, cc)
        for cc in archs
        for kernel in ("loss_kernel", "grad_kernel")
        for dtype in dtypes
        for flags in flag_sets(kernel, dtype, full)
        for config in AUTOTUNE_CONFIGS[family[dtype]]
    ]


def _signature(kernel: str, dtype: str) -> dict:
    t = DTYPES[dtype]
    if kernel == "loss_kernel":
        names = "h_ptr w_ptr b_ptr t_ptr loss_ptr lse_ptr hit_ptr ent_ptr".split()
        types = [t, t, "*fp32", "*i64", "*fp32", "*fp32", "*i8", "*fp32"]
        ints = "N V H stride_h stride_w".split()
    else:
        names = "h_ptr w_ptr b_ptr t_ptr lse_ptr rs_ptr g_ptr".split()
        types = [t, t, "*fp32", "*i64", "*fp32", "*fp32", t]
        ints = "N V H stride_h stride_w stride_g v_start v_end".split()
    return {**dict(zip(names, types)), **dict.fromkeys(ints, "i32"), "scale": "fp32", "softcap": "fp32"}


def ptxas() -> str:
    """Triton's own ptxas; its Blackwell build reads the PTX versions newer Tritons write."""
    import triton

    folder = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    for name in ("ptxas-blackwell", "ptxas"):
        if os.path.exists(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise FileNotFoundError(f"no ptxas in {folder}")


def compile_case(case: Case) -> Result:
    """Compile one case for its target and read its resources from ``ptxas -v``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from slm.head import kernels  # Triton's, optional: the rest of slm runs without it

    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("the compile check needs TRITON_INTERPRET unset (interpreted kernels do not compile)")
    n, v, h, warps, stages = case.config
    consts = {**dict(case.flags), "BLOCK_N": n, "BLOCK_V": v, "BLOCK_H": h}
    signature = {**_signature(case.kernel, case.dtype), **dict.fromkeys(consts, "constexpr")}
    try:
        compiled = triton.compile(
            ASTSource(getattr(kernels, case.kernel), signature, consts),
            target=GPUTarget("cuda", case.cc, 32),
            options={"num_warps": warps, "num_stages": stages},
        )
        with tempfile.TemporaryDirectory() as tmp:
            ptx = os.path.join(tmp, "kernel.ptx")
            with open(ptx, "w") as f:
                f.write(compiled.asm["ptx"])
            run = [ptxas(), "-v", f"--gpu-name={ARCHS[case.cc]}", ptx, "-o", os.path.join(tmp, "kernel.cubin")]
            report = subprocess.run(run, capture_output=True, text=True, check=True).stderr
    except Exception as e:  # a compile error is this case's result, not the end of the check
        return Result(case, error=f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else e}")
    number = lambda pattern: int(re.search(pattern, report).group(1))
    return Result(
        case,
        shared=int(compiled.metadata.shared),
        registers=number(r"Used (\d+) registers"),
        spill_stores=number(r"(\d+) bytes spill stores"),
        spill_loads=number(r"(\d+) bytes spill loads"),
    )


def supported_archs() -> list[int]:
    """sm_80 and sm_90a always; sm_100a where this Triton compiles for it."""
    return [80, 90, 100] if compile_case(kernel_cases((100,))[0]).error is None else [80, 90]


def resources_table(results: list[Result]) -> str:
    rows = [
        "| case | shared (KiB) | registers | spill stores (B) | spill loads (B) | result |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        kib = "-" if r.shared is None else f"{r.shared / 1024:.0f}"
        rows.append(
            f"| {r.case.label} | {kib} | {r.registers if r.registers is not None else '-'} | "
            f"{r.spill_stores if r.spill_stores is not None else '-'} | "
            f"{r.spill_loads if r.spill_loads is not None else '-'} | {r.problem or 'ok'} |"
        )
    return "\n".join(rows)
