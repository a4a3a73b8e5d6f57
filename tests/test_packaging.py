"""Packaging promises: imports stay framework-free, kernels ship in the wheel, the tree is ruff-clean."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_pulls_in_no_framework():
    code = (
        "import sys, adaattn_core; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'jax', 'cupy', 'numba')); "
        "print(','.join(bad))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_kernel_sources_found_from_checkout():
    from adaattn_core.loader import kernel_source_dir

    assert kernel_source_dir().is_dir()
    assert any(kernel_source_dir().glob("*.cu"))


def test_wheel_contains_kernels_and_adapters(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    (wheel,) = tmp_path.glob("adaattn-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    sources = {Path(n).name for n in names if n.startswith("adaattn_core/cuda_src/")}
    assert sources >= {p.name for p in (ROOT / "cuda_src").glob("*.cu*")}
    assert "adaattn_adapters/__init__.py" in names
    assert not any(n.startswith("adapters/") for n in names), "a top-level `adapters` would collide on PyPI"
    assert any(n.endswith("entry_points.txt") for n in names)


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None, reason="ruff is installed by the `test` extra")
def test_ruff_clean():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", str(ROOT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_loader_cache_key_follows_included_headers(tmp_path, monkeypatch):
    """Editing a header must change the code string CuPy keys its disk cache on."""
    from adaattn_core import loader

    (tmp_path / "op.cu").write_text('#include "helper.cuh"\n__global__ void op() {}\n')
    (tmp_path / "helper.cuh").write_text('#include "deeper.cuh"\n')
    (tmp_path / "deeper.cuh").write_text("#define FACTOR 1\n")
    monkeypatch.setattr(loader, "kernel_source_dir", lambda: tmp_path)
    loader._tagged_source.cache_clear()
    before = loader._tagged_source("op.cu")
    assert [p.name for p in loader.source_closure("op.cu")] == ["op.cu", "helper.cuh", "deeper.cuh"]
    (tmp_path / "deeper.cuh").write_text("#define FACTOR 2\n")
    loader._tagged_source.cache_clear()
    after = loader._tagged_source("op.cu")
    loader._tagged_source.cache_clear()
    assert before != after and before.splitlines()[1:] == after.splitlines()[1:]


def test_loader_options_per_architecture():
    from adaattn_core.loader import arch_option

    assert arch_option((9, 0)) == "-arch=sm_90a"
    assert arch_option((8, 0)) == "-arch=sm_80"
    assert arch_option((8, 9)) == "-arch=sm_89"


def test_missing_header_is_a_clear_error(tmp_path, monkeypatch):
    from adaattn_core import loader

    (tmp_path / "op.cu").write_text('#include "nowhere.cuh"\n')
    monkeypatch.setattr(loader, "kernel_source_dir", lambda: tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere.cuh"):
        loader.source_closure("op.cu")


def test_readme_tables_match_committed_results(monkeypatch):
    """README's performance tables are generated from benchmarks/results, never edited by hand."""
    import re

    monkeypatch.chdir(ROOT)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from readme_table import table

    from benchmarks.quality.table import table as quality_table

    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"<!-- ([\w-]+-table):start -->\n(.*?)\n<!-- \1:end -->", readme, re.DOTALL)
    expected = {"fwd-table", "fwdbwd-table", "fp8-table", "rank-table", "quality-table"}
    assert {marker for marker, _ in blocks} == expected, f"README's generated tables: expected {sorted(expected)}"
    for marker, block in blocks:
        source = re.search(r"Source: \[`([^`]+)`\]", block).group(1)
        assert (ROOT / source).is_file()
        render = quality_table if marker == "quality-table" else table
        assert block.strip() == render(Path(source)).strip(), marker
