"""The pytest plugin (nlattn/conformance/pytest_plugin.py) as a project would use it: against nlattn's
own torch adapter, the documented third-party example (tests/third_party/), a wrong implementation
and one without most options. Each run is a small ``-k`` selection of the catalogue."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from third_party.plain_non_local import PlainNonLocalAdapter
from third_party.sagan_style import SaganStyleAdapter

from nlattn.conformance import CASES, jobs, parts_of

pytest_plugins = ["pytester"]

PLUGIN = "nlattn.conformance.pytest_plugin"
ROOT = Path(__file__).resolve().parents[1]


def run(pytester, *args):
    # hypothesis' terminal summary re-imports its internals in every in-process run (5 s each)
    return pytester.runpytest("-p", PLUGIN, "-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-rs", *args)


def test_catalogue_items_against_nlattn_torch(pytester):
    """One item per case × check part × dtype, named after adapter, block, case, part and dtype."""
    result = run(pytester, "--nlattn-adapter", "torch", "-k", "SelfAttention and float32", "-v")
    cases = [c for c in CASES if c.block == "SelfAttention"]
    want = sum(len(parts_of(c, "eval")) + len(parts_of(c, "grad")) for c in cases)
    result.assert_outcomes(passed=want)
    result.stdout.fnmatch_lines(
        [
            "*nlattn?torch-SelfAttention-sagan-eval-float32? PASSED*",
            "*nlattn?torch-SelfAttention-sagan-attention-float32? PASSED*",
            "*nlattn?torch-SelfAttention-sagan-grad-float32? PASSED*",
        ]
    )


def test_third_party_sagan_passes_and_the_rest_is_not_supported(pytester):
    result = run(
        pytester,
        "--nlattn-adapter",
        "third_party.sagan_style:SaganStyleAdapter",
        "-k",
        "SelfAttention or NonLocalBlock1D",
    )
    sagan = [c for c in CASES if c.block == "SelfAttention"]
    nl1d = [c for c in CASES if c.block == "NonLocalBlock1D"]
    passed = 2 * sum(len(parts_of(c, "eval")) + len(parts_of(c, "grad")) for c in sagan)  # float32, float64
    skipped = 2 * sum(len(parts_of(c, "eval")) + len(parts_of(c, "train")) + len(parts_of(c, "grad")) for c in nl1d)
    result.assert_outcomes(passed=passed, skipped=skipped)
    jobs_of_all = [p for c, _, chk in jobs(SaganStyleAdapter()) for p in parts_of(c, chk)]
    result.stdout.fnmatch_lines(
        [
            f"collected {len(jobs_of_all)} items / * deselected / {passed + skipped} selected",
            "*nlattn conformance coverage*",
            f"sagan-style NonLocalBlock1D: 0/{len(nl1d)} cases supported (not: *)",
            f"sagan-style SelfAttention: {len(sagan)}/{len(sagan)} cases supported",
            "SKIPPED*sagan_style.py*: not supported by sagan-style: sagan-style implements SelfAttention only, "
            "not NonLocalBlock1D",
        ]
    )


def test_a_wrong_implementation_fails_naming_case_and_error_against_tolerance(pytester):
    """Softmax over the queries instead of the keys: the eval and attention items fail, readably."""
    result = run(
        pytester, "--nlattn-adapter", "third_party.sagan_style:WrongAxisAdapter", "-k", "sagan-eval or sagan-att"
    )
    result.assert_outcomes(failed=4)  # eval and attention, float32 and float64
    result.stdout.fnmatch_lines(
        [
            "*nlattn?sagan-wrong-axis-SelfAttention-sagan-eval-float32?*",
            "SelfAttention case 'sagan' (eval, float32): error * > tolerance 1e-05 (*× the tolerance)",
            "SelfAttention case 'sagan' (attention, float64): error * > tolerance 1e-09 (*× the tolerance)",
        ]
    )
    assert "Traceback" not in result.stdout.str()


def test_missing_options_are_skips_with_reasons_and_coverage(pytester):
    """A non-local module without pool_first, scale, heads or BatchNorm conventions."""
    nl2d = [c for c in CASES if c.block == "NonLocalBlock2D"]
    adapter = PlainNonLocalAdapter()
    supported = [c for c in nl2d if adapter.supports(c) is None]
    assert {"nl2d-embedded", "nl2d-embedded-nosub", "nl2d-embedded-nobn"} <= {c.id for c in supported}
    result = run(
        pytester, "--nlattn-adapter", "third_party.plain_non_local:PlainNonLocalAdapter", "-k", "NonLocalBlock2D"
    )
    parts = lambda cs: sum(len(parts_of(c, "eval")) + len(parts_of(c, "train")) * c.has_batchnorm for c in cs)  # noqa: E731
    result.assert_outcomes(passed=parts(supported), skipped=parts(nl2d) - parts(supported))
    result.stdout.fnmatch_lines(
        [
            f"plain-nl NonLocalBlock2D: {len(supported)}/{len(nl2d)} cases supported (not: nl2d-embedded-poolfirst*",
            "SKIPPED*plain_non_local.py*: not supported by plain-nl: no option for pool_first=True, scale=0.5",
            "SKIPPED*: not supported by plain-nl: no option for num_heads=2",
            "SKIPPED*: not supported by plain-nl: no option for bn_eps=0.001, bn_momentum=0.01",
        ]
    )


def test_inert_unless_asked_and_a_bad_adapter_is_a_usage_error(pytester):
    pytester.makepyfile("def test_one():\n    assert True\n")
    quiet = run(pytester)
    quiet.assert_outcomes(passed=1)
    # pytest's header lists the installed plugin; nothing else may mention it
    assert not [line for line in quiet.outlines if "nlattn" in line and not line.startswith("plugins:")]
    bad = run(pytester, "--nlattn-adapter", "no_such_module:Adapter")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(["*--nlattn-adapter no_such_module:Adapter: cannot load it: ModuleNotFoundError*"])


def test_the_entry_point_loads_the_plugin_and_minus_p_does_not_register_it_twice(tmp_path):
    """pyproject's pytest11 entry point, installed as a distribution's metadata: auto-loaded, and
    named after its module so that ``-p nlattn.conformance.pytest_plugin`` finds it registered."""
    entry_points = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["pytest11"]
    assert entry_points == {PLUGIN: PLUGIN}
    dist = tmp_path / "nlattn_plugin_probe-0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: nlattn-plugin-probe\nVersion: 0\n")
    (dist / "entry_points.txt").write_text(f"[pytest11]\n{PLUGIN} = {PLUGIN}\n")
    env = {"PYTHONPATH": f"{tmp_path}:{ROOT}", "PATH": "/usr/bin:/bin"}
    for extra in ([], ["-p", PLUGIN]):
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", *extra, "--help"], capture_output=True, text=True, cwd=tmp_path, env=env
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "--nlattn-adapter=MODULE:CLASS" in proc.stdout


def test_the_documented_example_is_the_tested_file():
    doc = (ROOT / "docs" / "conformance-third-party.md").read_text()
    code = (ROOT / "tests" / "third_party" / "sagan_style.py").read_text()
    assert f"```python\n{code}```" in doc
