"""The conformance harness: catalogue coverage, golden vectors, runner, CLI, import isolation."""

import dataclasses
import hashlib
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

import nlattn
from nlattn.conformance import (
    CASES,
    GoldenError,
    ReferenceAdapter,
    format_table,
    jobs,
    load_golden,
    run_check,
    run_conformance,
)
from nlattn.conformance.golden import GOLDEN_DIR, compute
from nlattn.specs import NonLocalConfig, config_class


def test_every_block_and_every_option_has_a_case():
    """Each block has cases; each option is set off its default somewhere in the block's family
    (the 1D/2D/3D non-local blocks share one implementation of their options)."""
    family = lambda b: "NonLocal" if issubclass(config_class(b), NonLocalConfig) else b  # noqa: E731
    for block in nlattn.BLOCKS:
        assert any(c.block == block for c in CASES), f"no case for {block}"
        cases = [c for c in CASES if family(c.block) == family(block)]
        for f in dataclasses.fields(config_class(block)):
            default = f.default if f.default is not dataclasses.MISSING else object()
            assert any(c.spec.to_dict()[f.name] != default for c in cases) or f.default is dataclasses.MISSING, (
                f"{block}.{f.name} is never set off its default"
            )


def test_catalogue_shapes_are_small_batched_and_include_odd_sizes():
    assert all(c.shape[0] >= 2 for c in CASES)
    assert all(np.prod(c.shape) <= 4096 for c in CASES)
    assert sum(any(s % 2 for s in c.shape[2:]) for c in CASES) >= len(CASES) // 2


@pytest.mark.parametrize(
    "case,dtype,check", jobs(ReferenceAdapter()), ids=[f"{c.id}-{chk}" for c, _, chk in jobs(ReferenceAdapter())]
)
def test_reference_reproduces_golden(case, dtype, check):
    result = run_check(ReferenceAdapter(), case, dtype, check)
    assert result.passed, result.describe()


def test_golden_matches_a_fresh_reference_run():
    case = next(c for c in CASES if c.id == "rga-sc")
    stored, fresh = load_golden(case), compute(case)
    np.testing.assert_array_equal(stored.output, fresh.output)
    assert stored.weights.keys() == fresh.weights.keys()


class _OffByABit(ReferenceAdapter):
    name = "broken"

    def forward(self, module, x, **kw):
        out = super().forward(module, x, **kw)
        return (out[0] + 1e-4, out[1]) if isinstance(out, tuple) else out + 1e-4


def test_runner_fails_a_wrong_adapter_and_reports_it():
    cases = [c for c in CASES if c.id in ("sagan", "nl2d-embedded")]
    results = run_conformance([ReferenceAdapter(), _OffByABit()], cases, progress=False)
    assert all(r.passed for r in results if r.adapter == "numpy")
    assert not any(r.passed for r in results if r.adapter == "broken")
    table = format_table(results)
    assert "FAIL" in table and "FAILED broken sagan eval" in table
    assert table.splitlines()[-1] == f"conformance: {len(results) // 2} passed, {len(results) // 2} failed"


@pytest.fixture
def golden_copy(tmp_path):
    d = tmp_path / "golden"
    shutil.copytree(GOLDEN_DIR, d)
    return d


def test_corrupted_golden_file_is_refused(golden_copy):
    case = next(c for c in CASES if c.id == "cam")
    path = golden_copy / "cam.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # one flipped bit in the output tensor
    path.write_bytes(bytes(data))
    with pytest.raises(GoldenError, match="corrupted"):
        load_golden(case, golden_copy)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "nlattn.cli",
            "conformance",
            "--framework",
            "numpy",
            "--golden",
            str(golden_copy),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 3 and "corrupted" in proc.stderr


def test_unreadable_golden_file_with_a_matching_hash_is_refused(golden_copy):
    """A manifest rewritten over a broken file: the hash matches, the file still cannot be used."""
    path = golden_copy / "cam.safetensors"
    path.write_bytes(b"not a safetensors file")
    manifest = json.loads((golden_copy / "MANIFEST.json").read_text())
    manifest["files"][path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    (golden_copy / "MANIFEST.json").write_text(json.dumps(manifest))
    with pytest.raises(GoldenError, match="not a readable safetensors file"):
        load_golden(next(c for c in CASES if c.id == "cam"), golden_copy)
    args = ["conformance", "--framework", "numpy", "--golden", str(golden_copy), "--case", "cam", "--no-progress"]
    proc = subprocess.run([sys.executable, "-m", "nlattn.cli", *args], capture_output=True, text=True)
    assert proc.returncode == 3 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_missing_golden_file_is_refused(golden_copy):
    (golden_copy / "sagan.safetensors").unlink()
    with pytest.raises(GoldenError, match="missing"):
        load_golden(next(c for c in CASES if c.id == "sagan"), golden_copy)


def test_cli_prints_the_table():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "nlattn.cli",
            "conformance",
            "--framework",
            "numpy",
            "--block",
            "SelfAttention",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["block", "numpy"]
    assert lines[2].startswith("SelfAttention") and "PASS" in lines[2]
    assert lines[-1] == "conformance: 2 passed, 0 failed"  # sagan, sagan-qk4: eval only


def test_a_framework_name_selects_all_its_columns_and_an_unknown_one_is_refused():
    from nlattn.conformance import adapter_names

    assert adapter_names(["torch"]) == ["torch", "torch-naive", "torch-autocast"]
    assert adapter_names(["keras"]) == ["keras", "keras-cf", "keras-naive", "keras-mixed"]
    assert adapter_names(["keras-cf", "numpy"]) == ["numpy", "keras-cf"]
    proc = subprocess.run(
        [sys.executable, "-m", "nlattn.cli", "conformance", "--framework", "mxnet"], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "mxnet" in proc.stderr


def test_import_never_pulls_a_framework():
    code = (
        "import sys, nlattn, nlattn.numpy_ref, nlattn.conformance, nlattn.specs; "
        "bad = [m for m in ('torch', 'tensorflow', 'jax', 'flax', 'keras') if m in sys.modules]; "
        "assert not bad, bad"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
