"""Conformance suite: a case catalogue, golden vectors from the float64 reference, adapters, a runner.

from nlattn.conformance import run_conformance, available_adapters, format_table
adapters, _ = available_adapters()
print(format_table(run_conformance(adapters)))
"""

from .adapter import (
    BUILTIN,
    Adapter,
    NotSupported,
    ReferenceAdapter,
    adapter_names,
    available_adapters,
    load_adapter,
)
from .cases import CASES, CASES_BY_ID, Case, select
from .golden import GoldenError
from .golden import load as load_golden
from .runner import PARTS, TOLERANCE, Result, coverage, error, format_table, jobs, parts_of, run_check, run_conformance

__all__ = [
    "Adapter",
    "BUILTIN",
    "CASES",
    "CASES_BY_ID",
    "Case",
    "GoldenError",
    "NotSupported",
    "PARTS",
    "ReferenceAdapter",
    "Result",
    "TOLERANCE",
    "adapter_names",
    "available_adapters",
    "coverage",
    "error",
    "format_table",
    "load_adapter",
    "jobs",
    "load_golden",
    "parts_of",
    "run_check",
    "run_conformance",
    "select",
]
