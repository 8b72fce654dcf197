"""Golden vectors: inputs, canonical weights and float64 reference outputs of every case.

Stored as one safetensors file per case plus MANIFEST.json with their SHA-256, so a corrupted or
hand-edited file is caught before any comparison. They change only through ``nlattn golden``
(regenerate) — a deliberate, reviewed change of semantics.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..numpy_ref import RunningStats, run
from ..specs import random_weights
from .cases import CASES, Case

GOLDEN_DIR = Path(__file__).parent / "golden"
LAYOUT_VERSION = "1"


class GoldenError(RuntimeError):
    """A golden file is missing, corrupted, or does not belong to its case."""


@dataclass
class Golden:
    case: Case
    input: np.ndarray
    weights: dict[str, np.ndarray]
    output: np.ndarray
    attention: np.ndarray | None = None
    train_output: np.ndarray | None = None
    #: running statistics after one train step, PyTorch's (unbiased) and Keras/Flax's (biased) update
    train_stats: dict[str, np.ndarray] | None = None
    train_stats_biased: dict[str, np.ndarray] | None = None

    def stats(self, unbiased: bool) -> dict[str, np.ndarray]:
        stats = self.train_stats if unbiased else self.train_stats_biased
        if stats is None:
            raise GoldenError(f"{self.case.id} has no BatchNorm, hence no running statistics")
        return stats


def make_input(case: Case, rng: np.random.Generator) -> np.ndarray:
    if case.block == "NonLocalMeans":  # an image in [0, 1]: a smooth ramp plus noise
        b, c, h, w = case.shape
        ramp = np.linspace(0, 1, h)[:, None] * np.linspace(0.2, 0.8, w)[None, :]
        return np.clip(ramp + rng.normal(0, 0.15, case.shape), 0, 1)
    return rng.normal(0.0, 1.0, case.shape)


def compute(case: Case) -> Golden:
    """Run the float64 reference on a case's seeded input and weights."""
    rng = np.random.default_rng(case.seed)
    spec = case.spec
    weights = random_weights(spec.schema(), rng)
    x = make_input(case, rng)
    g = Golden(case, x, weights, np.empty(0))
    if case.has_attention:
        g.output, g.attention = run(case.block, x, weights, case.config, return_attention=True)
    else:
        g.output = run(case.block, x, weights, case.config)
    if case.has_batchnorm:
        unbiased, biased = RunningStats(True), RunningStats(False)
        g.train_output = run(case.block, x, weights, case.config, training=True, stats=unbiased)
        run(case.block, x, weights, case.config, training=True, stats=biased)
        g.train_stats, g.train_stats_biased = unbiased.updates, biased.updates
    return g


def _flatten(g: Golden) -> dict[str, np.ndarray]:
    t = {"input": g.input, "output": g.output}
    t.update({f"weights.{k}": v for k, v in g.weights.items()})
    if g.attention is not None:
        t["attention"] = g.attention
    if g.train_output is not None:
        t["train.output"] = g.train_output
        t.update({f"train.stats.{k}": v for k, v in g.stats(unbiased=True).items()})
        t.update({f"train.stats_biased.{k}": v for k, v in g.stats(unbiased=False).items()})
    return {k: np.ascontiguousarray(v, dtype=np.float64) for k, v in t.items()}


def _same(path: Path, tensors: dict[str, np.ndarray], meta: dict[str, str]) -> bool:
    from safetensors import safe_open

    if not path.exists():
        return False
    try:
        with safe_open(str(path), "numpy") as f:
            return (
                f.metadata() == meta
                and set(f.keys()) == set(tensors)
                # float64 round-off differs between machines (BLAS, libm): a fresh run that agrees
                # to 1e-12 is the same semantics and does not rewrite the file
                and all(_close(f.get_tensor(k), v) for k, v in tensors.items())
            )
    except Exception:
        return False


def _close(stored: np.ndarray, fresh: np.ndarray) -> bool:
    scale = max(1.0, float(np.max(np.abs(stored), initial=0.0)))
    return stored.shape == fresh.shape and bool(np.all(np.abs(stored - fresh) <= 1e-12 * scale))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_all(directory: Path = GOLDEN_DIR, cases=CASES) -> list[Path]:
    """Regenerate every golden file and the manifest (the only writer of golden vectors)."""
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    keep = {f"{c.id}.safetensors" for c in cases}
    for old in directory.glob("*.safetensors"):
        if old.name not in keep:
            old.unlink()
    manifest: dict[str, Any] = {"layout": LAYOUT_VERSION, "files": {}}
    paths = []
    for case in cases:
        path = directory / f"{case.id}.safetensors"
        meta = {
            "case": case.id,
            "block": case.block,
            "config": case.config_json,
            "shape": json.dumps(case.shape),
            "layout": LAYOUT_VERSION,
        }
        tensors = _flatten(compute(case))
        # safetensors orders metadata arbitrarily: rewrite only what changed, to keep diffs reviewable
        if not _same(path, tensors, meta):
            save_file(tensors, str(path), metadata=meta)
        manifest["files"][path.name] = _sha256(path)
        paths.append(path)
    (directory / "MANIFEST.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return paths


def load(case: Case, directory: Path = GOLDEN_DIR) -> Golden:
    """Load and verify one case's golden vectors; GoldenError says what is wrong."""
    from safetensors import safe_open

    path = directory / f"{case.id}.safetensors"
    manifest_path = directory / "MANIFEST.json"
    try:
        manifest = json.loads(manifest_path.read_text())
        expected_hash = manifest["files"][path.name]
    except (OSError, ValueError, KeyError) as e:
        raise GoldenError(
            f"golden manifest {manifest_path} has no valid entry for {path.name} ({e}); regenerate with `nlattn golden`"
        ) from None
    if not path.exists():
        raise GoldenError(f"golden file {path} is missing")
    if _sha256(path) != expected_hash:
        raise GoldenError(f"golden file {path} is corrupted: its SHA-256 differs from MANIFEST.json")
    try:
        with safe_open(str(path), "numpy") as f:
            meta = f.metadata() or {}
            t = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # a hash that matches a broken file: the manifest was rewritten with it
        raise GoldenError(f"golden file {path} is not a readable safetensors file ({type(e).__name__}: {e})") from None
    if (meta.get("case"), meta.get("config"), meta.get("layout")) != (case.id, case.config_json, LAYOUT_VERSION):
        raise GoldenError(
            f"golden file {path} was written for another case, config or layout "
            f"({meta.get('case')}, {meta.get('config')}); regenerate with `nlattn golden`"
        )
    missing = sorted({"input", "output"} - set(t))
    if missing:
        raise GoldenError(f"golden file {path} lacks {missing}; regenerate with `nlattn golden`")

    def group(prefix):
        return {k[len(prefix) :]: v for k, v in t.items() if k.startswith(prefix)}

    return Golden(
        case,
        t["input"],
        group("weights."),
        t["output"],
        t.get("attention"),
        t.get("train.output"),
        group("train.stats."),
        group("train.stats_biased."),
    )
