"""The conformance runner: every case through every adapter, compared with the float64 reference."""

from __future__ import annotations

import sys
import traceback
from dataclasses import dataclass

import numpy as np

from ..numpy_ref import run
from ..specs import tensors
from .adapter import Adapter
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
    case: Case
    adapter: str
    check: str  # eval | train | grad
    dtype: str
    error: float
    tolerance: float
    message: str = ""

    @property
    def passed(self) -> bool:
        return self.error <= self.tolerance

    def describe(self) -> str:
        return (
            f"{self.adapter} {self.case.id} {self.check} {self.dtype}: error {self.error:.2e} "
            f"(tolerance {self.tolerance:.0e})" + (f" — {self.message}" if self.message else "")
        )


def check_eval(adapter: Adapter, g: Golden, dtype: str) -> float:
    m = adapter.build(g.case.block, g.case.config, dtype)
    adapter.load_weights(m, g.weights)
    err = error(adapter.forward(m, g.input), g.output)
    if g.attention is None:
        return err
    # asking for the map may take another path (a fast path cannot give it): check both calls
    out, attn = adapter.forward(m, g.input, return_attention=True)
    return max(err, error(out, g.output), error(attn, g.attention))


def check_train(adapter: Adapter, g: Golden, dtype: str) -> float:
    m = adapter.build(g.case.block, g.case.config, dtype)
    adapter.load_weights(m, g.weights)
    err = error(adapter.forward(m, g.input, training=True), g.train_output)
    got = adapter.running_stats(m)
    want = g.stats(adapter.unbiased_running_var)
    if set(got) != set(want):
        raise AssertionError(f"running statistics {sorted(got)} != expected {sorted(want)}")
    return max([err] + [error(got[k], want[k]) for k in want])


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


def check_gradients(adapter: Adapter, g: Golden, dtype: str) -> float:
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
    return max(errs)


CHECKS = {"eval": check_eval, "train": check_train, "grad": check_gradients}


def checks_for(adapter: Adapter, case: Case, dtype: str) -> list[str]:
    names = ["eval"]
    if case.has_batchnorm:
        names.append("train")
    if adapter.supports_gradients and dtype in ("float32", "float64"):
        names.append("grad")
    return names


def jobs(adapter: Adapter, cases=CASES) -> list[tuple[Case, str, str]]:
    """Every (case, dtype, check) an adapter is held to: what a pytest suite parametrizes over."""
    return [(c, d, chk) for c in cases for d in adapter.dtypes for chk in checks_for(adapter, c, d)]


_GOLDEN_CACHE: dict[tuple, Golden] = {}


def run_check(adapter: Adapter, case: Case, dtype: str, check: str, golden_dir=GOLDEN_DIR) -> Result:
    """One check of one case; a crash is a failed result carrying its reason.

    Golden vectors that are missing or corrupted raise GoldenError: that is not a case failing.
    """
    key = (str(golden_dir), case.id)
    if key not in _GOLDEN_CACHE:
        _GOLDEN_CACHE[key] = load(case, golden_dir)
    try:
        err, msg = CHECKS[check](adapter, _GOLDEN_CACHE[key], dtype), ""
    except Exception as e:
        err, msg = float("inf"), "".join(traceback.format_exception_only(type(e), e)).strip()
    return Result(case, adapter.name, check, dtype, err, TOLERANCE[dtype], msg)


def run_conformance(adapters: list[Adapter], cases=CASES, progress: bool = True, golden_dir=GOLDEN_DIR) -> list[Result]:
    todo = [(a, *job) for a in adapters for job in jobs(a, cases)]
    results = []
    bar = _Progress(len(todo), enabled=progress)
    for adapter, case, dtype, check in todo:
        bar.step(f"{adapter.name} {case.id} {check} {dtype}")
        results.append(run_check(adapter, case, dtype, check, golden_dir))
    bar.close()
    return results


class _Progress:
    def __init__(self, total: int, enabled: bool, width: int = 30):
        self.total, self.done, self.width = total, 0, width
        self.enabled = enabled and sys.stderr.isatty()

    def step(self, label: str):
        self.done += 1
        if self.enabled:
            filled = self.width * self.done // max(self.total, 1)
            sys.stderr.write(
                f"\r[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} {label[:40]:<40}"
            )
            sys.stderr.flush()

    def close(self):
        if self.enabled:
            sys.stderr.write("\r" + " " * (self.width + 60) + "\r")


def format_table(results: list[Result]) -> str:
    """Block × adapter: worst error relative to its tolerance, and pass counts."""
    adapters = list(dict.fromkeys(r.adapter for r in results))
    blocks = list(dict.fromkeys(r.case.block for r in results))
    header = ["block"] + adapters
    rows = []
    for block in blocks:
        row = [block]
        for a in adapters:
            rs = [r for r in results if r.case.block == block and r.adapter == a]
            if not rs:
                row.append("-")
                continue
            ok = sum(r.passed for r in rs)
            worst = max(rs, key=lambda r: r.error / r.tolerance)
            mark = "PASS" if ok == len(rs) else "FAIL"
            row.append(f"{mark} {ok}/{len(rs)} max {worst.error:.1e}")
        rows.append(row)
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths))  # noqa: E731
    out = [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]
    failed = [r for r in results if not r.passed]
    out += [f"FAILED {r.describe()}" for r in failed]
    out.append(f"conformance: {len(results) - len(failed)} passed, {len(failed)} failed")
    return "\n".join(out)
