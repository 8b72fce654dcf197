"""nlattn's conformance catalogue as pytest items, against your own adapter.

Installed with nlattn (entry point ``pytest11``), and inert until asked: point it at adapters with

    pytest --nlattn-adapter mypkg.tests.adapters:MyAdapter     (repeatable; built-in names work too)

or in the project's configuration (``[tool.pytest.ini_options]``, one ``module:Class`` a line)::

    nlattn_adapter = ["mypkg.tests.adapters:MyAdapter"]

Every case × check × dtype becomes one item, ``nlattn[<adapter>-<block>-<case>-<check>-<dtype>]``,
with checks ``eval``, ``attention``, ``train``, ``running_stats`` and ``grad``: select with ``-k``
as usual (``-k "MyAdapter and SelfAttention"``). A failure shows the error against the tolerance;
what the adapter declares unsupported (``Adapter.supports``, ``NotSupported``) is skipped with its
reason, and the terminal summary lists each block's coverage (supported cases / cases).
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path

import pytest

_STASH = pytest.StashKey[dict]()


def pytest_addoption(parser):
    group = parser.getgroup("nlattn", "nlattn conformance")
    group.addoption(
        "--nlattn-adapter",
        action="append",
        default=[],
        metavar="MODULE:CLASS",
        help="run nlattn's conformance catalogue against this adapter (repeatable)",
    )
    parser.addini("nlattn_adapter", type="linelist", default=[], help="adapters (MODULE:CLASS) for nlattn's catalogue")


def _specs(config) -> list[str]:
    return config.getoption("nlattn_adapter") or config.getini("nlattn_adapter")


@pytest.hookimpl(tryfirst=True)  # before -k / -m deselect
def pytest_collection_modifyitems(session, config, items):
    specs = _specs(config)
    if not specs:
        return
    from .adapter import load_adapter
    from .runner import jobs, parts_of

    config.stash.setdefault(_STASH, {"results": {}, "coverage": {}})
    added: list[ConformanceItem] = []
    for spec in specs:
        try:
            adapter = load_adapter(spec)
        except Exception as e:  # the project's module: any import-time error is its own
            raise pytest.UsageError(f"--nlattn-adapter {spec}: cannot load it: {type(e).__name__}: {e}") from e
        declined = {}
        for case, dtype, check in jobs(adapter):
            if case.id not in declined:
                declined[case.id] = adapter.supports(case)
            for part in parts_of(case, check):
                name = f"nlattn[{adapter.name}-{case.block}-{case.id}-{part}-{dtype}]"
                item = ConformanceItem.from_parent(
                    session, name=name, adapter=adapter, case=case, dtype=dtype, check=check, part=part
                )
                item.declined = declined[case.id]
                if item.declined is not None:  # known now: skipped without loading golden vectors
                    item.add_marker(pytest.mark.skip(reason=_skip_reason(adapter, item.declined)))
                added.append(item)
    # announced as collected, so that "collected N items / M deselected" counts them
    session.ihook.pytest_collectreport(report=pytest.CollectReport("", "passed", None, added))
    items.extend(added)


def pytest_collection_finish(session):
    """Coverage of what was selected (after -k / -m); NotSupported raised later updates it."""
    state = session.config.stash.get(_STASH, None)
    for item in session.items if state is not None else ():
        if isinstance(item, ConformanceItem):
            _cover(state, item.adapter, item.case, item.declined is None)


@functools.cache
def _where(cls) -> tuple:
    try:
        return Path(inspect.getsourcefile(cls) or "."), inspect.getsourcelines(cls)[1] - 1
    except (OSError, TypeError):
        return Path("."), 0


def _skip_reason(adapter, reason: str) -> str:
    return f"not supported by {adapter.name}: {reason}"


def _cover(state, adapter, case, supported: bool) -> None:
    """Record one check of ``case``: the case counts as supported while none was declined."""
    covered = state["coverage"].setdefault((adapter.name, case.block), {})
    covered[case.id] = covered.get(case.id, True) and supported


class ConformanceFailure(Exception):
    """A part of a check above its tolerance, or a check that crashed."""


class ConformanceItem(pytest.Item):
    def __init__(self, *, adapter, case, dtype, check, part, **kw):
        super().__init__(**kw)
        self.adapter, self.case, self.dtype, self.check, self.part = adapter, case, dtype, check, part
        self.declined: str | None = None  # the adapter's reason when it declares the case unsupported
        for word in (adapter.name, case.block, case.id, part, dtype):
            self.extra_keyword_matches.add(word)

    def _result(self):
        """The runner's result of this item's check, computed once for all of its parts."""
        from .runner import run_check

        state = self.config.stash[_STASH]
        key = (id(self.adapter), self.case.id, self.dtype, self.check)
        if key not in state["results"]:
            state["results"][key] = run_check(self.adapter, self.case, self.dtype, self.check)
        result = state["results"][key]
        _cover(state, self.adapter, self.case, result.unsupported is None)
        return result

    def runtest(self):
        result = self._result()
        if result.unsupported is not None:  # NotSupported raised while running
            pytest.skip(_skip_reason(self.adapter, result.unsupported))
        err = result.parts[self.part]
        if not err <= result.tolerance:
            raise ConformanceFailure(
                f"{self.case.block} case {self.case.id!r} ({self.part}, {self.dtype}): "
                f"error {err:.3g} > tolerance {result.tolerance:.0e} ({err / result.tolerance:.3g}× the tolerance)"
                + (f"\n{result.message}" if result.message else "")
                + f"\nconfig {self.case.config_json}, input {self.case.shape}"
                + "; error = max|out − ref| / max(1, max|ref|)"
            )

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, ConformanceFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self):
        """Where the adapter class is written: what a skip or failure points at."""
        return _where(type(self.adapter)) + (self.name,)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    state = config.stash.get(_STASH, None)
    if not state or not state["coverage"]:
        return
    terminalreporter.section("nlattn conformance coverage")
    for (adapter, block), cases in state["coverage"].items():
        supported = sum(cases.values())
        line = f"{adapter} {block}: {supported}/{len(cases)} cases supported"
        missing = [c for c, ok in cases.items() if not ok]
        terminalreporter.write_line(line + (f" (not: {', '.join(missing)})" if missing else ""))
