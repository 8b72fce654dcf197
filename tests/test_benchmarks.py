"""Smoke test of benchmarks/bench.py: it runs, its table parses, and fast and naive paths agree.

No timing or memory assertions: the numbers depend on the machine and on what else runs on it.
"""

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"


def parse_tables(text):
    """{framework: [row dict, ...]} from the markdown tables bench.py prints."""
    tables, framework, header = {}, None, None
    for line in text.splitlines():
        if line.startswith("### "):
            framework, header = line[4:].strip(), None
            tables[framework] = []
        elif line.startswith("|") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if header is None:
                header = cells
            else:
                assert len(cells) == len(header), line
                tables[framework].append(dict(zip(header, cells)))
    return tables


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH.parent))
    try:
        import bench
    finally:
        sys.path.pop(0)
    return bench


def test_quick_benchmark_table_parses_and_fast_matches_naive(bench, monkeypatch, tmp_path):
    """The CLI end to end, measurements in this process (a child per measurement costs a framework
    import each: too slow for a smoke test; the subprocess path is tested below)."""
    pytest.importorskip("torch")
    monkeypatch.setattr(bench, "run_child", bench.measure)
    out = tmp_path / "table.md"
    bench.main(
        [
            "--quick",
            "--framework",
            "torch",
            "--block",
            "dot_product",
            "--sizes",
            "16",
            "--repeat",
            "1",
            "--out",
            str(out),
        ]
    )
    text = out.read_text()
    assert "matmul peak" in text and "GFLOP/s" in text
    rows = parse_tables(text)["torch"]
    assert [(r["block"], r["size"]) for r in rows] == [("dot_product", "16×16")]
    row = rows[0]
    assert not any(v.startswith("error") for v in row.values()), row
    float(row["naive ms"]), float(row["fast ms"]), float(row["fast peak MiB"])  # numbers, not errors
    assert float(row["max rel. diff fast vs naive"]) <= 1e-5


def test_a_failed_measurement_is_reported_not_raised(bench):
    result = bench.run_child(
        {"framework": "torch", "block": "no_such_block", "size": 16, "channels": 8, "impl": "auto", "repeat": 1}
    )
    assert result["error"].startswith("KeyError")
    assert bench._error(result).startswith("error: KeyError")


def test_naive_concatenation_is_skipped_where_its_pair_tensor_cannot_fit(bench):
    assert bench.naive_skip_reason("concatenation", 16, 256) is None
    assert "pair tensor too large" in bench.naive_skip_reason("concatenation", 1024, 256)
    assert bench.naive_skip_reason("sagan", 1024, 256) is None


def test_sweep_writes_a_table_and_a_plot(bench, monkeypatch, tmp_path):
    """--sweep end to end at tiny sizes, in this process: one row per (block, shape, step), numbers
    in every cell that was run, and a PNG."""
    pytest.importorskip("torch")
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(bench, "run_child", bench.measure)
    stem = tmp_path / "sweep"
    bench.main(
        ["--sweep", "--framework", "torch", "--block", "dot_product", "embedded_gaussian_3d", "--sizes", "8", "16"]
        + ["--video", "2", "8", "8", "--channels", "16", "--repeat", "1", "--sweep-out", str(stem)]
    )
    rows = parse_tables("### torch\n" + stem.with_suffix(".md").read_text())["torch"]
    got = [(r["block"], r["shape"], r["N"], r["step"]) for r in rows]
    assert got == [
        ("dot_product", "8×8", "64", "forward"),
        ("dot_product", "8×8", "64", "train"),
        ("dot_product", "16×16", "256", "forward"),
        ("dot_product", "16×16", "256", "train"),
        ("embedded_gaussian_3d", "2×8×8", "128", "forward"),
        ("embedded_gaussian_3d", "2×8×8", "128", "train"),
    ]
    for r in rows:
        float(r["naive ms"]), float(r["fast ms"]), float(r["time fast/naive"]), float(r["fast peak MiB"])
    assert stem.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_skips_naive_points_whose_relation_cannot_fit(bench):
    ram = bench.os.sysconf("SC_PAGE_SIZE") * bench.os.sysconf("SC_PHYS_PAGES")
    # SAGAN at 256² materialises 65536² float32 (16 GiB) twice, four times in a training step
    assert bench.naive_bytes("sagan", (256, 256), 256, True) == 4 * 65536**2 * 4
    assert bench.naive_bytes("embedded_gaussian", (8, 8), 16, False) == 2 * 64 * 16 * 4
    assert bench.naive_bytes("embedded_gaussian_3d", (2, 8, 8), 16, False) == 2 * 128 * 32 * 4
    assert bench.naive_bytes("cca", (256, 256), 256, True) is None
    assert bench.sweep_skip_reason("sagan", (16, 16), 256, True) is None
    huge = int((ram / 8) ** 0.25) + 2  # side whose N² float32 relation, held four times, exceeds half the RAM
    assert "naive skipped" in bench.sweep_skip_reason("sagan", (huge, huge), 256, True)
    assert "pair tensor too large" in bench.sweep_skip_reason("concatenation", (1024, 1024), 256, False)
