"""Benchmark mechanics (`adaattn_core.bench`), `adaattn bench` end to end on the CPU, and the asv suite."""

from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.util
import inspect
import itertools
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli

from adaattn_core import bench

ROOT = Path(__file__).resolve().parents[1]
H200_RESULTS = ROOT / "benchmarks/results/2026-11-22-H200-fwd.json"
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
HAVE_ASV = importlib.util.find_spec("asv") is not None


def test_import_pulls_in_no_framework_or_plotting():
    code = ("import sys, adaattn_core.bench; "
            "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'cupy', 'jax', 'matplotlib', 'tqdm'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_flops_match_committed_results():
    assert bench.forward_flops(2, 3, 5, 7, 11, causal=False) == 4 * 2 * 3 * 5 * 7 * 11
    assert bench.forward_flops(2, 3, 5, 7, 11, causal=True) == 2 * 2 * 3 * 5 * 7 * 11
    for row in json.loads(H200_RESULTS.read_text())["rows"]:
        case = bench.Case(row["seq"], row["dim"], row["causal"], row["batch"], row["heads"], "bfloat16")
        for name, ms in row["ms"].items():
            assert bench.tflops(case.flops, ms) == pytest.approx(row["tflops"][name], rel=1e-12)


def test_input_sets_together_exceed_the_cache():
    assert bench.input_set_count(set_bytes=200 << 20, cache=50 << 20) == 2
    count = bench.input_set_count(set_bytes=3 << 20, cache=50 << 20)
    assert (count - 1) * (3 << 20) >= 50 << 20
    assert bench.input_set_count(set_bytes=1, cache=1 << 30) == bench.MAX_INPUT_SETS


def test_time_calls_warms_up_then_times_each_call():
    seen: list[int] = []
    times = bench.time_calls(seen.append, warmup=2, repeat=3, device="cpu")
    assert seen == [0, 1, 2, 3, 4] and len(times) == 3 and all(t >= 0 for t in times)
    with pytest.raises(ValueError, match="repeat"):
        bench.time_calls(seen.append, warmup=0, repeat=0, device="cpu")


def test_time_interleaved_takes_turns_after_each_warms_up():
    seen: list[tuple[str, int]] = []
    fns = {name: (lambda i, name=name: seen.append((name, i))) for name in ("a", "b")}
    times = bench.time_interleaved(fns, warmup=2, repeat=3, device="cpu")
    assert seen == [("a", 0), ("a", 1), ("b", 0), ("b", 1), ("a", 2), ("b", 3), ("a", 4), ("b", 5), ("a", 6), ("b", 7)]
    assert sorted(times) == ["a", "b"] and all(len(v) == 3 and min(v) >= 0 for v in times.values())
    with pytest.raises(ValueError, match="repeat must be >= 1, got 0"):
        bench.time_interleaved(fns, warmup=0, repeat=0, device="cpu")


def test_sweep_config_shapes_follow_tokens_and_hidden():
    config = bench.SweepConfig.defaults("gpu")
    assert config.setup_text() == "B*S=16384, H*D=2048, bf16, [B,H,S,D]"
    case = config.case(4096, 128, True, "bfloat16")
    assert (case.batch, case.heads) == (4, 16)
    assert [(c.dim, c.causal, c.seq) for c in config.cases()][:7] == (
        [(64, False, s) for s in (512, 1024, 2048, 4096, 8192, 16384)] + [(64, True, 512)])


def test_run_case_cpu_records_times_errors_and_failing_peers():
    broken = bench.Peer("broken", "Broken", lambda device, dtype: None,
                        lambda sets, causal: (lambda i: (_ for _ in ()).throw(RuntimeError("no such shape"))))
    absent = bench.Peer("absent", "Absent", lambda device, dtype: "not installed", lambda sets, causal: None)
    case = bench.Case(seq=48, dim=16, causal=True, batch=2, heads=2, dtype="float32")
    row = bench.run_case(case, device="cpu", peers=[broken, absent], warmup=1, repeat=2, seed=1)
    assert row["ms"]["adaattn"] > 0 and row["tflops"]["adaattn"] > 0
    assert row["backend"] == {"adaattn": "cpu"}
    assert row["rel_l2_vs_float64"]["adaattn"] < 1e-5
    assert row["tflops"]["broken"] is None and "no such shape" in row["unsupported"]["broken"]
    assert row["unsupported"]["absent"] == "not installed" and "absent" not in row["tflops"]
    assert row["ratio"] == {"broken": None}


def test_run_case_times_extra_implementations_without_ratio_or_error():
    case = bench.Case(seq=32, dim=16, causal=False, batch=1, heads=2, dtype="float32")
    calls: list[int] = []
    row = bench.run_case(case, device="cpu", warmup=0, repeat=3, seed=2, extra={"piece": calls.append})
    assert len(calls) == 3 and row["ms"]["piece"] >= 0 and row["tflops"]["piece"] is not None
    assert "piece" not in row["ratio"] and "piece" not in row["rel_l2_vs_float64"] and "timing" not in row


def test_run_case_times_alone_when_one_fails_past_its_first_call():
    """An implementation that runs once and then fails (e.g. out of memory under load) is recorded under
    unsupported; the others still get times, taken one implementation after the other."""
    def flaky(sets, causal):
        def call(i):
            if i > 0:
                raise MemoryError("out of memory")
        return call

    peer = bench.Peer("flaky", "Flaky", lambda device, dtype: None, flaky)
    case = bench.Case(seq=32, dim=16, causal=False, batch=1, heads=2, dtype="float32")
    row = bench.run_case(case, device="cpu", peers=[peer], warmup=1, repeat=2, seed=3)
    assert row["tflops"]["flaky"] is None and "out of memory" in row["unsupported"]["flaky"]
    assert row["ms"]["adaattn"] > 0 and row["timing"] == "blocks" and row["ratio"] == {"flaky": None}
    assert "flaky" not in row["rel_l2_vs_float64"]


def test_float64_error_uses_the_last_rows_with_bottom_right_causal_alignment(rng):
    q, k, v = (rng.standard_normal((1, 1, 40, 8)) for _ in range(3))
    from adaattn_core import attention_reference

    out, _ = attention_reference(q, k, v, causal=True)
    assert bench.float64_error(out, q, k, v, causal=True, rows=7) < 1e-15
    assert bench.float64_error(out[..., ::-1, :], q, k, v, causal=True, rows=7) > 0.1


def test_resolve_peers():
    assert bench.resolve_peers(False, "cpu", ["float32"]) == ([], {})
    chosen, skipped = bench.resolve_peers(["torch-flash"], "cpu", ["float32"])
    assert chosen == [] and skipped == {"torch-flash": "GPU only"}
    with pytest.raises(ValueError, match="unknown peer"):
        bench.resolve_peers(["nope"], "cpu", ["float32"])


def test_environment_cpu():
    env = bench.environment("cpu")
    assert env["device"] == "cpu" and env["gpu"] is None
    assert {"date", "python", "numpy", "adaattn", "cpu", "platform"} <= env.keys()
    assert "timing" not in env and bench.environment("cpu", timing=bench.TIMING)["timing"] == "turns"
    json.dumps(env)


@pytest.mark.parametrize("timing", [None, "turns"])
def test_readme_table_caption_says_how_the_file_was_timed(tmp_path, timing):
    from benchmarks.readme_table import table

    env = _ENV if timing is None else {**_ENV, "timing": timing}
    row = {"seq": 4096, "dim": 128, "causal": False, "tflops": {"adaattn": 1.0}, "ms": {"adaattn": 1.0}, "ratio": {}}
    path = tmp_path / "fwd.json"
    path.write_text(json.dumps({"env": env, "setup": "setup", "rows": [row]}))
    assert ("implementations timed in turns" in table(path)) == (timing == "turns")


def test_table_of_committed_results():
    results = json.loads(H200_RESULTS.read_text())
    text = bench.format_table(results)
    lines = text.splitlines()
    first = results["rows"][0]
    assert "NVIDIA H200" in lines[0]
    assert lines[1].split()[:8] == ["D", "S", "causal", "dtype", "adaattn", "torch-flash", "torch-cudnn",
                                    "torch-efficient"]
    assert len([line for line in lines if re.match(r"\s*\d+\s+\d+\s+(yes|no)\s", line)]) == 36
    assert lines[2].split()[:5] == [str(first["dim"]), str(first["seq"]), "yes" if first["causal"] else "no", "bf16",
                                    f"{first['tflops']['adaattn']:.1f}"]
    assert lines[2].split()[-1] == f"{first['rel_l2_vs_torch_flash']:.1e}"


@pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="matplotlib comes with the `bench` and `test` extras")
def test_plot_from_committed_results(tmp_path):
    png = bench.plot_results(H200_RESULTS, tmp_path / "fwd.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    assert (ROOT / "benchmarks/results/2026-11-22-H200-fwd.png").is_file()


@pytest.mark.skipif(not HAVE_MATPLOTLIB, reason="matplotlib comes with the `bench` and `test` extras")
def test_module_entry_point_plots_a_results_file(tmp_path, capsys):
    assert bench.main([str(H200_RESULTS), "--png", str(tmp_path / "x.png")]) == 0
    assert (tmp_path / "x.png").read_bytes()[:4] == b"\x89PNG"
    assert "NVIDIA H200" in capsys.readouterr().out


def test_benchmark_scripts_import_only_names_their_siblings_define():
    """The benchmark scripts import shared pieces from sibling modules (`_common.py`); their GPU paths cannot
    run here, so this reads the sources."""
    folder = ROOT / "benchmarks"
    siblings = {path.stem for path in folder.glob("*.py")}
    imported = {
        (script.name, node.module, alias.name)
        for script in folder.glob("bench_*.py")
        for node in ast.walk(ast.parse(script.read_text()))
        if isinstance(node, ast.ImportFrom) and node.module in siblings
        for alias in node.names
    }
    assert {script for script, _, _ in imported} == {p.name for p in folder.glob("bench_*.py")}
    missing = []
    for script, module, name in sorted(imported):
        tree = ast.parse((folder / f"{module}.py").read_text())
        defined = {node.name for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
        defined |= {target.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
                    for target in ast.walk(node) if isinstance(target, ast.Name)}
        if name not in defined:
            missing.append((script, module, name))
    assert not missing, f"imported from a sibling module but not defined there: {missing}"


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    """benchmarks/SCRIPT ARGS in a subprocess, output captured as text. pyproject's pytest pythonpath does not
    reach a subprocess, so without an editable install the script needs the checkout on its path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True,
                          text=True, timeout=120, env=env)


@pytest.mark.parametrize("script", ["bench_forward", "bench_backward", "bench_fp8", "bench_rank"])
def test_benchmark_scripts_answer_help_without_a_gpu(script):
    if script == "bench_backward":
        pytest.importorskip("torch")  # its autograd peers are torch functions
    result = run_script(f"{script}.py", "--help")
    assert result.returncode == 0, result.stderr
    missing = [option for option in ("--seqs", "--dims", "--warmup", "--repeat", "--out")
               if option not in result.stdout]
    assert not missing, f"{script} --help lacks {missing}"


def test_format_number_pads_missing_values_to_the_spec_width():
    assert bench.format_number(3.14159, "6.2f") == "  3.14"
    assert bench.format_number(None, "6.2f") == "   n/a"
    assert bench.format_number(None, ".1e") == "n/a"
    assert bench.format_number(None, "15.2f") == "n/a".rjust(15)


def test_paper_case_and_input_sets_with_dout():
    case = bench.paper_case(4096, 128, True)
    assert (case.batch, case.heads, case.dtype) == (4, 16, "bfloat16")
    cases = [bench.paper_case(seq, dim, causal)
             for seq in (1024, 4096) for dim in (64, 128) for causal in (False, True)]
    seeds = [bench.case_seed(c) for c in cases]
    assert len(set(seeds)) == len(cases), seeds  # a different draw for every (S, D, causal)
    # The same one on every run and across versions: the committed results were drawn with these seeds (4k,
    # D = 128, causal here).
    assert bench.case_seed(bench.paper_case(4096, 128, True)) == 4_096_257
    small = bench.Case(seq=8, dim=4, causal=False, batch=1, heads=2, dtype="float32")
    sets = bench.make_input_sets(small, "cpu", sets=3, seed=0, arrays=4)
    assert len(sets) == 3, f"{len(sets)} sets"
    assert [len(s) for s in sets] == [4, 4, 4]
    assert all(x.shape == small.shape for s in sets for x in s)
    # the first three arrays are the q, k, v that the default draws from the same seed
    qkv = bench.make_input_sets(small, "cpu", sets=1, seed=0)[0]
    for name, default, with_dout in zip("qkv", qkv, sets[0][:3]):
        assert np.array_equal(default, with_dout), name


_ENV = {"gpu": "NVIDIA H200", "driver": "570.1", "torch": "2.6", "cupy": "13.4", "date": "2026-11-22T00:00:00"}
_FAILED = {"seq": 16384, "dim": 128, "causal": True, "error": "OutOfMemoryError: out of memory | 2 GiB"}


@pytest.mark.parametrize("kind", ["fwd", "fp8", "rank"])
def test_readme_table_renders_failed_rows(tmp_path, kind):
    """A row that carries an error instead of timings (or has no timings at all) becomes a visible
    "failed: <reason>" line of the right width instead of a KeyError; missing numbers are "n/a"."""
    from benchmarks.readme_table import table

    tflops = {"adaattn": 400.0, "torch-flash": 300.0, "torch-cudnn": None}  # cuDNN failed on this shape: n/a
    ok: dict = {"seq": 4096, "dim": 128, "causal": False, "tflops": tflops, "ms": {"adaattn": 1.0},
                "ratio": {"torch-flash": 4 / 3, "torch-cudnn": None}}
    failed = dict(_FAILED)
    # as the scripts write a row no implementation could run: every timing None
    unsupported = {"seq": 8192, "dim": 128, "causal": False, "tflops": {"adaattn": None}, "ms": {"adaattn": None},
                   "unsupported": {"adaattn": "RuntimeError: no kernel"}}
    if kind == "fp8":
        ok.update(tflops={**tflops, "adaattn[fp8]": 600.0}, fp8_speedup={"adaattn": 1.5, "torch-cudnn": 1.7},
                  rel_l2_vs_float64={"adaattn[fp8]": 0.02})  # no "fp8-quantize" time: n/a
        ok["ms"] = {"adaattn": 1.0, "adaattn[fp8]": 0.7}
    elif kind == "rank":
        ok = {"kind": "mixed", "seq": 8192, "dim": 128, "causal": False, "heads": 16, "lowrank_heads": 4,
              "ms": {"dense": 2.0, "lowrank": 1.0, "plan": 0.1}, "speedup_vs_dense": 2.0,
              "rel_l2_vs_float64_max": {"lowrank": 0.01}}
        failed = {"kind": "peaked", **_FAILED}
        unsupported = {**unsupported, "kind": "diffuse"}
    path = tmp_path / f"{kind}.json"
    path.write_text(json.dumps({"env": _ENV, "setup": "B*S=16384, H*D=2048, bf16, [B,H,S,D]",
                                "rows": [failed, ok, unsupported]}))
    lines = table(path).splitlines()
    header, rows = lines[2], lines[4:]
    assert len(rows) == 3
    width = header.count(" | ")
    assert all(line.count(" | ") == width for line in rows), lines  # the "|" in the reason is escaped
    assert "| 16384 | yes | failed: OutOfMemoryError: out of memory \\| 2 GiB |" in rows[0]
    assert "failed: adaattn: RuntimeError: no kernel" in rows[2]
    assert "failed" not in rows[1] and "n/a" in rows[1]


def test_sweep_records_a_failed_configuration_and_goes_on(monkeypatch, capsys):
    """A configuration that raises becomes an "error" row (what README's tables show as failed) and the
    configurations after it still run."""
    import argparse

    from benchmarks import _common

    freed = []
    monkeypatch.setattr(_common.bench, "free_memory", freed.append)
    monkeypatch.setattr(_common.bench, "cupy_on_torch_stream", contextlib.nullcontext)  # no GPU here

    def run_config(seq, dim, causal, warmup, repeat):
        assert (warmup, repeat) == (1, 3)
        if seq == 2048 and causal:
            raise MemoryError("out of memory allocating 2 GiB")
        return {"seq": seq, "dim": dim, "causal": causal, "ms": {"adaattn": 1.0}}

    args = argparse.Namespace(dims=[64], seqs=[1024, 2048], causal="both", warmup=1, repeat=3)
    rows = _common.run_grid(_common.paper_grid(args), run_config, lambda row: "ok", warmup=1, repeat=3)
    assert [(r["seq"], r["causal"]) for r in rows] == [(1024, False), (2048, False), (1024, True), (2048, True)]
    assert rows[3]["error"].startswith("MemoryError: out of memory"), rows[3]
    assert rows[3]["dim"] == 64, rows[3]
    assert all("error" not in r for r in rows[:3])
    assert freed == ["gpu"] * 4, freed  # after every configuration, failed or not
    assert "failed: MemoryError" in capsys.readouterr().out


@pytest.mark.parametrize("causal,expected", [("no", [False]), ("yes", [True]), ("both", [False, True])])
def test_sweep_causal_option(causal, expected):
    """--causal keeps the non-causal rows, the causal rows, or both, in table order."""
    from benchmarks import _common

    args = _common.sweep_parser(None, seqs=[512], dims=[64, 128], repeat=1).parse_args(["--causal", causal])
    rows = list(_common.paper_grid(args))
    assert [(r["dim"], r["causal"]) for r in rows] == [(d, c) for d in (64, 128) for c in expected]


def _ab_results(rows: list[tuple[int, int, bool, float | None, float]]) -> dict:
    """A results file as bench_forward.py writes it: (D, S, causal, AdaAttn TFLOP/s or None if failed, cuDNN)."""
    out = []
    for dim, seq, causal, ours, cudnn in rows:
        row = {"dim": dim, "seq": seq, "causal": causal, "tflops": {"torch-cudnn": cudnn}}
        if ours is None:
            row["error"] = "RuntimeError: failed"
        else:
            row["tflops"]["adaattn"] = ours
        out.append(row)
    return {"rows": out}


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_ab_trees_builds_trees_from_refs_and_names_bad_specs(tmp_path):
    """scripts/ab_trees.sh in a scratch repository: NAME=REF gives ab_NAME with REF's files (results and notes
    left out); a malformed spec, a ref that is no commit, a NAME given twice or no argument exits 2 naming the
    problem before any tree is touched; --clean removes the trees."""
    (tmp_path / "scripts").mkdir()
    script = tmp_path / "scripts" / "ab_trees.sh"
    script.write_bytes((ROOT / "scripts" / "ab_trees.sh").read_bytes())
    script.chmod(0o755)
    for folder in ("notes", "benchmarks/results", "asv_benchmarks/results"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "f.md").write_text(folder)
    (tmp_path / "kernel.cu").write_text("first")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "one"], check=True)
    (tmp_path / "kernel.cu").write_text("second")
    subprocess.run([*git, "commit", "-qam", "two"], check=True)

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(script), *args], capture_output=True, text=True)

    done = run("old=HEAD~1", "new=HEAD")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "ab_old" / "kernel.cu").read_text() == "first"
    assert (tmp_path / "ab_new" / "kernel.cu").read_text() == "second"
    for folder in ("notes", "benchmarks/results", "asv_benchmarks/results"):
        assert not (tmp_path / "ab_new" / folder).exists(), folder
    assert (tmp_path / "ab_new" / "benchmarks").is_dir()
    for args, named in ((["bad"], "bad: expected NAME=REF"), (["x-y=HEAD"], "x-y=HEAD: expected NAME=REF"),
                        (["z=HEAD", "x=nope"], "nope is not a commit"), (["a=HEAD", "a=HEAD~1"], "given twice"),
                        ([], "usage"), (["--clean", "x"], "usage")):
        refused = run(*args)
        assert refused.returncode == 2 and named in refused.stderr, (args, refused.stderr)
    # No refusal touched a tree, not even for the specs before the bad one (z=HEAD).
    assert {path.name for path in tmp_path.glob("ab_*")} == {"ab_old", "ab_new"}
    assert (tmp_path / "ab_old" / "kernel.cu").read_text() == "first"
    assert run("--clean").returncode == 0
    assert not list(tmp_path.glob("ab_*"))


def test_ab_compare_gains_runs_and_peer(tmp_path, rng):
    """The A/B table: every run of every variant, gains as ratios of run means (not means of per-run ratios), the
    peer's mean over all runs of all variants, variants read back from <prefix>-<variant>-<run>.json, a failed
    run counted as missing."""
    from benchmarks import ab_compare

    scale = rng.uniform(0.5, 2.0)
    ours = {"base": (400 * scale, 800 * scale), "keys176": (480 * scale, 800 * scale)}  # gain: 1280/1200 - 1
    cudnn = {"base": (600.0, 610.0), "keys176": (620.0, 650.0)}
    files = []
    for run in (1, 2):
        for name in ("base", "keys176"):
            rows = [(128, 4096, False, ours[name][run - 1], cudnn[name][run - 1]),
                    (64, 1024, True, ours[name][run - 1] if run == 1 else None, 340.0)]
            path = tmp_path / f"2026-01-01-H200-fwd-{name}-{run}.json"
            path.write_text(json.dumps(_ab_results(rows)))
            files.append(str(path))
    runs = ab_compare.load_runs(files)
    assert list(runs) == ["base", "keys176"] and all(len(r) == 2 for r in runs.values())
    table = ab_compare.compare(runs)
    assert [(r["dim"], r["seq"], r["causal"]) for r in table] == [(128, 4096, False), (64, 1024, True)]
    assert table[0]["gain"]["keys176"] == pytest.approx(1280 / 1200 - 1)  # a mean of ratios would give 0.10
    assert table[0]["torch-cudnn"] == pytest.approx(620.0)  # over both variants (base alone: 605)
    assert len(table[1]["tflops"]["base"]) == 1 and table[1]["gain"]["keys176"] == pytest.approx(0.2)
    text = ab_compare.format_table(table, ["base", "keys176"])
    assert "| 128 | 4096 | no |" in text and "+6.7%" in text


@pytest.mark.parametrize("text,expected", [
    ("base=", ("base", None, [])),
    ("old@ab_old=--repeat 5", ("old", "ab_old", ["--repeat", "5"])),
    ("keys176=--tile90 128n:176,2,128", ("keys176", None, ["--tile90", "128n:176,2,128"])),
])
def test_ab_compare_variant_syntax(text, expected):
    from benchmarks import ab_compare

    assert ab_compare.parse_variant(text) == expected


@pytest.mark.parametrize("text", ["=--repeat 5", "no-equals", "bad name=--repeat 5"])
def test_ab_compare_rejects_bad_variants(text):
    from benchmarks import ab_compare

    with pytest.raises(ValueError, match=re.escape(f"--variant {text!r}: expected NAME[@DIR]=ARGS")):
        ab_compare.parse_variant(text)


def test_ab_compare_command_line(tmp_path, rng):
    """`ab_compare.py --compare FILES` prints the table without a GPU, in the files' order or the order of
    `--variant NAME=` (the first is the baseline), for `--impl`'s result key."""
    ours = rng.uniform(300, 600)
    for name, factor in (("new", 1.1), ("old", 1.0)):
        results = _ab_results([(64, 2048, False, ours * factor, 450.0)])
        results["rows"][0]["tflops"]["fp8-kernel"] = 2 * ours * factor
        (tmp_path / f"x-{name}-1.json").write_text(json.dumps(results))
    files = sorted(map(str, tmp_path.glob("*.json")))

    def table(*options: str) -> str:
        shown = run_script("ab_compare.py", "--compare", *files, *options)
        assert shown.returncode == 0, shown.stderr
        return shown.stdout

    assert f"| 64 | 2048 | no | {ours * 1.1:.0f} | {ours:.0f} | -9.1% | 450 |" in table()
    assert f"| 64 | 2048 | no | {ours:.0f} | {ours * 1.1:.0f} | +10.0% | 450 |" in table("--variant", "old=",
                                                                                       "--variant", "new=")
    assert f"| {2 * ours:.0f} | {2.2 * ours:.0f} | +10.0% |" in table("--variant", "old=", "--variant", "new=",
                                                                     "--impl", "fp8-kernel")


@pytest.mark.parametrize(("args", "message"), [
    (["ab_compare.py", "--runs", "2"], "error: give --variant"),
    (["ab_compare.py", "--variant", "base="], "error: give --out"),
    (["ab_compare.py", "--compare", "{file}", "--variant", "other="], "--variant other: no result file for it"),
    (["ab_compare.py", "--compare", "{folder}/results.json"],
     "{folder}/results.json: expected a name ending in -<variant>-<run>.json"),
    (["ab_compare.py", "--variant", "bad name=", "--out", "x"], "--variant 'bad name=': expected NAME[@DIR]=ARGS"),
    (["ab_compare.py", "--variant", "a=", "--variant", "a=-x", "--out", "x"], "--variant a: given twice"),
    (["ab_compare.py", "--compare", "{folder}/missing-a-1.json"],
     "--compare {folder}/missing-a-1.json: cannot read it"),
    (["ab_compare.py", "--compare", "{file}", "--impl", "nope"], "--impl nope: not a result key of these files"),
    (["ab_compare.py", "--variant", "a=", "--out", "x", "--runs", "0"], "--runs: expected an integer >= 1, got 0"),
    (["bench_forward.py", "--tile90", "128:x"], "--tile90: '128:x': expected D[c|n]:BN[,STAGES[,BM]]"),
    (["bench_forward.py", "--tile90", "128n:176,2,128,0"],
     "--tile90: '128n:176,2,128,0': expected D[c|n]:BN[,STAGES[,BM]]"),
    (["bench_forward.py", "--tile90", "128n:0"],
     "--tile90: '128n:0': expected D[c|n]:BN[,STAGES[,BM]] with numbers >= 1"),
    (["bench_forward.py", "--tile", "128:64,32"], "--tile: '128:64,32': expected D[c|n]:BM,BN,WARPS"),
    (["bench_forward.py", "--tile90", "64cc:128"], "--tile90: '64cc:128': expected D[c|n]:BN[,STAGES[,BM]]"),
    (["bench_forward.py", "--repeat", "0"], "--repeat: expected an integer >= 1, got 0"),
    (["bench_rank.py", "--heads", "0"], "--heads: expected an integer >= 1, got 0"),
])
def test_benchmark_scripts_refuse_bad_options_by_name(tmp_path, args, message):
    """Bad options end in a usage error (exit 2) naming the option and what it expects, before any GPU work."""
    if "{file}" in args:
        (tmp_path / "x-base-1.json").write_text(json.dumps(_ab_results([(64, 2048, False, 400.0, 450.0)])))
    script, *options = args
    options = [o.format(file=tmp_path / "x-base-1.json", folder=tmp_path) for o in options]
    message = message.format(folder=tmp_path)
    result = run_script(script, *options)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]


def test_ab_compare_rejects_misnamed_files(tmp_path):
    from benchmarks import ab_compare

    path = tmp_path / "results.json"
    path.write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match=re.escape(f"{path}: expected a name ending in -<variant>-<run>.json")):
        ab_compare.load_runs([str(path)])


# ---------------------------------------------------------------------------------------------------------------
# `adaattn bench` end to end


def test_cli_bench_cpu_quick(tmp_path):
    result = run_cli("bench", "--device", "cpu", "--quick", "--no-peers", "--out-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "Forward TFLOP/s" in result.stdout and "rel_l2" in result.stdout and "adaattn" in result.stdout
    (json_path,) = tmp_path.glob("*-cpu-fwd.json")
    results = json.loads(json_path.read_text())
    assert results["env"]["device"] == "cpu" and results["config"]["device"] == "cpu"
    assert len(results["rows"]) == 2 * 2 * 2  # S × D × causal
    assert all(row["tflops"]["adaattn"] > 0 and row["rel_l2_vs_float64"]["adaattn"] < 1e-5
               for row in results["rows"])
    # one table line per row between the title/header and the closing note
    assert len([line for line in result.stdout.splitlines() if re.match(r"\s*\d+\s+\d+\s+(yes|no)\s", line)]) == 8
    if HAVE_MATPLOTLIB:
        assert json_path.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
        assert f"wrote {json_path}" in result.stdout
    else:
        assert "matplotlib is not installed" in result.stderr


def test_cli_bench_flags(tmp_path):
    result = run_cli("bench", "--device", "cpu", "--seqs", "24", "--dims", "8", "--causal", "no", "--dtype",
                      "float64", "--repeat", "2", "--warmup", "0", "--no-peers", "--out-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    (json_path,) = tmp_path.glob("*.json")
    (row,) = json.loads(json_path.read_text())["rows"]
    assert (row["seq"], row["dim"], row["causal"], row["dtype"]) == (24, 8, False, "float64")
    assert row["rel_l2_vs_float64"]["adaattn"] < 1e-12


def test_cli_bench_rejects_bad_sizes(tmp_path):
    result = run_cli("bench", "--device", "cpu", "--seqs", "0", "--out-dir", str(tmp_path))
    assert result.returncode == 2 and "argument --seqs: expected an integer >= 1, got 0" in result.stderr


# ---------------------------------------------------------------------------------------------------------------
# The asv suite never rots: discovery, parameters, units, and the CPU benchmarks run for real


def _suite_classes() -> list[type]:
    sys.path.insert(0, str(ROOT))
    package = importlib.import_module("asv_benchmarks")
    classes = []
    for info in pkgutil.iter_modules(package.__path__, "asv_benchmarks."):
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if inspect.isclass(value) and not name.startswith("_") and _benchmarks_of(value):
                classes.append(value)
    return classes


def _benchmarks_of(cls: type) -> list[str]:
    return [name for name, _ in inspect.getmembers(cls, inspect.isfunction)
            if re.match(r"(time|track|mem|peakmem)_", name)]


def test_asv_suite_discovers_and_runs_without_a_gpu():
    from conftest import gpu_available

    classes = {cls.__name__: cls for cls in _suite_classes()}
    assert {"Forward", "ForwardError", "TorchFlashForward", "TorchCudnnForward", "CpuForward",
            "CpuBackward", "PolicyForward", "PolicyError", "RankEstimators"} <= classes.keys()
    for cls in classes.values():
        params, names = cls.params, cls.param_names
        assert len(params) == len(names)
        for name in _benchmarks_of(cls):
            if name.startswith("track_"):
                assert getattr(getattr(cls, name), "unit", None), f"{cls.__name__}.{name} has no unit"
        first = next(itertools.product(*params))
        instance = cls()
        if cls.__module__.endswith("_gpu"):
            if not gpu_available():
                with pytest.raises(NotImplementedError):
                    instance.setup(*first)
            continue
        instance.setup(*first)
        for name in _benchmarks_of(cls):
            value = getattr(instance, name)(*first)
            if name.startswith("track_rel_l2"):
                assert 0 <= value < 1e-5, (cls.__name__, name, value)


def test_asv_conf_keeps_tflops_out_of_regression_detection():
    text = (ROOT / "asv.conf.json").read_text()
    conf = json.loads("\n".join(line for line in text.splitlines() if not line.strip().startswith("//")))
    assert conf["benchmark_dir"] == "asv_benchmarks" and conf["results_dir"] == "asv_benchmarks/results"
    (pattern,) = [p for p, commit in conf["regressions_first_commits"].items() if commit is None]
    assert re.match(pattern, "forward_gpu.Forward.track_tflops")
    assert not re.match(pattern, "forward_gpu.Forward.track_ms")
    assert "/asv_benchmarks/html/" in (ROOT / ".gitignore").read_text().split()


@pytest.mark.skipif(not HAVE_ASV, reason="asv comes with the `bench` and `test` extras")
def test_asv_check():
    result = subprocess.run([sys.executable, "-m", "asv", "check", "--python=same"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No problems found" in result.stdout


def test_numpy_bfloat16_rows_work_on_the_cpu():
    pytest.importorskip("ml_dtypes")
    case = bench.Case(seq=16, dim=8, causal=False, batch=1, heads=2, dtype="bfloat16")
    row = bench.run_case(case, device="cpu", warmup=0, repeat=1, seed=0)
    assert row["rel_l2_vs_float64"]["adaattn"] < 1e-2
    assert np.isfinite(row["ms"]["adaattn"])


def test_cli_bench_checks_the_output_folder_first(tmp_path):
    """An --out-dir that cannot be created fails at once, before the sweep runs (its results would be lost)."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = run_cli("bench", "--device", "cpu", "--quick", "--no-peers", "--out-dir", str(blocker / "x"))
    expected = f"--out-dir {blocker / 'x'}: expected a folder this user can create or write to, cannot create it"
    assert result.returncode == 2 and expected in result.stderr
    assert "Traceback" not in result.stderr and "TFLOP" not in result.stdout


def test_cli_bench_refuses_a_read_only_output_folder(tmp_path, monkeypatch, capsys):
    """An existing --out-dir this user cannot write to fails at once too, naming the option and what it expects.
    In process, with os.access saying no: as root (CI, the GPU machine) a 0o555 folder is writable."""
    from adaattn_core import cli

    folder = tmp_path / "read-only"
    folder.mkdir()
    asked = []

    def access(path, mode):
        asked.append((Path(path), mode))
        return not (Path(path) == folder and mode == os.W_OK | os.X_OK)

    monkeypatch.setattr(cli.os, "access", access)
    assert cli.main(["bench", "--device", "cpu", "--quick", "--no-peers", "--out-dir", str(folder)]) == 2
    assert (folder, os.W_OK | os.X_OK) in asked
    captured = capsys.readouterr()
    assert f"--out-dir {folder}: expected a folder this user can write to" in captured.err
    assert "TFLOP" not in captured.out


def test_setup_text_says_when_rows_differ_from_the_requested_sizes():
    """B and H round down (at least 1): a header that says B*S=8 over rows of S = 64 must say so."""
    exact = bench.SweepConfig(seqs=(64, 128), dims=(32, 64), tokens=1024, hidden=256)
    assert exact.setup_text().startswith("B*S=1024, H*D=256, fp32")
    rounded = bench.SweepConfig(seqs=(64,), dims=(64,), tokens=8, hidden=32)
    assert "some rows differ" in rounded.setup_text()
