"""Host cost of one Numba CUDA launch on CuPy arrays, by how the arrays are handed over (the probe's and the
head statistics' launches, `estimators._launch`), against a CuPy RawKernel launch of the same empty kernel.

    python scripts/numba_launch_overhead.py [--launches 2000]

Ways, each a kernel with six float32 arrays and two scalars, grid 1, 32 threads, on CuPy's current stream:
  as_cuda_array   cuda.as_cuda_array(a, sync=False) per array (what `_launch` did until 2026-12-04)
  prewrapped      the same wrappers made once, outside the loop: the dispatch alone
  cupy            the CuPy arrays themselves (Numba reads __cuda_array_interface__ and may synchronise)
  cupy-nosync     the same with numba.cuda's CUDA_ARRAY_INTERFACE_SYNC off
  same-stream-per-launch  the interface without its "stream" entry (`_SameStream`), the Numba stream and the
                  launch configuration (`kernel[grid, block, stream]`) made at every launch (`_launch` until
                  session 15)
  same-stream     `estimators._launch` itself: the same with the stream and the configuration kept (`_configured`)
  specialized     a dispatcher specialized once for the argument types (`Dispatcher.specialize`: no type dispatch
                  per launch) on the prewrapped arrays
  specialized-same-stream  that dispatcher on `_SameStream` interfaces made per launch
  rawkernel       cupy.RawKernel, for scale
Prints the median host microseconds per launch over 5 repeats.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from importlib.metadata import version

import cupy
import numpy as np

from adaattn_core.estimators import _cupy_stream, _launch, _numba_cuda, _SameStream

cuda = _numba_cuda()  # with the project's NumPy >= 2.5 shim
from numba import config  # noqa: E402 (after the shim)


@cuda.jit
def empty_kernel(a, b, c, d, e, f, x, n):  # noqa: ANN001 (Numba types the arguments)
    if cuda.threadIdx.x == 0 and n < 0:
        a[0] = b[0] + c[0] + d[0] + e[0] + f[0] + x


RAW = cupy.RawKernel(r"""
extern "C" __global__ void empty_kernel(float* a, const float* b, const float* c, const float* d, const float* e,
                                        const float* f, float x, long long n) {
    if (threadIdx.x == 0 && n < 0) a[0] = b[0] + c[0] + d[0] + e[0] + f[0] + x;
}""", "empty_kernel")


def per_launch_us(launch: Callable[[], None], launches: int) -> float:
    samples = []
    for _ in range(5):
        cupy.cuda.Device().synchronize()
        start = time.perf_counter()
        for _ in range(launches):
            launch()
        cupy.cuda.Device().synchronize()
        samples.append((time.perf_counter() - start) / launches * 1e6)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--launches", type=int, default=2000)
    args = parser.parse_args()
    arrays = [cupy.random.standard_normal(4096, dtype=cupy.float32) for _ in range(6)]
    stream = _cupy_stream()
    x, n = np.float32(1.0), 7

    def as_cuda_array() -> None:
        empty_kernel[1, 32, stream](*(cuda.as_cuda_array(a, sync=False) for a in arrays), x, n)

    wrapped = [cuda.as_cuda_array(a, sync=False) for a in arrays]

    def prewrapped() -> None:
        empty_kernel[1, 32, stream](*wrapped, x, n)

    def direct() -> None:
        empty_kernel[1, 32, stream](*arrays, x, n)

    def same_stream() -> None:
        _launch(empty_kernel, 1, 32, *arrays, x, n)

    def same_stream_per_launch() -> None:
        empty_kernel[1, 32, cuda.external_stream(cupy.cuda.get_current_stream().ptr)](
            *(_SameStream(a) for a in arrays), x, n)

    specialized = empty_kernel.specialize(*wrapped, x, n)

    def specialized_prewrapped() -> None:
        specialized[1, 32, stream](*wrapped, x, n)

    def specialized_same_stream() -> None:
        specialized[1, 32, stream](*(_SameStream(a) for a in arrays), x, n)

    def raw() -> None:
        RAW((1,), (32,), (*arrays, x, np.int64(n)))

    ways = {"as_cuda_array": as_cuda_array, "prewrapped": prewrapped, "cupy": direct,
            "same-stream-per-launch": same_stream_per_launch, "same-stream": same_stream,
            "specialized": specialized_prewrapped, "specialized-same-stream": specialized_same_stream}
    for launch in (*ways.values(), raw):  # compile and warm up
        launch()
    results = {name: per_launch_us(launch, args.launches) for name, launch in ways.items()}
    config.CUDA_ARRAY_INTERFACE_SYNC = False
    results["cupy-nosync"] = per_launch_us(direct, args.launches)
    results["rawkernel"] = per_launch_us(raw, args.launches)
    print(f"numba-cuda {version('numba-cuda')}, CuPy {cupy.__version__}, "
          f"{cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}")
    for name, us in results.items():
        print(f"{name:>24}: {us:7.1f} us per launch")


if __name__ == "__main__":
    main()
