"""AdaAttn's airspeed-velocity (asv) suite: performance and accuracy history, commit by commit.

Modules (each class is one page of graphs in `asv publish`'s HTML):

- `forward_gpu`: the fused forward (GPU, bf16; B·S = 16k tokens, H·D = 2048; S × D × causal):
  ``Forward.track_ms`` (median CUDA-event milliseconds: the regression signal), ``Forward.track_tflops``
  (TFLOP/s, for the graphs) and ``ForwardError.track_rel_l2_vs_float64``.
- `peers_gpu`: torch SDPA's flash (FA2) and cuDNN backends on the same problems (``track_tflops``), so
  the history shows them beside us.
- `cpu`: the blocked CPU backend's forward and backward on small problems (``time_*``, error tracks).

GPU timing: inputs and a warm call (which compiles or loads the kernel from CuPy's disk cache) in
``setup``, then a few warm-up calls; the track runs `REPEAT` calls timed with CUDA events on CuPy's
current stream and returns the median (`adaattn_core.bench`). GPU classes raise NotImplementedError
in ``setup`` without a GPU (asv then records them as skipped).

asv 0.6.6 treats larger values as worse and has no per-benchmark direction, so ``track_tflops`` is left
out of regression detection (``regressions_first_commits`` in asv.conf.json) and ``track_ms`` carries
the regressions; ``asv compare`` shows a TFLOP/s gain with asv's "worse" sign: read it as a gain.

Run on a GPU machine (machine name = the GPU, e.g. ``h200``; results go to asv_benchmarks/results/):

    asv machine --yes --machine h200
    asv run --python=same --launch-method spawn --machine h200 --set-commit-hash HEAD
    asv publish && asv preview
"""
