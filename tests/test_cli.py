"""The `adaattn` command end to end, as a user runs it."""

from __future__ import annotations

import json
from importlib.metadata import entry_points

import pytest
from conftest import run_cli


def test_console_script_is_installed():
    (script,) = entry_points(group="console_scripts", name="adaattn")
    assert script.value == "adaattn_core.cli:main"


def test_info_text():
    result = run_cli("info")
    assert result.returncode == 0, result.stderr
    for word in ("backends", "precisions", "cpu", "policies", "gpu"):
        assert word in result.stdout


def test_info_json():
    result = run_cli("info", "--json")
    info = json.loads(result.stdout)
    assert info["backends"]["cpu"].startswith("available")
    assert set(info["precisions"]) == {"float16", "bfloat16", "float32", "float64", "float8_e4m3"}
    assert {"exact", "quality", "balanced", "speed", "fp8", "lowrank"} <= set(info["policies"])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
def test_run_json_small(dtype):
    result = run_cli("run", "--device", "cpu", "--seq", "200", "--seq-k", "150", "--heads", "4",
                      "--kv-heads", "2", "--dim", "32", "--causal", "--dtype", dtype, "--repeat", "2", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["backend"] == "cpu" and report["policy"] == "exact"
    assert report["decisions"] == {f"dense/{dtype}": [0, 1, 2, 3]}
    assert report["time_ms_median"] > 0 and report["tflops"] > 0
    limit = {"float32": 1e-5, "bfloat16": 1e-2, "float64": 1e-12}[dtype]
    assert report["rel_l2_error_vs_float64"] <= limit


def test_run_default_problem_text():
    """The default job: must print time, TFLOP/s, error and decisions (and finish well within 30 s)."""
    result = run_cli("run", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    for word in ("TFLOP/s", "relative L2", "decision", "dense/float32"):
        assert word in result.stdout


@pytest.mark.parametrize("flag,value,message", [
    ("--seq", "0", "argument --seq: expected an integer >= 1, got 0"),
    ("--kv-heads", "0", "argument --kv-heads: expected an integer >= 1, got 0"),
    ("--seq-k", "-1", "argument --seq-k: expected an integer >= 0, got -1"),
    ("--seed", "-1", "argument --seed: expected an integer >= 0, got -1"),
    ("--dim", "x", "argument --dim: invalid integer >= 1 value: 'x'"),
])
def test_run_rejects_bad_sizes(flag, value, message):
    result = run_cli("run", flag, value)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_run_takes_zero_keys_as_given():
    """--seq-k 0 means no keys (out = 0), not "default to --seq"."""
    result = run_cli("run", "--device", "cpu", "--seq", "16", "--seq-k", "0", "--repeat", "1", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["problem"]["seq_k"] == 0


@pytest.mark.parametrize("flag,value,message", [
    ("--tokens", "0", "argument --tokens: expected an integer >= 1, got 0"),
    ("--warmup", "-1", "argument --warmup: expected an integer >= 0, got -1"),
])
def test_bench_rejects_bad_sizes(flag, value, message):
    result = run_cli("bench", "--device", "cpu", "--quick", "--no-peers", flag, value)
    assert result.returncode == 2 and message in result.stderr


def test_run_reports_validation_errors_cleanly():
    result = run_cli("run", "--device", "cpu", "--heads", "6", "--kv-heads", "4", "--seq", "8")
    assert result.returncode == 2
    assert "q heads (6) must be a multiple of k/v heads (4)" in result.stderr
    assert "Traceback" not in result.stderr
