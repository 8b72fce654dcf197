"""Data-parallel Keras training on 2 devices, through both of Keras' engines: with synchronised
BatchNorm a step on a split batch equals the single-device step on the whole batch (outputs,
input gradients, parameter gradients, running statistics); without it, tensorflow replicas keep
their own statistics, and jax's single global program always has the global batch's.

- ``mirrored``: KERAS_BACKEND=tensorflow, ``tf.distribute.MirroredStrategy`` over 2 logical CPU
  devices, float64, tolerance 1e-10;
- ``data_parallel``: KERAS_BACKEND=jax, ``keras.distribution.DataParallel`` over 2 fake CPU
  devices (``XLA_FLAGS=--xla_force_host_platform_device_count=2``), float32 (Keras on jax
  computes BatchNorm moments in float32 even for float64 inputs), tolerance 1e-5.

Each route is one subprocess (tests/keras_distributed_worker.py) that runs every problem.
Every block with BatchNorm, and SelfAttention (no BatchNorm: the engines alone).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import ONE_CASE_PER_BLOCK

# one xdist worker runs the whole module: its module-scoped fixture starts the device processes once
pytestmark = pytest.mark.xdist_group("keras_distributed")

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("keras_distributed_worker.py")
BATCH_NORM_BLOCKS = [b for b, c in ONE_CASE_PER_BLOCK.items() if c.has_batchnorm] + ["SelfAttention"]
BATCH = 4  # 2 samples per device

ROUTES = {
    "mirrored": dict(dtype="float64", tol=1e-10, env={"KERAS_BACKEND": "tensorflow"}),
    "data_parallel": dict(
        dtype="float32",
        tol=1e-5,
        # optimisation level 0 only makes XLA's CPU compiles faster (as in tests/test_keras.py)
        env={
            "KERAS_BACKEND": "jax",
            "XLA_FLAGS": "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0",
        },
    ),
}


def problems(dtype: str) -> dict:
    """Every block synchronised (NonLocalBlock2D also through ``model.fit``), and NonLocalBlock2D
    without synchronisation."""
    found = {
        block: dict(
            block=block,
            config=ONE_CASE_PER_BLOCK[block].config,
            shape=[BATCH, *ONE_CASE_PER_BLOCK[block].shape[1:]],
            sync=True,
            dtype=dtype,
            fit=block == "NonLocalBlock2D",
        )
        for block in BATCH_NORM_BLOCKS
    }
    found["unsynchronised"] = dict(found["NonLocalBlock2D"], sync=False, fit=False)
    return found


@pytest.fixture(scope="module")
def route_results(tmp_path_factory):
    """route -> {problem: arrays}; each route's worker runs once (its failure too). (Running the
    two side by side saves nothing on 2 cores: both keep the cores busy.)"""
    done: dict[str, dict | str] = {}

    def get(route: str) -> dict:
        if route not in done:
            spec, out = ROUTES[route], tmp_path_factory.mktemp(route)
            cases = problems(spec["dtype"])
            start = time.time()
            r = subprocess.run(
                [sys.executable, str(WORKER), route, str(out), json.dumps(cases)],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=600,
                env={**os.environ, **spec["env"]},
            )
            print(f"{route}: {time.time() - start:.0f} s")
            ok = r.returncode == 0
            done[route] = {n: dict(np.load(out / f"{n}.npz")) for n in cases} if ok else r.stderr[-6000:]
        result = done[route]
        if isinstance(result, str):
            pytest.fail(f"the {route} worker failed:\n{result}")
        return result

    return get


def close(a, b, tol) -> bool:
    return np.max(np.abs(a - b)) <= tol * max(1.0, np.max(np.abs(b)))


def gradients_close(got: dict, want: dict, tol) -> list[str]:
    """The names whose gradients differ, the parameter gradients taken as one vector: in float32 a
    gradient that is 0 in exact arithmetic (a bias before a training-mode BatchNorm, φ's bias
    under a softmax) is rounding noise of the size of the block's largest gradient."""
    assert got.keys() == want.keys() and want
    scale = max(1.0, *(np.max(np.abs(w)) for w in want.values()))
    return [k for k in want if np.max(np.abs(got[k] - want[k])) > tol * scale]


def part(result: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in result.items() if k.startswith(prefix)}


@pytest.mark.parametrize("block", BATCH_NORM_BLOCKS)
@pytest.mark.parametrize("route", list(ROUTES))
def test_synchronised_step_equals_the_single_device_step(route, block, route_results):
    got, tol = route_results(route)[block], ROUTES[route]["tol"]
    assert got["dist:devices"] == 2  # the output lies on both devices
    assert close(got["dist:out"], got["whole:out"], tol)
    assert close(got["dist:dx"], got["whole:dx"], tol)
    # tensorflow: the replicas' gradients summed (the optimizer's all-reduce); jax: the global program's
    assert not gradients_close(part(got, "dist:grad:"), part(got, "whole:grad:"), tol)
    stats = {k: v for k, v in part(got, "whole:stat:").items() if ":" not in k}  # not the per-replica copies
    assert bool(stats) == (block != "SelfAttention")
    for name, want in stats.items():
        assert close(got[f"dist:stat:{name}"], want, tol), name
        for replica in range(2):  # every replica's copy (tensorflow keeps one per device)
            key = f"dist:stat:{name}:{replica}"
            assert route == "data_parallel" or close(got[key], want, tol), key


@pytest.mark.parametrize("route", list(ROUTES))
def test_fit_step_equals_the_single_device_fit_step(route, route_results):
    """``model.fit`` on the split batch (the engine's batch split, loss scaling and gradient
    all-reduce): the weights move as on one device, by the gradient of the batch-mean loss."""
    got, tol = route_results(route)["NonLocalBlock2D"], ROUTES[route]["tol"]
    delta = {k: v for k, v in part(got, "dist:fit:").items() if not k.startswith("stat:")}
    want = {k: v for k, v in part(got, "whole:fit:").items() if not k.startswith("stat:")}
    assert delta.keys() == part(got, "whole:grad:").keys()
    assert not gradients_close(delta, want, tol)
    # SGD(1) on the mean over the batch of sum(out · cotangent): the step is grad / BATCH
    assert not gradients_close(want, {k: g / BATCH for k, g in part(got, "whole:grad:").items()}, tol)
    for name in ("bn.running_mean", "bn.running_var"):
        assert close(got[f"dist:fit:stat:{name}"], got[f"whole:fit:stat:{name}"], tol), name


def test_mirrored_without_synchronisation_each_replica_keeps_its_own_statistics(route_results):
    got, tol = route_results("mirrored")["unsynchronised"], ROUTES["mirrored"]["tol"]
    for replica in range(2):  # each replica normalises its half as if it were alone
        alone, rows = part(got, f"half{replica}:"), slice(2 * replica, 2 * replica + 2)
        assert close(got["dist:out"][rows], alone["out"], tol)
        assert close(got["dist:dx"][rows], alone["dx"], tol)
        for name in ("bn.running_mean", "bn.running_var"):
            assert close(got[f"dist:stat:{name}:{replica}"], alone[f"stat:{name}"], tol), name
    # the engine sums the replicas' gradients, each its own half's
    halves = {k: got[f"half0:grad:{k}"] + got[f"half1:grad:{k}"] for k in part(got, "whole:grad:")}
    assert not gradients_close(part(got, "dist:grad:"), halves, tol)
    assert not close(got["dist:stat:bn.running_var"], got["whole:stat:bn.running_var"], tol)
    assert not close(got["dist:out"], got["whole:out"], tol)


def test_data_parallel_on_jax_always_has_the_global_batch_statistics(route_results):
    """One program over the global batch: ``synchronized=False`` changes nothing there."""
    got, tol = route_results("data_parallel")["unsynchronised"], ROUTES["data_parallel"]["tol"]
    assert close(got["dist:out"], got["whole:out"], tol)
    assert close(got["dist:dx"], got["whole:dx"], tol)
    assert not gradients_close(part(got, "dist:grad:"), part(got, "whole:grad:"), tol)
    for name in ("bn.running_mean", "bn.running_var"):
        assert close(got[f"dist:stat:{name}"], got[f"whole:stat:{name}"], tol), name
