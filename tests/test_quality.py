"""Tests of the quality harness (benchmarks/quality). CPU: the whole pipeline at a tiny size, AdaAttn's exact
path against torch SDPA on the same weights, the activation file's round trip. GPU: the exact path on the
captured activations of the trained model, when `python3 -m benchmarks.quality.run` has written them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_close_to_naive, naive_same_dtype

torch = pytest.importorskip("torch")
pytest.importorskip("ml_dtypes")

import adaattn_core  # noqa: E402
from benchmarks.quality import default_activations_path, load_activations  # noqa: E402
from benchmarks.quality.activations import capture_qkv, save_activations  # noqa: E402
from benchmarks.quality.evaluate import policy_names  # noqa: E402
from benchmarks.quality.model import GPT, GPTConfig  # noqa: E402
from benchmarks.quality.run import main  # noqa: E402
from benchmarks.quality.table import table  # noqa: E402

TINY = GPTConfig(layers=2, d_model=32, heads=2, context=32)


def test_pipeline_smoke(tmp_path: Path) -> None:
    acts = tmp_path / "acts.npz"
    assert main(["--out", str(tmp_path), "--device", "cpu", "--steps", "3", "--layers", "1", "--context", "32",
                 "--d-model", "32", "--heads", "2", "--batch", "2", "--eval-tokens", "64",
                 "--activations", str(acts)]) == 0
    results = json.loads((tmp_path / "quality.json").read_text())
    assert (tmp_path / "quality-curves.png").stat().st_size > 0
    assert [run["backend"] for run in results["runs"]] == ["sdpa", "adaattn", "sdpa"]
    for run in results["runs"]:
        assert len(run["losses"]) == 3 and all(np.isfinite(run["losses"]))
    assert results["agreement"]["agree"] is not None
    rows = results["eval"]["rows"]
    assert [(row["policy"], row["seq"]) for row in rows] == [(p, s) for p in policy_names() for s in (32, 64)]
    exact = [row for row in rows if row["policy"] == "exact"]
    assert all(np.isfinite(row["ppl"]) and row["rel_change"] == 0.0 for row in exact)
    heads = results["eval"]["heads"]["exact"]["32"]["0"]
    assert heads["decisions"] == ["dense/float32"] * 2
    assert max(heads["rel_l2"]) < 1e-5 and min(heads["cosine"]) > 1 - 1e-9
    assert len(results["eval"]["entropy"]["64"]["0"]) == 2
    assert load_activations(acts)["meta"]["seqs"] == [32, 64]
    assert "| exact | 32 |" in table(tmp_path / "quality.json")


def test_adaattn_exact_matches_sdpa_forward_backward() -> None:
    torch.manual_seed(0)
    model = GPT(TINY)
    tokens = torch.randint(0, TINY.vocab, (2, TINY.context + 1))
    results = {}
    for backend in ("sdpa", "adaattn"):
        model.zero_grad()
        model.set_attention(backend)
        loss = model.loss(tokens)
        loss.backward()
        results[backend] = (loss.detach(), [p.grad.clone() for p in model.parameters()])
    (loss_s, grads_s), (loss_a, grads_a) = results["sdpa"], results["adaattn"]
    torch.testing.assert_close(loss_a, loss_s, rtol=1e-6, atol=1e-6)
    for grad_a, grad_s in zip(grads_a, grads_s):
        assert float((grad_a - grad_s).norm() / grad_s.norm()) < 1e-5


def test_activations_round_trip(tmp_path: Path) -> None:
    import ml_dtypes

    torch.manual_seed(0)
    model = GPT(TINY)
    model.set_attention("adaattn")
    captured = capture_qkv(model, torch.randint(0, TINY.vocab, (1, TINY.context)), torch.no_grad())
    assert sorted(captured) == [0, 1] and captured[0][0].shape == (1, TINY.heads, TINY.context, TINY.head_dim)
    path = save_activations(tmp_path / "a.npz", {TINY.context: captured}, [1], {"note": "test"})
    loaded = load_activations(path)
    assert loaded["meta"]["note"] == "test" and loaded["meta"]["layers"] == [1]
    entry = loaded["tensors"][f"layer1/seq{TINY.context}"]
    for name, original in zip("qkv", captured[1]):
        assert entry[name].dtype == ml_dtypes.bfloat16
        expected = original.to(torch.bfloat16).float().numpy()
        np.testing.assert_array_equal(entry[name].astype(np.float32), expected)
    with pytest.raises(FileNotFoundError):
        load_activations(tmp_path / "missing.npz")


@pytest.mark.gpu
def test_exact_on_real_activations() -> None:
    """Flash-attention's accuracy rule (`conftest.assert_close_to_naive`) on a trained model's q, k, v."""
    path = default_activations_path()
    if not path.is_file():
        pytest.skip(f"no activation file at {path} (python3 -m benchmarks.quality.run writes it)")
    cupy = pytest.importorskip("cupy")
    for name, qkv in load_activations(path)["tensors"].items():
        q, k, v = (cupy.asarray(qkv[x].astype(np.float32)).astype("bfloat16") for x in "qkv")
        out = adaattn_core.attention(q, k, v, causal=True)
        ref, _ = adaattn_core.attention_reference(q, k, v, causal=True)
        assert_close_to_naive(out, ref, naive_same_dtype(q, k, v, causal=True, layout="bhsd"), what=name)
