"""Compile every fused-kernel instantiation the launcher can request with the local nvcc, for sm_80 and
sm_90a, and report ptxas resources (registers, stack frame, spill bytes) per instantiation.

Exits non-zero on a compile error or warning, a missing instantiation, or any local memory (stack or
spills) in a float16/bfloat16 instantiation of head dim 64 or 128. The instantiation list comes from
`adaattn_core.launch_config`, the same table the launcher uses.

    python scripts/compile_kernels.py [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from adaattn_core.launch_config import all_forward_instantiations
from adaattn_core.loader import kernel_source_dir

ARCHS = ("80", "90a")
NO_LOCAL_MEMORY_DIMS = (64, 128)
FORWARD_PARAMS = (
    "const {t}* __restrict__, const {t}* __restrict__, const {t}* __restrict__, {t}* __restrict__, "
    "float* __restrict__, " + "long long, " * 12 + "int, int, int, int, float"
)
_TEMPLATE_ARGS = re.compile(r"attention_fwdI(?:6__half|13__nv_bfloat16)Li(\d+)E")


def instantiation_unit() -> str:
    """A translation unit that includes the kernel and explicitly instantiates every configuration."""
    lines = ['#include "attention_fwd.cu"']
    for _, _, _, name in all_forward_instantiations():
        cuda_type = name.split("<")[1].split(",")[0]
        lines.append(f"template __global__ void {name}({FORWARD_PARAMS.format(t=cuda_type)});")
    return "\n".join(lines) + "\n"


def compile_arch(nvcc: str, arch: str, unit: Path) -> tuple[str, int, str]:
    result = subprocess.run(
        [nvcc, "-std=c++17", "-c", "-Xptxas", "-v", f"-I{kernel_source_dir()}",
         "-gencode", f"arch=compute_{arch},code=sm_{arch}", str(unit), "-o", os.devnull],
        capture_output=True, text=True,
    )
    return arch, result.returncode, result.stdout + result.stderr


def parse_ptxas(log: str, arch: str) -> list[dict]:
    """One row per compiled kernel: template arguments and ptxas resource usage."""
    rows, current = [], None
    for line in log.splitlines():
        if "Compiling entry function" in line:
            mangled = line.split("'")[1]
            current = {"arch": f"sm_{arch}", "dtype": "float16" if "6__half" in mangled else "bfloat16",
                       "head_dim": int(_TEMPLATE_ARGS.search(mangled).group(1)),
                       "causal": "Lb1E" in mangled, "kernel": mangled}
        elif current is not None and "bytes stack frame" in line:
            stack, spill_st, spill_ld = (int(n) for n in re.findall(r"(\d+) bytes", line))
            current.update(stack=stack, spill_stores=spill_st, spill_loads=spill_ld)
        elif current is not None and "Used" in line and "registers" in line:
            current["registers"] = int(re.search(r"Used (\d+) registers", line).group(1))
            rows.append(current)
            current = None
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nvcc", default=os.environ.get("NVCC", "nvcc"))
    parser.add_argument("--json", help="write the resource table here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        unit = Path(tmp) / "instantiate.cu"
        unit.write_text(instantiation_unit())
        with ThreadPoolExecutor(len(ARCHS)) as pool:
            results = list(pool.map(lambda a: compile_arch(args.nvcc, a, unit), ARCHS))

    failures, rows = [], []
    for arch, code, log in results:
        if code != 0:
            failures.append(f"sm_{arch}: nvcc failed\n{log}")
            continue
        warnings = [line for line in log.splitlines() if "warning" in line.lower()]
        if warnings:
            failures.append(f"sm_{arch}: compiler warnings\n" + "\n".join(warnings))
        rows.extend(parse_ptxas(log, arch))

    expected = len(all_forward_instantiations()) * len(ARCHS)
    if not failures and len(rows) != expected:
        failures.append(f"expected {expected} kernels, ptxas reported {len(rows)}")
    print(f"{'arch':<7}{'dtype':<10}{'D':>4} {'causal':<7}{'regs':>5}{'stack':>6}{'spill_st':>9}{'spill_ld':>9}")
    for row in sorted(rows, key=lambda r: (r["arch"], r["head_dim"], r["dtype"], r["causal"])):
        print(f"{row['arch']:<7}{row['dtype']:<10}{row['head_dim']:>4} {row['causal']!s:<7}{row['registers']:>5}"
              f"{row['stack']:>6}{row['spill_stores']:>9}{row['spill_loads']:>9}")
        local = row["stack"] + row["spill_stores"] + row["spill_loads"]
        if row["head_dim"] in NO_LOCAL_MEMORY_DIMS and local:
            failures.append(f"{row['kernel']} ({row['arch']}) uses local memory: {local} bytes")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    for failure in failures:
        print("FAIL:", failure, file=sys.stderr)
    if not failures:
        print(f"OK: {len(rows)} kernels, no local memory at head dims {NO_LOCAL_MEMORY_DIMS}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
