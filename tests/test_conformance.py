"""The conformance harness: catalogue coverage, golden vectors, runner, CLI, import isolation."""

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import nlattn
from nlattn.conformance import (
    CASES,
    GoldenError,
    NotSupported,
    ReferenceAdapter,
    coverage,
    format_table,
    jobs,
    load_golden,
    run_check,
    run_conformance,
)
from nlattn.conformance.golden import GOLDEN_DIR, compute
from nlattn.conformance.runner import error
from nlattn.specs import config_class

TESTS = Path(__file__).resolve().parent


def test_every_block_and_every_option_has_a_case():
    """Each block has cases; each option is set off its default somewhere in the block's family:
    the 1D/2D/3D classes of a block (``NonLocalBlock1D/2D/3D``, ``DisentangledNonLocal1D/2D/3D``)
    share one implementation of their options, so a new ``...1D/2D/3D`` family joins by its name."""
    family = lambda b: re.sub(r"[123]D$", "", b)  # noqa: E731
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

    assert adapter_names(["torch"]) == ["torch", "torch-naive", "torch-autocast", "torch-onnx"]
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


class _NoHeads(ReferenceAdapter):
    """Declares what it lacks: cases with heads by ``supports``, the attention call by raising."""

    name = "no-heads"
    dtypes = ("float64", "float32")

    def supports(self, case):
        return "no num_heads option" if case.config.get("num_heads", 1) > 1 else None

    def forward(self, module, x, **kw):
        if kw.get("return_attention") and module["block"] == "SelfAttention":
            raise NotSupported("no attention output")
        out = super().forward(module, x, **kw)
        return out + 1e-7 if module["block"] == "NonLocalBlock2D" and not kw.get("return_attention") else out


def test_not_supported_is_reported_apart_from_failures_with_coverage():
    cases = [c for c in CASES if c.id in ("nl2d-embedded", "nl2d-embedded-heads", "sagan")]
    results = run_conformance([_NoHeads()], cases, progress=False)
    by_case = {(r.case.id, r.check, r.dtype): r for r in results}
    assert by_case["nl2d-embedded-heads", "eval", "float64"].unsupported == "no num_heads option"
    assert by_case["sagan", "eval", "float32"].unsupported == "no attention output"
    assert not any(r.failed for r in results if r.unsupported)
    assert coverage(results) == {("no-heads", "NonLocalBlock2D"): (1, 2), ("no-heads", "SelfAttention"): (0, 1)}
    # 1e-7 off: within float32's tolerance, above float64's
    assert by_case["nl2d-embedded", "eval", "float32"].passed and by_case["nl2d-embedded", "eval", "float64"].failed
    table = format_table(results)
    f64, f32 = (
        max(r.error / r.tolerance for r in results if r.case.id == "nl2d-embedded" and r.dtype == d)
        for d in ("float64", "float32")
    )
    lines = table.splitlines()
    row = next(i for i, line in enumerate(lines) if line.startswith("NonLocalBlock2D"))
    assert "FAIL 2/4 (1/2 cases supported)" in lines[row]  # eval and train: float32 passes, float64 fails
    assert f"f64 {f64:.2g}" in lines[row + 1] and f"f32 {f32:.2g}" in lines[row + 2]
    assert "NOT SUPPORTED no-heads NonLocalBlock2D nl2d-embedded-heads: no num_heads option" in table
    assert "NOT SUPPORTED no-heads SelfAttention sagan: no attention output" in table
    assert (
        lines[-1] == f"conformance: 2 passed, 2 failed, {sum(r.unsupported is not None for r in results)} not supported"
    )


def test_cli_exit_status_counts_failures_not_unsupported_cases():
    args = ["conformance", "--adapter", "test_conformance:_NoHeads", "--framework", "numpy", "--no-progress"]
    proc = subprocess.run(
        [sys.executable, "-m", "nlattn.cli", *args, "--case", "sagan"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent)])},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "NOT SUPPORTED no-heads SelfAttention all 2 cases: no attention output" in proc.stdout


def test_cli_silences_tensorflow_start_up_lines_unless_the_user_set_the_level():
    """Importing TensorFlow sets TF_CPP_MIN_LOG_LEVEL in its own process: the CLI runs without it."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    args = ["conformance", "--framework", "keras-cf", "--case", "scale", "--no-progress"]
    proc = subprocess.run([sys.executable, "-m", "nlattn.cli", *args], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr == "" and proc.stdout.splitlines()[0].split() == ["block", "keras-cf"]


# ---------------------------------------------------------------------------------------------
# ONNX (the torch-onnx column itself runs with every other column in tests/test_blocks.py)
# ---------------------------------------------------------------------------------------------


def test_the_onnx_column_declines_exactly_non_local_means():
    pytest.importorskip("onnxruntime")
    from nlattn.torch.conformance import TorchOnnxAdapter

    declined = {c.block for c in CASES if TorchOnnxAdapter().supports(c) is not None}
    assert declined == {"NonLocalMeans"}


def test_convert_writes_an_onnx_graph_with_dynamic_batch_and_spatial_axes(tmp_path, capsys):
    """``nlattn convert`` traced at 1×16×6×5, run in onnxruntime at 3×16×9×7 against the reference."""
    torch = pytest.importorskip("torch")
    ort = pytest.importorskip("onnxruntime")
    import nlattn.torch as nt
    from nlattn.cli import main
    from nlattn.numpy_ref import run as reference
    from nlattn.weights import export_weights

    torch.manual_seed(0)
    block = nt.SelfAttention(16)
    with torch.no_grad():
        block.gamma.fill_(0.7)  # not the identity
    src = tmp_path / "sagan.safetensors"
    nlattn.save_weights(src, block)
    dst = tmp_path / "sagan.onnx"
    assert main(["convert", str(src), str(dst), "--input-shape", "1,16,6,5", "--return-attention"]) == 0
    assert "dynamic axes: x {0: 'batch', 2: 'spatial_0', 3: 'spatial_1'}" in capsys.readouterr().out
    x = np.random.default_rng(0).normal(size=(3, 16, 9, 7))
    y, attn = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, {"x": x.astype(np.float32)})
    want_y, want_attn = reference("SelfAttention", x, export_weights(block), {"in_channels": 16}, return_attention=True)
    assert error(y, want_y) <= 1e-5 and error(attn, want_attn) <= 1e-5


def test_convert_fixes_what_the_exporter_would_trace_as_a_constant_and_refuses_non_local_means(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    import onnx

    import nlattn.torch as nt
    from nlattn.cli import main

    nlattn.save_weights(tmp_path / "dot.safetensors", nt.NonLocalBlock2D(8, mode="dot_product"))
    assert (
        main(["convert", str(tmp_path / "dot.safetensors"), str(tmp_path / "dot.onnx"), "--input-shape", "2,8,6,6"])
        == 0
    )
    assert "spatial axes fixed at (6, 6): mode='dot_product'" in capsys.readouterr().out
    dims = onnx.load(str(tmp_path / "dot.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 8, 6, 6]
    nlattn.save_weights(tmp_path / "nlm.safetensors", nt.NonLocalMeans(patch_size=3, patch_distance=2, h=0.3))
    assert (
        main(["convert", str(tmp_path / "nlm.safetensors"), str(tmp_path / "nlm.onnx"), "--input-shape", "1,1,9,9"])
        == 1
    )
    assert "NonLocalMeans: cannot be exported to ONNX: fast_exp" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "dot.safetensors"), str(tmp_path / "dot.onnx")]) == 2
