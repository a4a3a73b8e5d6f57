"""The blocked CPU backend (NumPy), forward and backward, on small float32 problems: time and error."""

from __future__ import annotations

import numpy as np

from adaattn_core import attention, attention_backward, attention_backward_reference, attention_reference, bench

PARAMS = [[256, 1024], [64], [False, True]]
PARAM_NAMES = ["seq", "dim", "causal"]
BATCH, HEADS = 1, 4


def _inputs(seq: int, dim: int, causal: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    case = bench.Case(seq=seq, dim=dim, causal=causal, batch=BATCH, heads=HEADS, dtype="float32")
    (qkv,) = bench.make_input_sets(case, "cpu", sets=1, seed=bench.case_seed(case))
    return qkv


class CpuForward:
    params = PARAMS
    param_names = PARAM_NAMES

    def setup(self, seq: int, dim: int, causal: bool) -> None:
        self.q, self.k, self.v = _inputs(seq, dim, causal)
        self.out = np.empty_like(self.q)

    def time_forward(self, seq: int, dim: int, causal: bool) -> None:
        attention(self.q, self.k, self.v, causal=causal, out=self.out)

    def track_rel_l2_vs_float64(self, seq: int, dim: int, causal: bool) -> float:
        out = attention(self.q, self.k, self.v, causal=causal)
        ref, _ = attention_reference(self.q, self.k, self.v, causal=causal)
        return bench.rel_l2(bench.to_host64(out), ref)

    track_rel_l2_vs_float64.unit = "relative L2 error"  # type: ignore[attr-defined]


class CpuBackward:
    params = PARAMS
    param_names = PARAM_NAMES

    def setup(self, seq: int, dim: int, causal: bool) -> None:
        self.q, self.k, self.v = _inputs(seq, dim, causal)
        self.dout = np.random.default_rng(seq + dim).standard_normal(self.q.shape, dtype=np.float32)
        self.out, self.lse = attention(self.q, self.k, self.v, causal=causal, return_lse=True)

    def time_backward(self, seq: int, dim: int, causal: bool) -> None:
        attention_backward(self.dout, self.q, self.k, self.v, self.out, self.lse, causal=causal)

    def track_rel_l2_vs_float64(self, seq: int, dim: int, causal: bool) -> float:
        """Error of (dq, dk, dv) together against the float64 textbook gradients."""
        grads = attention_backward(self.dout, self.q, self.k, self.v, self.out, self.lse, causal=causal)
        refs = attention_backward_reference(self.dout, self.q, self.k, self.v, causal=causal)
        flat = np.concatenate([bench.to_host64(g).ravel() for g in grads])
        flat_ref = np.concatenate([np.asarray(r).ravel() for r in refs])
        return bench.rel_l2(flat, flat_ref)

    track_rel_l2_vs_float64.unit = "relative L2 error"  # type: ignore[attr-defined]
