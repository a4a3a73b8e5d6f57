"""Compile every fused-kernel instantiation the launchers can request with the local nvcc, for each
architecture it runs on (sm_80 and sm_90a for the mma.sync kernels, sm_90a for the wgmma ones), and report
ptxas resources (registers, stack frame, spill bytes) per instantiation.

Exits non-zero on a compile error or warning (in the nvcc build also ptxas's "wgmma serialized" performance notes,
which NVRTC does not report), a missing instantiation, or any local memory (stack or spills) in a
float16/bfloat16 instantiation of head dim 64 or 128, forward and backward alike. The instantiation list comes
from `adaattn_core.launch_config`, the same tables the launchers use.

    python scripts/compile_kernels.py [--json FILE]
    python scripts/compile_kernels.py --nvrtc       # NVRTC instead (what runs on users' GPUs), sm_90a, no GPU
    python scripts/compile_kernels.py --sass        # also disassemble: GMMA counts, the forwards' wait placement

With --sass it also fails when an sm90 kernel has no HGMMA/QGMMA, when a forward waits for its P V ahead of the
softmax's exponentials (`wait_ahead_of_softmax`), or when some sm_90a kernel is missing from the disassembly.

NVRTC differs from nvcc (no <cmath>, so no INFINITY; different default headers), and the kernels only ever
run through NVRTC, so `--nvrtc` compiles every instantiation the way the loader does (its source hashing and
options), from the pip wheels nvidia-cuda-nvrtc (libnvrtc) and nvidia-cuda-runtime (cuda_fp16.h and
cuda_bf16.h), through ctypes: no GPU and no CuPy needed.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from adaattn_core.launch_config import (
    KernelLaunch,
    all_backward_kernels,
    all_forward_kernels,
    all_fp8_kernels,
    all_lowrank_kernels,
)
from adaattn_core.loader import _tagged_source, compile_options, kernel_source_dir

NO_LOCAL_MEMORY_DIMS = (64, 128)
#: The head_dim of a kernel whose head dim is a run-time argument (no template parameter): checked like those above.
ANY_HEAD_DIM = 0
FORWARD_PARAMS = (
    "const {t}* __restrict__, const {t}* __restrict__, const {t}* __restrict__, {t}* __restrict__, "
    "float* __restrict__, " + "long long, " * 12 + "const int* __restrict__, int, int, int, int, int, float"
)
#: Parameter list per kernel function, for explicit instantiation ({t} is the element type).
_IN4 = "const {t}* __restrict__, " * 4
_STATS = "const float* __restrict__, const float* __restrict__, "
PARAMS = {
    "attention_fwd": FORWARD_PARAMS,
    "attention_fwd_sm90_ws": "const __grid_constant__ adaattn::TmaMap, " * 3
    + "{t}* __restrict__, float* __restrict__, " + "long long, " * 3
    + "const int* __restrict__, int, int, int, int, int, int, int, float, int* __restrict__",
    "attention_bwd_preprocess": "const {t}* __restrict__, const {t}* __restrict__, const float* __restrict__, "
    + "float* __restrict__, " * 3 + "long long, " * 9 + "int, int, int, int",
    "attention_bwd_dkdv": _IN4 + _STATS + "{t}* __restrict__, {t}* __restrict__, float* __restrict__, "
    + "long long, " * 18 + "int, int, int, int, int, float, float",
    "attention_bwd_dkdv_sm90": _IN4 + _STATS + "{t}* __restrict__, {t}* __restrict__, float* __restrict__, "
    + "long long, " * 18 + "int, int, int, int, int, float, float",
    "attention_bwd_dq": _IN4 + _STATS + "{t}* __restrict__, " + "long long, " * 15
    + "int, int, int, int, int, float, float",
    "quantize_fp8_stats": "const {t}* __restrict__, const {t}* __restrict__, " + "long long, " * 6
    + "int, int, int, int, int, float* __restrict__, unsigned* __restrict__, float* __restrict__",
    "quantize_fp8_qkv": ("const {t}* __restrict__, " + "long long, " * 3) * 3
    + "const int* __restrict__, int, int, int, int, int, int, const float* __restrict__, "
    + "unsigned char* __restrict__, float* __restrict__, float* __restrict__, "
    + "unsigned char* __restrict__, float* __restrict__, unsigned char* __restrict__",
    "attention_fwd_fp8_sm90": "const __grid_constant__ adaattn::TmaMap, " * 3 + "const float* __restrict__, " * 5
    + "const int* __restrict__, {t}* __restrict__, float* __restrict__, " + "long long, " * 3
    + "int, int, int, int, int, float",
    "attention_bwd_dq_convert": "const float* __restrict__, {t}* __restrict__, " + "long long, " * 3
    + "int, int, int, int, float",
    "lowrank_fwd": "const {t}* __restrict__, " + "long long, " * 3 + "const float* __restrict__, " * 11
    + "const long long* __restrict__, const int* __restrict__, {t}* __restrict__, " + "long long, " * 3
    + "float* __restrict__, " + "int, " * 8 + "float",
    "lowrank_block_landmarks": ("const {t}* __restrict__, " + "long long, " * 3) * 2
    + "const int* __restrict__, const long long* __restrict__, " + "int, " * 5 + "float* __restrict__, " * 6
    + "float* __restrict__",
    "lowrank_segment_landmarks": ("const {t}* __restrict__, " + "long long, " * 3) * 2
    + "const int* __restrict__, const long long* __restrict__, int, int, int, " + "const float* __restrict__, " * 3
    + "float* __restrict__, " * 4 + "float* __restrict__",
}


def all_kernels() -> list[KernelLaunch]:
    return all_forward_kernels() + all_backward_kernels() + all_fp8_kernels() + all_lowrank_kernels()


def instantiation_unit(source: str, kernels: list[KernelLaunch]) -> str:
    """A translation unit that includes `source` and explicitly instantiates the given kernels."""
    lines = [f'#include "{source}"']
    for kernel in kernels:
        function, args = kernel.name.split("<", 1)
        cuda_type = args.rstrip(">").split(",")[0].strip()  # the element type: the first template argument
        lines.append(f"template __global__ void {kernel.name}({PARAMS[function].format(t=cuda_type)});")
    return "\n".join(lines) + "\n"


def compile_unit(nvcc: str, arch: str, unit: Path, cubin: Path | None) -> tuple[int, str]:
    """nvcc with -Xptxas -v; with `cubin`, keep the binary for disassembly."""
    output = ["-cubin", "-o", str(cubin)] if cubin else ["-c", "-o", os.devnull]
    result = subprocess.run(
        [nvcc, "-std=c++17", *output, "-Xptxas", "-v", f"-I{kernel_source_dir()}",
         "-gencode", f"arch=compute_{arch},code=sm_{arch}", str(unit)],
        capture_output=True, text=True,
    )
    return result.returncode, result.stdout + result.stderr


def disassemble(cubin: Path) -> dict[str, list[str]]:
    """SASS lines per kernel (mangled name): cuobjdump -sass, or nvdisasm (e.g. the nvidia-cuda-nvdisasm wheel's,
    named by $NVDISASM) where cuobjdump is not installed."""
    nvdisasm = os.environ.get("NVDISASM") or shutil.which("nvdisasm")
    if shutil.which("cuobjdump"):
        command, header = ["cuobjdump", "-sass", str(cubin)], r"Function : (\S+)"
    elif nvdisasm:
        command, header = [nvdisasm, "-c", str(cubin)], r"^\.text\.(\S+):"
    else:
        raise SystemExit("--sass needs cuobjdump or nvdisasm on PATH (or $NVDISASM: pip download nvidia-cuda-nvdisasm)")
    listing = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    functions: dict[str, list[str]] = {}
    current = None
    for line in listing.splitlines():
        match = re.search(header, line)
        if match:
            current = functions.setdefault(match.group(1), [])
        elif current is not None:
            current.append(line)
    return functions


def wait_ahead_of_softmax(sass: list[str]) -> bool:
    """Whether some exponential comes after a wgmma wait_group 0 that follows a wait_group 1 (before the next
    wait_group 1): the sm90 forwards wait for S (group 1), run the softmax while the previous tile's P V runs, then
    wait for it (group 0), and ptxas once scheduled that second wait ahead of the softmax
    (wgmma_wait_after_softmax in wgmma_sm90.cuh). The first tile's wait_group 0, for S alone, comes before any
    wait_group 1 and is not looked at."""
    events = "".join(("1" if "gsb0, 0x1" in line else "0") if "WARPGROUP.DEPBAR" in line else "e"
                     for line in sass if "WARPGROUP.DEPBAR" in line or "MUFU.EX2" in line)
    return any("e" in segment[segment.find("0"):] for segment in events.split("1")[1:] if "0" in segment)


def _demangled_function(mangled: str) -> str:
    length = re.match(r"_Z(\d+)", mangled)
    start = length.end()
    return mangled[start : start + int(length.group(1))]


def parse_ptxas(log: str, arch: str) -> list[dict]:
    """One row per compiled kernel: function, template arguments and ptxas resource usage."""
    rows, current = [], None
    for line in log.splitlines():
        if "Compiling entry function" in line:
            mangled = line.split("'")[1]
            head_dim = re.search(r"I(?:6__half|13__nv_bfloat16)Li(\d+)E", mangled)
            current = {"arch": f"sm_{arch}", "function": _demangled_function(mangled),
                       "dtype": "float16" if "I6__half" in mangled else "bfloat16",
                       "head_dim": int(head_dim.group(1)) if head_dim else ANY_HEAD_DIM,
                       "causal": re.findall(r"Lb([01])E", mangled)[:1] == ["1"], "kernel": mangled}
        elif current is not None and "bytes stack frame" in line:
            stack, spill_st, spill_ld = (int(n) for n in re.findall(r"(\d+) bytes", line))
            current.update(stack=stack, spill_stores=spill_st, spill_loads=spill_ld)
        elif current is not None and "Used" in line and "registers" in line:
            current["registers"] = int(re.search(r"Used (\d+) registers", line).group(1))
            rows.append(current)
            current = None
    return rows


def nvrtc_toolkit() -> tuple[Path, Path] | None:
    """(libnvrtc, include directory with cuda_fp16.h) from the CUDA 13 pip wheels, or None when absent."""
    spec = importlib.util.find_spec("nvidia")
    for base in (spec.submodule_search_locations or []) if spec else []:
        lib, include = Path(base) / "cu13" / "lib" / "libnvrtc.so.13", Path(base) / "cu13" / "include"
        if lib.exists() and (include / "cuda_fp16.h").exists():
            return lib, include
    return None


def nvrtc_compile(library: Path, include: Path, source: str, kernels: list[KernelLaunch]) -> tuple[int, str]:
    """One NVRTC program per source file, as the loader builds it (hash-tagged source, its options for sm_90a),
    with every instantiation as a name expression; (nvrtcResult, log)."""
    nvrtc = ctypes.CDLL(str(library))
    program = ctypes.c_void_p()
    code = _tagged_source(source).encode()
    created = nvrtc.nvrtcCreateProgram(ctypes.byref(program), code, source.encode(), 0, None, None)
    if created:
        return created, f"nvrtcCreateProgram failed with nvrtcResult {created}"
    try:
        for kernel in kernels:
            added = nvrtc.nvrtcAddNameExpression(program, kernel.name.encode())
            if added:
                return added, f"nvrtcAddNameExpression({kernel.name}) failed with nvrtcResult {added}"
        options = [o.encode() for o in compile_options((9, 0))] + [f"-I{include}".encode()]
        result = nvrtc.nvrtcCompileProgram(program, len(options), (ctypes.c_char_p * len(options))(*options))
        size = ctypes.c_size_t()
        nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        nvrtc.nvrtcGetProgramLog(program, log)
        return result, log.value.decode(errors="replace")
    finally:
        nvrtc.nvrtcDestroyProgram(ctypes.byref(program))


def nvrtc_main() -> int:
    """Compile every instantiation for sm_90a with NVRTC, one program per source file, in parallel."""
    toolkit = nvrtc_toolkit()
    if toolkit is None:
        print("FAIL: no libnvrtc.so.13 with cuda_fp16.h: pip install nvidia-cuda-nvrtc nvidia-cuda-runtime",
              file=sys.stderr)
        return 1
    by_source: dict[str, list[KernelLaunch]] = {}
    for kernel in all_kernels():
        if "90a" in kernel.archs:
            by_source.setdefault(kernel.source, []).append(kernel)
    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:  # ctypes releases the GIL during the compile
        results = dict(zip(by_source, pool.map(lambda src: nvrtc_compile(*toolkit, src, by_source[src]), by_source)))
    failures = [f"{source}: NVRTC result {code}, {len(by_source[source])} instantiations\n{log[-3000:]}"
                for source, (code, log) in results.items() if code != 0 or "warning" in log.lower()]
    for failure in failures:
        print("FAIL:", failure, file=sys.stderr)
    if not failures:
        print(f"OK: NVRTC compiled {sum(map(len, by_source.values()))} instantiations of {len(by_source)} sources")
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nvcc", default=os.environ.get("NVCC", "nvcc"))
    parser.add_argument("--json", help="write the resource table here")
    parser.add_argument("--sass", action="store_true",
                        help="also disassemble the sm_90a builds (cuobjdump, or nvdisasm: $NVDISASM), count "
                             "HGMMA/QGMMA per kernel, check that no forward waits for P V ahead of its softmax")
    parser.add_argument("--nvrtc", action="store_true", help="compile with NVRTC (pip wheels) instead of nvcc")
    args = parser.parse_args()
    if args.nvrtc:
        return nvrtc_main()

    kernels = all_kernels()
    jobs: dict[tuple[str, str], list[KernelLaunch]] = {}
    for kernel in kernels:
        for arch in kernel.archs:
            jobs.setdefault((kernel.source, arch), []).append(kernel)

    failures, rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        units = {}
        for (source, arch), members in jobs.items():
            units[(source, arch)] = Path(tmp) / f"{Path(source).stem}_sm{arch}.cu"
            units[(source, arch)].write_text(instantiation_unit(source, members))
        cubins = {job: units[job].with_suffix(".cubin") if args.sass and job[1] == "90a" else None for job in jobs}
        with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
            results = dict(zip(jobs, pool.map(lambda job: compile_unit(args.nvcc, job[1], units[job], cubins[job]),
                                              jobs)))
        gmma: dict[str, int] = {}  # HGMMA + QGMMA per kernel
        for job, cubin in cubins.items():
            if cubin is not None and results[job][0] == 0:
                for kernel, sass in disassemble(cubin).items():
                    gmma[kernel] = sum(1 for line in sass if re.search(r"\b[HQ]GMMA\b", line))
                    if "attention_fwd_" in kernel and wait_ahead_of_softmax(sass):
                        failures.append(f"{kernel}: the wait for P V sits ahead of the softmax's exponentials")

    for (source, arch), (code, log) in results.items():
        if code != 0:
            failures.append(f"{source} sm_{arch}: nvcc failed\n{log}")
            continue
        # ptxas reports serialised wgmma (C75xx "Potential Performance Loss") as info, not as a warning: every
        # wgmma of the kernel then waits for the one before, a silent 2x slowdown.
        warnings = [line for line in log.splitlines() if "warning" in line.lower() or "Performance Loss" in line]
        if warnings:
            failures.append(f"{source} sm_{arch}: compiler warnings\n" + "\n".join(warnings))
        rows.extend(parse_ptxas(log, arch))
    if args.sass:  # a disassembly that parsed no function would pass every check below
        missing = [row["kernel"] for row in rows if row["arch"] == "sm_90a" and row["kernel"] not in gmma]
        if missing:
            failures.append(f"{len(missing)} sm_90a kernels not found in the disassembly, e.g. {missing[0]}")
    for row in rows:
        if row["arch"] == "sm_90a" and row["kernel"] in gmma:
            row["gmma"] = gmma[row["kernel"]]
            if row["function"].endswith("_sm90") and not row["gmma"]:
                failures.append(f"{row['kernel']}: no HGMMA or QGMMA in its SASS")

    expected = sum(len(members) for members in jobs.values())
    if not failures and len(rows) != expected:
        failures.append(f"expected {expected} kernels, ptxas reported {len(rows)}")
    print(f"{'function':<26}{'arch':<7}{'dtype':<10}{'D':>4} {'causal':<7}{'regs':>5}{'stack':>6}"
          f"{'spill_st':>9}{'spill_ld':>9}{'GMMA':>7}")
    for row in sorted(rows, key=lambda r: (r["function"], r["arch"], r["head_dim"], r["dtype"], r["causal"])):
        print(f"{row['function']:<26}{row['arch']:<7}{row['dtype']:<10}{row['head_dim']:>4} {row['causal']!s:<7}"
              f"{row['registers']:>5}"
              f"{row['stack']:>6}{row['spill_stores']:>9}{row['spill_loads']:>9}{row.get('gmma', ''):>7}")
        local = row["stack"] + row["spill_stores"] + row["spill_loads"]
        if row["head_dim"] in (*NO_LOCAL_MEMORY_DIMS, ANY_HEAD_DIM) and local:
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
