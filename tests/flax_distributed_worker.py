"""The multi-device half of tests/test_flax_distributed.py, in its own process: JAX fixes its device
count when its backend starts, and the pytest process has started it with one CPU device.

Run as ``XLA_FLAGS=--xla_force_host_platform_device_count=4 python flax_distributed_worker.py
PROBLEMS_JSON OUT_DIR``. Float64 throughout (``jax_enable_x64``). For each problem (a dict with
``id``, ``route``, ``block``, ``config``, a channels-last ``shape`` and ``world``) it runs one
training step — ``sum(out · cotangent)`` differentiated — on ``world`` devices by the problem's
route, and the same step on one device on the whole batch, and writes ``OUT_DIR/<id>.npz``: the
input, cotangent and canonical weights, then ``out``, ``dx``, ``grad:<name>`` (canonical
layouts) and ``stat:<name>`` (running statistics) of both, prefixed ``one.`` and ``many.``. A
problem that raises writes ``OUT_DIR/<id>.err`` (its exception) instead; the test asserts.

Routes: ``jit`` (``nnx.jit``, the batch sharded along a ``Mesh`` axis by ``NamedSharding``, the
model replicated), ``shard_map`` (``nnx.shard_map``, the blocks built with ``bn_axis_name``),
``unsynchronised`` (``jax.shard_map`` without an axis name: each device's own statistics, stacked;
``own.*`` the single-device step on each device's rows) and ``context``
(``nlattn.jax.context_parallel``: the first spatial axis split).
"""

from __future__ import annotations

import json
import sys
import traceback
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import nlattn.jax as nj
from nlattn.specs import make_config, random_weights

# nnx.BatchNorm keeps its running statistics in float32 whatever param_dtype (Flax's choice), and
# writing a float64 update into them warns; the float64 computation itself is unaffected
warnings.filterwarnings("ignore", "scatter inputs have incompatible types")


def weights_of(case: dict) -> dict:
    """Random canonical weights (float64), running statistics included."""
    return random_weights(make_config(case["block"], **case["config"]).schema(), np.random.default_rng(0))


def build(case: dict, bn_axis_name=None):
    """The block (float64 parameters, train mode) holding ``weights_of(case)``; built by
    ``nnx.eval_shape``, so that no initialiser is compiled."""
    cls = nj.BLOCKS[case["block"]]
    extra = {"bn_axis_name": bn_axis_name} if cls.has_batch_norm else {}
    block = nnx.eval_shape(lambda: cls(**case["config"], **case.get("options", {}), **extra, param_dtype=jnp.float64))
    nnx.update(block, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), nnx.state(block)))
    nj.load_weights(block, weights_of(case))
    block.train()
    return block


def arrays(case: dict):
    rng = np.random.default_rng(1)
    return rng.normal(size=case["shape"]), rng.normal(size=case["shape"])


def step(model, x, cotangent):
    """(out, dx, parameter gradients as an nnx.State) of sum(out · cotangent); BatchNorm running
    statistics are updated in ``model``."""

    def loss(model, x):
        out = model(x)
        return jnp.sum(out * cotangent), out

    (grads, dx), out = nnx.grad(loss, argnums=(0, 1), has_aux=True)(model, x)
    return out, dx, grads


STATS = ("running_mean", "running_var")


def statistics(block) -> dict:
    """The running statistics by canonical name."""
    return {f"stat:{k}": v for k, v in nj.export_weights(block).items() if k.endswith(STATS)}


def canonical(block, grads) -> dict:
    """Parameter gradients (an nnx.State of the block's parameters) and the running statistics,
    by canonical name and in canonical layouts."""
    twin = nnx.clone(block)
    nnx.update(twin, grads)
    g = {f"grad:{k}": v for k, v in nj.export_weights(twin).items() if not k.endswith(STATS)}
    return {**g, **statistics(block)}


#: one jitted step for every model of the same structure (nnx.jit caches by graph and shardings)
jit_step = nnx.jit(step)
_SINGLE: dict[str, dict] = {}


def single(case: dict, x, cotangent) -> dict:
    """The step on one device (the first); the same problem is run once."""
    key = json.dumps([case["block"], case["config"], case.get("options"), x.shape, float(x.sum())], sort_keys=True)
    if key not in _SINGLE:
        block = build(case)
        out, dx, grads = jit_step(block, jnp.asarray(x), jnp.asarray(cotangent))
        _SINGLE[key] = {"out": np.asarray(out), "dx": np.asarray(dx), **canonical(block, grads)}
    return _SINGLE[key]


def many(case: dict, x, cotangent) -> dict:
    mesh = Mesh(np.array(jax.devices()[: case["world"]]), ("data",))
    route = case["route"]
    if route == "jit":
        block = build(case)
        nnx.update(block, jax.device_put(nnx.state(block), NamedSharding(mesh, P())))  # replicated
        rows = NamedSharding(mesh, P("data"))
        out, dx, grads = jit_step(block, jax.device_put(x, rows), jax.device_put(cotangent, rows))
        extra = {"spec": np.array(str(out.sharding.spec))}
    elif route == "shard_map":
        block = build(case, bn_axis_name="data")
        run = nnx.shard_map(step, mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=(P("data"),) * 2 + (P(),))
        out, dx, grads = nnx.jit(run)(block, x, cotangent)
        extra = {}
    elif route == "unsynchronised":
        block = build(case)
        graphdef, state = nnx.split(block)

        def local(state, x, cotangent):
            model = nnx.merge(graphdef, state)
            out, _, _ = step(model, x, cotangent)
            return out, jax.tree.map(lambda a: a[None], nnx.state(model, nnx.BatchStat))  # per device

        run = jax.shard_map(local, mesh=mesh, in_specs=(P(), P("data"), P("data")), out_specs=P("data"))
        out, stats = jax.jit(run)(state, x, cotangent)
        result = {"out": np.asarray(out)}
        share = x.shape[0] // case["world"]
        for r in range(case["world"]):
            nnx.update(block, jax.tree.map(lambda a, r=r: a[r], stats))
            result.update({f"{k}@{r}": v for k, v in statistics(block).items()})
            own = single(case, x[r * share : (r + 1) * share], cotangent[r * share : (r + 1) * share])
            result.update({f"own.{k}@{r}": v for k, v in own.items() if k == "out" or k.startswith("stat:")})
        return result
    elif route == "context":
        mesh = Mesh(np.array(jax.devices()[: case["world"]]), ("context",))
        block = build(case)
        cp = nj.context_parallel(block, mesh, "context")
        out, dx, grads = jit_step(cp, cp.shard(x), cp.shard(cotangent))
        grads = grads["block"]
        extra = {"spec": np.array(str(out.sharding.spec))}
    else:
        raise ValueError(f"unknown route {route!r}")
    return {"out": np.asarray(out), "dx": np.asarray(dx), **canonical(block, grads), **extra}


def main(problems: list[dict], out_dir: Path) -> None:
    if jax.device_count() < max(p["world"] for p in problems):
        raise SystemExit(f"{jax.device_count()} devices: set XLA_FLAGS=--xla_force_host_platform_device_count=4")
    for case in problems:
        try:
            x, cotangent = arrays(case)
            weights = weights_of(case)
            got = many(case, x, cotangent)
            one = single(case, x, cotangent) if case["route"] != "unsynchronised" else {}
            np.savez(
                out_dir / f"{case['id']}.npz",
                x=x,
                cotangent=cotangent,
                **{f"w:{k}": v for k, v in weights.items()},
                **{f"many.{k}": v for k, v in got.items()},
                **{f"one.{k}": v for k, v in one.items()},
            )
        except Exception as e:  # noqa: BLE001 - reported to the test, which asserts
            (out_dir / f"{case['id']}.err").write_text(f"{type(e).__name__}: {e}\n\n{traceback.format_exc()}")


if __name__ == "__main__":
    jax.config.update("jax_enable_x64", True)
    # compiles in about 60% of the time (XLA's backend optimisations off); the programs, their
    # SPMD partitioning and collectives are the same
    jax.config.update("jax_disable_most_optimizations", True)
    main(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]))
