"""Compile the triton head backend's kernels for real GPU targets on any machine (no GPU needed) and report
shared memory, registers and spill bytes per case: every kernel x autotune config x constexpr flag set.

    python scripts/kernel_compile_check.py                  # default flags, bf16, sm_80 and sm_90a (what CI runs)
    python scripts/kernel_compile_check.py --full           # every flag set and dtype, every target this Triton has
    python scripts/kernel_compile_check.py --full --arch 80 --arch 90 --dtype bf16 --dtype fp32   # the slow test

Exits 1 when any case fails to compile, exceeds the target's shared memory or spills.
"""

import argparse
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # interpreted kernels cannot be compiled
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's own default, said explicitly (no warning)

from slm.bench.kernel_resources import ARCHS, compile_case, kernel_cases, resources_table, supported_archs  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="every flag set, every dtype, every target this Triton has")
    p.add_argument("--arch", type=int, action="append", help="compute capability: 80, 90, 100 (repeatable)")
    p.add_argument("--dtype", action="append", choices=("bf16", "fp16", "fp32"), help="compute dtypes (repeatable)")
    p.add_argument("--out", help="also write the resources_table (Markdown) here")
    args = p.parse_args(argv)
    archs = args.arch or (supported_archs() if args.full else [80, 90])
    dtypes = tuple(args.dtype or (("bf16", "fp16", "fp32") if args.full else ("bf16",)))
    todo = kernel_cases(tuple(archs), dtypes, full=args.full)
    print(f"kernel compile check: {len(todo)} kernel_cases ({', '.join(ARCHS[a] for a in archs)})", flush=True)
    results = []
    for i, case in enumerate(todo, 1):
        results.append(compile_case(case))
        if results[-1].problem:
            print(f"  [{i}/{len(todo)}] {case.label}: {results[-1].problem}", flush=True)
    text = resources_table(results)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    failed = [r for r in results if r.problem]
    print(
        f"\n{len(results) - len(failed)} of {len(results)} kernel_cases compile within shared memory and spill nothing"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
