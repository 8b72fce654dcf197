"""Flax NNX on 2 and 4 devices (CPU devices made by ``XLA_FLAGS=--xla_force_host_platform_device_count=4``),
float64: a training step on a batch split over the devices equals the single-device step on the
whole batch — under ``nnx.jit`` with a ``NamedSharding``-sharded batch, and under ``nnx.shard_map``
with ``bn_axis_name`` — for every block with BatchNorm and SelfAttention; without an axis name
each device keeps its own statistics; ``context_parallel`` splits one input's query positions and
equals both the single-device step and the float64 reference (outputs and gradients).

This pytest process already runs JAX with one CPU device, so the steps run in two worker
processes (tests/flax_distributed_worker.py, started together once for the module) and the tests
assert on what they wrote. Problems that need no device (errors, tracing) run here."""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh

import nlattn.jax as nj
from conftest import ONE_CASE_PER_BLOCK
from nlattn import ConfigError
from nlattn.conformance.runner import TOLERANCE
from nlattn.numpy_ref import run as reference

# one xdist worker runs the whole module: its module-scoped fixture starts the device processes once
pytestmark = pytest.mark.xdist_group("flax_distributed")

WORKER = Path(__file__).with_name("flax_distributed_worker.py")
BATCH_NORM_BLOCKS = [b for b, c in ONE_CASE_PER_BLOCK.items() if c.has_batchnorm] + ["SelfAttention"]
DEVICES = 4


def last(shape) -> list[int]:
    """A channels-first shape as the channels-last one Flax takes."""
    return [shape[0], *shape[2:], shape[1]]


def _data(block: str, route: str) -> dict:
    case = ONE_CASE_PER_BLOCK[block]
    shape = last([2 * DEVICES, *case.shape[1:]])  # 2 rows per device
    return dict(id=f"{route}-{block}", route=route, block=block, config=case.config, shape=shape, world=DEVICES)


DATA = [_data(b, route) for route in ("jit", "shard_map") for b in BATCH_NORM_BLOCKS] + [
    _data("NonLocalBlock2D", "unsynchronised")
]

#: (block, config, options, channels-last shape): odd sizes off the split axis; the split one
#: divides into 2 and 4 shards of whole pooling windows
CONTEXT = [
    ("NonLocalBlock2D", dict(in_channels=8), {}, (2, 8, 5, 8)),
    ("NonLocalBlock2D", dict(in_channels=8, mode="dot_product", sub_sample=False), {}, (2, 4, 7, 8)),
    ("NonLocalBlock2D", dict(in_channels=8, mode="gaussian", num_heads=2, bn_layer=False), {}, (2, 8, 3, 8)),
    ("NonLocalBlock2D", dict(in_channels=8, mode="concatenation", share_query_key=True), {}, (2, 8, 3, 8)),
    ("NonLocalBlock1D", dict(in_channels=4, pool_first=True), {}, (2, 16, 4)),
    ("NonLocalBlock3D", dict(in_channels=4, mode="dot_product"), {}, (2, 4, 4, 5, 4)),
    ("NonLocalBlock3D", dict(in_channels=4), dict(implementation="naive"), (2, 4, 3, 5, 4)),
    ("SelfAttention", dict(in_channels=16), {}, (2, 4, 5, 16)),
    ("PositionAttention", dict(in_channels=8, qk_ratio=2), {}, (2, 8, 3, 8)),
]
CONTEXT_IDS = [f"{b}-{c.get('mode', '')}{o.get('implementation', '')}" for b, c, o, _ in CONTEXT]


def _context(i: int, world: int) -> dict:
    block, config, options, shape = CONTEXT[i]
    options = {"query_chunk_size": 5, **options} if nj.BLOCKS[block].config_class.query_chunked else options
    return dict(
        id=f"context{world}-{CONTEXT_IDS[i]}",
        route="context",
        block=block,
        config=config,
        options=options,
        shape=list(shape),
        world=world,
    )


CONTEXT_PROBLEMS = [_context(i, world) for i in range(len(CONTEXT)) for world in (2, 4)]
UNEVEN = dict(
    id="context2-uneven",
    route="context",
    block="NonLocalBlock2D",
    config=dict(in_channels=4),
    shape=[1, 6, 5, 4],
    world=2,
)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Both workers run at once (data parallel, context parallel: about as long each); returns
    their output folder."""
    out = tmp_path_factory.mktemp("flax_distributed")
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={DEVICES}"
    env = {**os.environ, "XLA_FLAGS": flags.strip(), "JAX_PLATFORMS": "cpu"}
    procs = {}
    try:
        for name, problems in (("data", DATA), ("context", [*CONTEXT_PROBLEMS, UNEVEN])):
            (out / f"{name}.json").write_text(json.dumps(problems))
            with open(out / f"{name}.log", "w") as log:
                procs[name] = subprocess.Popen(
                    [sys.executable, str(WORKER), str(out / f"{name}.json"), str(out)],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
        for name, p in procs.items():
            assert p.wait(timeout=600) == 0, (out / f"{name}.log").read_text()[-3000:]
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


def load(results: Path, problem: dict) -> dict:
    err = results / f"{problem['id']}.err"
    assert not err.exists(), err.read_text()
    return dict(np.load(results / f"{problem['id']}.npz"))


def close(a, b, tol=1e-10):
    return np.max(np.abs(a - b), initial=0.0) <= tol * max(1.0, np.max(np.abs(b), initial=0.0))


#: nnx.BatchNorm stores running statistics in float32 whatever ``param_dtype``: one float32 rounding
STAT_TOL = 2.0**-23


def keys(got: dict, kind: str) -> list[str]:
    names = [k.removeprefix("one.") for k in got if k.startswith(f"one.{kind}:")]
    assert names and all(f"many.{k}" in got for k in names), kind
    return names


def assert_same_step(got: dict, check_stats: bool = True):
    """The multi-device step equals the single-device one: output, input gradient, parameter
    gradients (the multi-device ones are already summed over the devices), running statistics."""
    assert close(got["many.out"], got["one.out"])
    assert close(got["many.dx"], got["one.dx"])
    for key in keys(got, "grad"):
        assert close(got[f"many.{key}"], got[f"one.{key}"]), key
    if check_stats and any(k.startswith("one.stat:") for k in got):
        for key in keys(got, "stat"):
            assert close(got[f"many.{key}"], got[f"one.{key}"], STAT_TOL), key
            assert not close(got[f"one.{key}"], got[f"w:{key.removeprefix('stat:')}"], 1e-3), key  # updated


@pytest.mark.parametrize("block", BATCH_NORM_BLOCKS)
def test_jit_with_a_sharded_batch_equals_the_single_device_step(block, results):
    """nnx.jit, the batch placed by NamedSharding(mesh, P("data")) over 4 devices, the model
    replicated: XLA's SPMD partitioner computes the global batch's statistics, no axis name."""
    got = load(results, _data(block, "jit"))
    assert str(got["many.spec"]) == str(jax.sharding.PartitionSpec("data"))  # the output stays sharded
    assert_same_step(got)


@pytest.mark.parametrize("block", BATCH_NORM_BLOCKS)
def test_shard_map_with_bn_axis_name_equals_the_single_device_step(block, results):
    """nnx.shard_map over 4 devices, 2 rows each, blocks built with ``bn_axis_name="data"``:
    BatchNorm moments averaged over the axis; the replicated parameters' gradients come out of
    shard_map summed over the devices."""
    assert_same_step(load(results, _data(block, "shard_map")))


def test_shard_map_without_an_axis_name_keeps_each_devices_statistics(results):
    got = load(results, _data("NonLocalBlock2D", "unsynchronised"))
    for r in range(DEVICES):  # each device: the single-device step on its own 2 rows
        assert close(got["many.out"][2 * r : 2 * r + 2], got[f"many.own.out@{r}"])
        for key in ("stat:bn.running_mean", "stat:bn.running_var"):
            assert close(got[f"many.{key}@{r}"], got[f"many.own.{key}@{r}"], STAT_TOL), key
    assert not close(got["many.stat:bn.running_var@0"], got["many.stat:bn.running_var@1"], 1e-3)


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("index", range(len(CONTEXT)), ids=CONTEXT_IDS)
def test_context_parallel_step_equals_the_single_device_step_and_the_reference(index, world, results):
    """Query positions split over 2 or 4 devices along the first spatial axis: output (sharded
    the same way), input and parameter gradients and running statistics equal the single-device
    step; the output equals the float64 reference, and the gradients its directional
    derivatives (central differences, the conformance runner's float64 tolerance)."""
    problem = _context(index, world)
    got = load(results, problem)
    assert str(got["many.spec"]) == str(jax.sharding.PartitionSpec(None, "context"))
    assert_same_step(got)
    block, config = problem["block"], problem["config"]
    x, cot = np.moveaxis(got["x"], -1, 1), np.moveaxis(got["cotangent"], -1, 1)  # the reference: channels-first
    weights = {k[2:]: v for k, v in got.items() if k.startswith("w:")}
    assert close(np.moveaxis(got["many.out"], -1, 1), reference(block, x, weights, config, training=True))

    scale = np.sqrt(np.sum(cot * cot))  # a unit cotangent (round-off ∝ |f| / eps), the gradients / scale

    def f(t, dx, dw):
        w = {k: v + t * dw[k] if k in dw else v for k, v in weights.items()}
        out = reference(block, x + t * dx, w, config, training=True, for_derivative=True)
        return float(np.sum(cot / scale * out))

    def directional(dx, dw, eps=1e-5):
        return (f(eps, dx, dw) - f(-eps, dx, dw)) / (2 * eps)

    rng = np.random.default_rng(2)  # unit directions, as the conformance runner's (truncation ∝ |d|³)
    dx = rng.normal(size=x.shape)
    dx /= np.sqrt(np.sum(dx * dx))
    dw = {k.removeprefix("grad:"): rng.normal(size=got[f"many.{k}"].shape) for k in keys(got, "grad")}
    norm = np.sqrt(sum(np.sum(v * v) for v in dw.values()))
    dw = {k: v / norm for k, v in dw.items()}
    along_x = np.sum(np.moveaxis(got["many.dx"], -1, 1) * dx) / scale
    assert close(along_x, directional(dx, {}), TOLERANCE["float64"])
    along_w = sum(float(np.sum(got[f"many.grad:{k}"] * v)) for k, v in dw.items()) / scale
    assert close(along_w, directional(np.zeros_like(x), dw), TOLERANCE["float64"])


def test_context_parallel_refuses_uneven_shards(results):
    """6 rows over 2 devices: 3 each, not whole 2-row pooling windows (a real 2-device mesh)."""
    err = results / f"{UNEVEN['id']}.err"
    assert err.exists() and err.read_text().startswith(
        "ValueError: NonLocalBlock2D: context parallelism splits the first spatial axis into 2 equal shards "
        "of whole 2-row pooling windows; 6 rows do not split so (use a size divisible by 4)"
    )


# ----------------------------------------------------------------------------------------------
# here, on one device: keywords, conversion, refusals, and what a device holds (tracing only)
# ----------------------------------------------------------------------------------------------


def abstract(cls, *args, **kwargs):
    """A module built by ``nnx.eval_shape``: its structure without running (compiling) an initialiser."""
    return nnx.eval_shape(lambda: cls(*args, **kwargs))


def test_bn_axis_name_is_a_keyword_of_the_blocks_with_batch_norm():
    """``bn_axis_name`` goes to every nnx.BatchNorm of a block (EVC's 9, RGA's 12); blocks without
    BatchNorm refuse it as an unknown option; it is no config field (the spec is unchanged)."""
    evc = abstract(nj.ExplicitVisualCenter, 8, num_codes=4, bn_axis_name="data")
    bns = nj.distributed.batch_norms(evc)
    assert len(bns) == 9 and {bn.axis_name for bn in bns} == {"data"} and evc.bn_axis_name == "data"
    assert evc.spec == abstract(nj.ExplicitVisualCenter, 8, num_codes=4).spec
    assert "bn_axis_name" not in evc.spec.to_dict()
    assert {bn.axis_name for bn in nj.distributed.batch_norms(abstract(nj.NonLocalBlock1D, 4))} == {None}
    assert "bn_axis_name" in inspect.signature(nj.NonLocalBlock3D).parameters
    assert "bn_axis_name" not in inspect.signature(nj.SelfAttention).parameters
    with pytest.raises(ConfigError, match="SelfAttention.*unknown option.*bn_axis_name"):
        abstract(nj.SelfAttention, 16, bn_axis_name="data")


def test_convert_sync_batchnorm_sets_the_axis_inside_blocks_only():
    class Model(nnx.Module):
        def __init__(self):
            self.bn = nnx.BatchNorm(4, rngs=nnx.Rngs(0))
            rga = ONE_CASE_PER_BLOCK["RelationAwareAttention"].config
            self.stage = nnx.List([nj.RelationAwareAttention(**rga), nj.SelfAttention(8)])

    model = abstract(Model)
    before = nnx.state(model)
    assert nj.convert_sync_batchnorm(model, "batch") is model
    rga = model.stage[0]
    assert len(nj.distributed.batch_norms(rga)) == 12 and rga.bn_axis_name == "batch"
    assert {bn.axis_name for bn in nj.distributed.batch_norms(rga)} == {"batch"} and model.bn.axis_name is None
    after = nnx.state(model)  # the same variables: the axis is a static attribute
    assert jax.tree.structure(after) == jax.tree.structure(before)
    assert all(a is b for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before), strict=True))
    nj.convert_sync_batchnorm(model, None)
    assert {bn.axis_name for bn in nj.distributed.batch_norms(rga)} == {None}


def test_context_parallel_refusals():
    mesh = AbstractMesh((4,), ("context",))
    with pytest.raises(TypeError, match="ChannelAttention has no query/key split"):
        nj.context_parallel(abstract(nj.ChannelAttention), mesh, "context")
    with pytest.raises(ValueError, match="no axis 'data'"):
        nj.context_parallel(abstract(nj.SelfAttention, 16), mesh, "data")
    cp = nj.context_parallel(abstract(nj.SelfAttention, 16), mesh, "context")
    message = re.escape(
        "SelfAttention: context parallelism splits the first spatial axis into 4 equal shards; "
        "6 rows do not split so (use a size divisible by 4)"
    )
    with pytest.raises(ValueError, match=message):
        cp(jnp.ones((1, 6, 5, 16)))
    with pytest.raises(ValueError, match=message):
        cp.shard(np.ones((1, 6, 5, 16)))
    nl = nj.context_parallel(abstract(nj.NonLocalBlock1D, 4), mesh, "context")
    with pytest.raises(ValueError, match=r"NonLocalBlock1D: .*4 equal shards of whole 2-row pooling .* 12 rows"):
        nl(jnp.ones((1, 12, 4)))  # 3 rows per device
    assert nj.context_parallel(abstract(nj.NonLocalBlock3D, 4), mesh, "context").check((1, 4, 3, 5, 4)) is None


def _intermediate_shapes(jaxpr) -> set:
    shapes = set()
    for eqn in jaxpr.eqns:
        shapes.update(tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
        for p in eqn.params.values():
            for q in p if isinstance(p, (tuple, list)) else (p,):
                inner = q if hasattr(q, "eqns") else getattr(q, "jaxpr", None)
                if hasattr(inner, "eqns"):
                    shapes |= _intermediate_shapes(inner)
    return shapes


@pytest.mark.parametrize(
    "name, config",
    [("NonLocalBlock2D", dict(in_channels=4, sub_sample=False)), ("SelfAttention", dict(in_channels=4, qk_ratio=2))],
)
def test_a_device_holds_its_queries_and_the_keys_never_the_relation(name, config):
    """Traced over an abstract 4-device mesh (nothing runs): 12·13 = 156 positions, 39 queries
    per device, 156 keys. Forward and gradient hold no (39, 156) block on the fast path, and
    nothing at the whole input's spatial size (12, 13): a device holds its 3 rows."""
    x = jnp.ones((1, 12, 13, 4))
    for impl, has_block in (("naive", True), ("auto", False)):
        block = nnx.eval_shape(lambda impl=impl: nj.BLOCKS[name](**config, implementation=impl, query_chunk_size=8))
        cp = nj.context_parallel(block, AbstractMesh((4,), ("context",)), "context")
        graphdef, state = nnx.split(cp)
        fwd = lambda s, x, graphdef=graphdef: nnx.merge(graphdef, s)(x)  # noqa: E731
        grad = jax.grad(lambda s, x, fwd=fwd: jnp.sum(fwd(s, x)), argnums=(0, 1))
        local = set()
        for jaxpr in (jax.make_jaxpr(fwd)(state, x), jax.make_jaxpr(grad)(state, x)):
            bodies = [e.params["jaxpr"] for e in jaxpr.jaxpr.eqns if e.primitive.name == "shard_map"]
            assert bodies
            for body in bodies:
                local |= _intermediate_shapes(getattr(body, "jaxpr", body))
        assert any(39 in s and 156 in s for s in local) == has_block, impl
        assert not any((12, 13) == s[i : i + 2] for s in local for i in range(len(s) - 1)), impl
        assert any((3, 13) == s[1:3] for s in local), impl
