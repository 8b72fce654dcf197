"""The conformance runner: every case through every adapter, compared with the float64 reference."""

from __future__ import annotations

import contextlib
import math
import sys
import traceback
from dataclasses import dataclass, field

import numpy as np

from ..numpy_ref import run
from ..specs import tensors
from .adapter import Adapter, NotSupported
from .cases import CASES, Case
from .golden import GOLDEN_DIR, Golden, load

#: docs/design.md §5: error = max|out − ref| / max(1, max|ref|)
TOLERANCE = {"float64": 1e-9, "float32": 1e-5, "bfloat16": 2e-2, "float16": 2e-2}


def error(out, ref) -> float:
    out, ref = np.asarray(out, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if out.shape != ref.shape:
        raise AssertionError(f"shape {out.shape} != reference shape {ref.shape}")
    if not np.all(np.isfinite(out)):
        return float("inf")
    return float(np.max(np.abs(out - ref), initial=0.0) / max(1.0, np.max(np.abs(ref), initial=0.0)))


@dataclass
class Result:
    """One check of one case in one dtype. ``parts``: the error of each thing the check compares
    (``PARTS``); ``error`` is their maximum. ``unsupported``: the adapter's reason, when it declared
    the case or check not supported (then nothing was compared: neither passed nor failed)."""

    case: Case
    adapter: str
    check: str  # eval | train | grad
    dtype: str
    error: float
    tolerance: float
    message: str = ""
    parts: dict[str, float] = field(default_factory=dict)
    unsupported: str | None = None

    @property
    def passed(self) -> bool:
        return self.unsupported is None and self.error <= self.tolerance

    @property
    def failed(self) -> bool:
        return self.unsupported is None and not self.error <= self.tolerance  # NaN fails

    def describe(self) -> str:
        head = f"{self.adapter} {self.case.id} {self.check} {self.dtype}"
        if self.unsupported is not None:
            return f"{head}: not supported — {self.unsupported}"
        return f"{head}: error {self.error:.2e} (tolerance {self.tolerance:.0e})" + (
            f" — {self.message}" if self.message else ""
        )


#: what each check compares, in order; "attention" only for blocks with a map
PARTS = {"eval": ("eval", "attention"), "train": ("train", "running_stats"), "grad": ("grad",)}


def parts_of(case: Case, check: str) -> tuple[str, ...]:
    """The parts ``check`` reports for ``case``."""
    return tuple(p for p in PARTS[check] if p != "attention" or case.has_attention)


def check_eval(adapter: Adapter, g: Golden, dtype: str) -> dict[str, float]:
    m = adapter.build(g.case.block, g.case.config, dtype)
    adapter.load_weights(m, g.weights)
    parts = {"eval": error(adapter.forward(m, g.input), g.output)}
    if g.attention is not None:
        # asking for the map may take another path (a fast path cannot give it): check both calls
        out, attn = adapter.forward(m, g.input, return_attention=True)
        parts["eval"] = max(parts["eval"], error(out, g.output))
        parts["attention"] = error(attn, g.attention)
    return parts


def check_train(adapter: Adapter, g: Golden, dtype: str) -> dict[str, float]:
    m = adapter.build(g.case.block, g.case.config, dtype)
    adapter.load_weights(m, g.weights)
    err = error(adapter.forward(m, g.input, training=True), g.train_output)
    got = adapter.running_stats(m)
    want = g.stats(adapter.unbiased_running_var)
    if set(got) != set(want):
        raise AssertionError(f"running statistics {sorted(got)} != expected {sorted(want)}")
    return {"train": err, "running_stats": max([error(got[k], want[k]) for k in want], default=0.0)}


def trainable(g: Golden) -> list[str]:
    kinds = tensors(g.case.spec.schema())
    return [n for n, t in kinds.items() if t.kind not in ("bn_mean", "bn_var")]


def reference_directional(g: Golden, cotangent, dx, dw, eps: float = 1e-5) -> float:
    """d/dt <cotangent, f(x + t dx, W + t dW)> at t = 0, by central differences of the reference.

    The step balances truncation (∝ eps²) against float64 round-off (∝ 1e-16·|terms| / eps): with
    eps = 1e-6 round-off alone reached 1.4e-9 on EVC (large codeword logits), above the float64
    tolerance; at 1e-5 the worst torch float64 case is 1.2e-10.
    """

    def f(t):
        w = {k: v + t * dw[k] if k in dw else v for k, v in g.weights.items()}
        return float(np.sum(cotangent * run(g.case.block, g.input + t * dx, w, g.case.config, for_derivative=True)))

    return (f(eps) - f(-eps)) / (2 * eps)


def check_gradients(adapter: Adapter, g: Golden, dtype: str) -> dict[str, float]:
    """Input and parameter gradients, each against the reference's directional derivative."""
    rng = np.random.default_rng(g.case.seed + 1)
    unit = lambda a: a / np.sqrt(np.sum(a * a))  # noqa: E731
    cot = unit(rng.normal(size=g.output.shape))
    m = adapter.build(g.case.block, g.case.config, dtype)
    adapter.load_weights(m, g.weights)
    gx, gw = adapter.gradients(m, g.input, cot)
    names = trainable(g)
    if set(gw) != set(names):
        raise AssertionError(f"gradients for {sorted(gw)}, expected {sorted(names)}")
    dx = unit(rng.normal(size=g.input.shape))
    errs = [error(np.sum(gx * dx), reference_directional(g, cot, dx, {}))]
    if names:
        raw = {k: rng.normal(size=g.weights[k].shape) for k in names}
        norm = np.sqrt(sum(np.sum(v * v) for v in raw.values()))
        dw = {k: v / norm for k, v in raw.items()}
        got = sum(float(np.sum(np.asarray(gw[k]) * dw[k])) for k in names)
        errs.append(error(got, reference_directional(g, cot, np.zeros_like(g.input), dw)))
    return {"grad": max(errs)}


CHECKS = {"eval": check_eval, "train": check_train, "grad": check_gradients}


def checks_for(adapter: Adapter, case: Case, dtype: str) -> list[str]:
    names = ["eval"]
    if case.has_batchnorm and adapter.supports_training:
        names.append("train")
    if adapter.supports_gradients and dtype in ("float32", "float64"):
        names.append("grad")
    return names


def jobs(adapter: Adapter, cases=CASES) -> list[tuple[Case, str, str]]:
    """Every (case, dtype, check) of an adapter: what a pytest suite parametrizes over. Cases the
    adapter declares unsupported (``Adapter.supports``) are included: ``run_check`` reports them."""
    return [(c, d, chk) for c in cases for d in adapter.dtypes for chk in checks_for(adapter, c, d)]


_GOLDEN_CACHE: dict[tuple, Golden] = {}


def run_check(adapter: Adapter, case: Case, dtype: str, check: str, golden_dir=GOLDEN_DIR) -> Result:
    """One check of one case; a crash is a failed result carrying its reason, ``NotSupported`` (or
    a reason from ``adapter.supports``) an unsupported one.

    Golden vectors that are missing or corrupted raise GoldenError: that is not a case failing.
    """
    tolerance, names = TOLERANCE[dtype], parts_of(case, check)
    reason = adapter.supports(case)
    if reason is not None:
        return Result(case, adapter.name, check, dtype, math.nan, tolerance, unsupported=reason)
    key = (str(golden_dir), case.id)
    if key not in _GOLDEN_CACHE:
        _GOLDEN_CACHE[key] = load(case, golden_dir)
    msg = ""
    try:
        parts = CHECKS[check](adapter, _GOLDEN_CACHE[key], dtype)
    except NotSupported as e:
        return Result(case, adapter.name, check, dtype, math.nan, tolerance, unsupported=e.reason)
    except Exception as e:
        parts, msg = dict.fromkeys(names, math.inf), "".join(traceback.format_exception_only(type(e), e)).strip()
    return Result(case, adapter.name, check, dtype, max(parts.values()), tolerance, msg, parts)


def run_conformance(adapters: list[Adapter], cases=CASES, progress: bool = True, golden_dir=GOLDEN_DIR) -> list[Result]:
    """Every job of every adapter; a progress bar on stderr when it is a terminal."""
    todo = [(a, *job) for a in adapters for job in jobs(a, cases)]
    results = []
    with _progress(len(todo), enabled=progress) as step:
        for adapter, case, dtype, check in todo:
            step(f"{adapter.name} {case.id} {check} {dtype}")
            results.append(run_check(adapter, case, dtype, check, golden_dir))
    return results


@contextlib.contextmanager
def _progress(total: int, enabled: bool):
    """A ``step(label)`` callable that advances a rich progress bar (transient, on stderr)."""
    if not (enabled and sys.stderr.isatty()):
        yield lambda label: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.description}"))
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("", total=total)
        yield lambda label: bar.update(task, advance=1, description=label)


#: short dtype names for the table's cells
SHORT = {"float64": "f64", "float32": "f32", "bfloat16": "bf16", "float16": "f16"}


def coverage(results: list[Result]) -> dict[tuple[str, str], tuple[int, int]]:
    """{(adapter, block): (supported cases, cases)}: a case counts as supported unless one of its
    checks was declared not supported."""
    cases: dict[tuple[str, str], dict[str, bool]] = {}
    for r in results:
        seen = cases.setdefault((r.adapter, r.case.block), {})
        seen[r.case.id] = seen.get(r.case.id, True) and r.unsupported is None
    return {k: (sum(v.values()), len(v)) for k, v in cases.items()}


def _cell(rs: list[Result], covered: tuple[int, int]) -> str:
    """PASS/FAIL, passed/compared, coverage when partial, then per dtype the worst error as a
    fraction of that dtype's tolerance (1 is the limit)."""
    compared = [r for r in rs if r.unsupported is None]
    ok = sum(r.passed for r in compared)
    head = ("PASS" if ok == len(compared) else "FAIL") + f" {ok}/{len(compared)}" if compared else "n/s"
    if covered[0] < covered[1]:
        head += f" ({covered[0]}/{covered[1]} cases supported)"
    lines = [head]
    for dtype in dict.fromkeys(r.dtype for r in compared):
        worst = max(r.error / r.tolerance for r in compared if r.dtype == dtype)
        lines.append(f"{SHORT.get(dtype, dtype)} {worst:.2g}")
    return "\n".join(lines)


def format_table(results: list[Result]) -> str:
    """Block × adapter (rich, plain text): in each cell passed/compared, the coverage where an
    adapter declared cases not supported, and per dtype the worst error / tolerance; then every
    failure, every unsupported case with its reason, and the totals."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    adapters = list(dict.fromkeys(r.adapter for r in results))
    blocks = list(dict.fromkeys(r.case.block for r in results))
    covered = coverage(results)
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for name in ["block", *adapters]:
        table.add_column(name, no_wrap=True)
    for block in blocks:
        cells = []
        for a in adapters:
            rs = [r for r in results if r.case.block == block and r.adapter == a]
            cells.append(_cell(rs, covered[(a, block)]) if rs else "-")
        table.add_row(block, *cells, end_section=True)
    console = Console(width=100_000, no_color=True, highlight=False, force_terminal=False)
    with console.capture() as captured:
        console.print(table, width=console.measure(table).maximum)
    out = [line.rstrip() for line in captured.get().splitlines() if line.strip()]
    out.append("(per dtype: the worst error as a fraction of that dtype's tolerance; above 1 fails)")
    failed = [r for r in results if r.failed]
    out += [f"FAILED {r.describe()}" for r in failed]
    # one line per adapter, block and reason: "all 15 cases" when a block is not implemented at all
    why: dict[tuple[str, str, str], list[str]] = {}
    for r in results:
        if r.unsupported is not None:
            ids = why.setdefault((r.adapter, r.case.block, r.unsupported), [])
            ids += [r.case.id] if r.case.id not in ids else []
    for (adapter, block, reason), ids in why.items():
        total_cases = covered[(adapter, block)][1]
        which = f"all {total_cases} cases" if len(ids) == total_cases > 1 else ", ".join(ids)
        out.append(f"NOT SUPPORTED {adapter} {block} {which}: {reason}")
    total = f"conformance: {sum(r.passed for r in results)} passed, {len(failed)} failed"
    if why:
        total += f", {sum(r.unsupported is not None for r in results)} not supported"
    out.append(total)
    return "\n".join(out)
