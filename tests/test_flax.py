"""nlattn.jax: every Flax NNX block against the float64 reference (conformance), jit == eager,
published inits, weight round trips (also for models holding several blocks), atomic loads,
input/config errors and the fast paths' memory shape (no N×M intermediate)."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import nlattn.jax as nj
from nlattn import ConfigError, InputError, WeightError
from nlattn.conformance import CASES, jobs, run_check
from nlattn.conformance.runner import error
from nlattn.jax.conformance import FlaxAdapter, FlaxNaiveAdapter
from nlattn.specs import make_config, random_weights, tensors

jax.config.update("jax_default_matmul_precision", "float32")

TOL = 1e-5
ADAPTERS = {a.name: a for a in (FlaxAdapter(), FlaxNaiveAdapter())}
JOBS = [(name, case, dtype, check) for name, a in ADAPTERS.items() for case, dtype, check in jobs(a)]


# ----------------------------------------------------------------------------------------------
# conformance: every case, eval (with attention maps) / train (running stats) / gradients,
# through the fast paths ("flax") and the materialising paths ("flax-naive")
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("adapter,case,dtype,check", JOBS,
                         ids=[f"{n}-{c.id}-{chk}" for n, c, _, chk in JOBS])
def test_conformance(adapter, case, dtype, check):
    result = run_check(ADAPTERS[adapter], case, dtype, check)
    assert result.passed, result.describe()


def test_conformance_covers_every_block_and_check():
    assert {c.block for _, c, _, _ in JOBS} == set(nj.BLOCKS)
    assert {chk for *_, chk in JOBS} == {"eval", "train", "grad"}
    assert {n for n, *_ in JOBS} == {"flax", "flax-naive"}


def test_conformance_shapes_run_several_query_chunks():
    """The "flax" adapter's small chunk makes the catalogue's softmax cases run several chunks,
    some with a ragged last one; the fast-path blocks really are on their fast path."""
    chunk = FlaxAdapter.query_chunk_size
    softmax = [c for c in CASES if c.block in ("SelfAttention", "PositionAttention")
               or c.config.get("mode", "embedded_gaussian") in ("embedded_gaussian", "gaussian")
               and c.block.startswith("NonLocal")]
    n = [int(np.prod(c.shape[2:])) for c in softmax]
    assert len(softmax) >= 10 and all(k > chunk for k in n) and sum(k % chunk != 0 for k in n) >= 5
    c = softmax[0]
    block = FlaxAdapter().build(c.block, c.config, "float32")
    assert block.implementation == "auto" and block.query_chunk_size == chunk
    assert FlaxNaiveAdapter().build(c.block, c.config, "float32").implementation == "naive"


# ----------------------------------------------------------------------------------------------
# one real (published-init) block of every class
# ----------------------------------------------------------------------------------------------

CONFIGS = {
    "NonLocalBlock1D": dict(in_channels=8),
    "NonLocalBlock2D": dict(in_channels=8, mode="concatenation"),
    "NonLocalBlock3D": dict(in_channels=8, mode="dot_product", bn_layer=False),
    "SelfAttention": dict(in_channels=8, qk_ratio=2),
    "PositionAttention": dict(in_channels=8, qk_ratio=2),
    "ChannelAttention": dict(),
    "CrissCrossAttention": dict(in_channels=8, qk_ratio=2, recurrence=2),
    "RelationAwareAttention": dict(in_channels=8, spatial_size=(3, 4), cha_ratio=2, spa_ratio=2,
                                   down_ratio=2),
    "ExplicitVisualCenter": dict(in_channels=8, num_codes=4, mlp_ratio=1),
    "NonLocalMeans": dict(patch_size=3, patch_distance=1, h=0.5),
    "Scale": dict(init=0.5),
}
SHAPES = {1: (2, 7, 8), 2: (2, 3, 4, 8), 3: (2, 2, 3, 4, 8)}   # channels-last
assert set(CONFIGS) == set(nj.BLOCKS)


def rngs(seed=0):
    """NNX rngs with the "rbg" PRNG: its initialisers compile about twice as fast as threefry's
    (compilation dominates building small blocks on CPU); the inits' distributions are the same."""
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def spec_of(name):
    return make_config(name, **CONFIGS[name])


def input_of(name, seed=0):
    shape = SHAPES[spec_of(name).spatial_dims]
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@pytest.fixture(scope="module")
def fresh():
    """Every class as constructed (published init), one instance each, in eval mode."""
    blocks = {}
    for name, config in CONFIGS.items():
        blocks[name] = nj.BLOCKS[name](**config, rngs=rngs())
        blocks[name].eval()
    return blocks


def random_float32(name, seed=1):
    return {k: v.astype(np.float32) for k, v in
            random_weights(spec_of(name).schema(), np.random.default_rng(seed)).items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype == np.float32, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_published_init(fresh, name):
    block, x = fresh[name], input_of(name)
    w = nj.export_weights(block)
    schema = spec_of(name).schema()
    assert list(w) == list(tensors(schema))
    for layer in schema:                               # constant inits given by the schema
        if getattr(layer, "init", None) is not None:
            np.testing.assert_array_equal(w[layer.name], np.full(layer.shape, layer.init, np.float32))
    if name.startswith("NonLocalBlock"):
        zero = ["bn.weight", "bn.bias"] if spec_of(name).bn_layer else ["W.weight", "W.bias"]
        assert all(not np.any(w[k]) for k in zero)
        assert np.any(w["theta.weight"]) and np.any(w["g.weight"])        # the rest is random
    if name in ("ExplicitVisualCenter",):
        assert np.all(w["l_MLP.layer_scale_1"] == np.float32(1e-5))
        assert np.any(w["conv1.weight"]) and np.all(w["bn1.weight"] == 1)
    identity = name.startswith("NonLocalBlock") or name in (
        "SelfAttention", "PositionAttention", "ChannelAttention", "CrissCrossAttention")
    if identity:                                       # the block starts as the identity
        np.testing.assert_array_equal(np.asarray(block(x)), x)
        if spec_of(name).has_batchnorm:
            block.train()
            try:
                np.testing.assert_array_equal(np.asarray(block(x)), x)
            finally:
                block.eval()


def _outputs(block, x, attention):
    out = block(x, return_attention=True) if attention else block(x)
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_jit_equals_eager(fresh, name):
    """nnx.jit of the block (fast path, and the attention path where there is one) == eager."""
    block = nnx.clone(fresh[name])
    nj.load_weights(block, random_float32(name))
    x = jnp.asarray(input_of(name))
    attention = spec_of(name).attention is not None

    @nnx.jit
    def both(block, x):
        return _outputs(block, x, False), (_outputs(block, x, True) if attention else ())

    got_plain, got_attn = both(block, x)
    want_plain, want_attn = _outputs(block, x, False), (_outputs(block, x, True) if attention else ())
    for got, want in zip(got_plain + got_attn, want_plain + want_attn, strict=True):
        assert got.shape == want.shape and error(got, want) <= TOL
    if attention:   # return_attention=True falls back to the materialising path: same output
        assert error(got_attn[0], got_plain[0]) <= TOL


def test_train_mode_under_jit_updates_running_stats_like_eager(fresh):
    block = nnx.clone(fresh["NonLocalBlock1D"])
    nj.load_weights(block, random_float32("NonLocalBlock1D"))
    twin = nnx.clone(block)
    x = jnp.asarray(input_of("NonLocalBlock1D"))
    block.train(), twin.train()
    got = nnx.jit(lambda m, x: m(x))(block, x)
    want = twin(x)
    assert error(got, want) <= TOL
    a, b = nj.export_weights(block), nj.export_weights(twin)
    assert error(a["bn.running_var"], b["bn.running_var"]) <= TOL
    assert not np.allclose(a["bn.running_mean"], random_float32("NonLocalBlock1D")["bn.running_mean"])


def test_blocks_start_in_training_mode_like_nnx_batchnorm():
    block = nj.NonLocalBlock1D(8, rngs=rngs())
    assert block.bn.use_running_average is False
    block.eval()
    assert block.bn.use_running_average is True


# ----------------------------------------------------------------------------------------------
# weights: round trips, atomic loads, models holding several blocks
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CONFIGS))
def test_export_load_export_is_bit_exact(fresh, name):
    block = nnx.clone(fresh[name])
    w = random_float32(name)
    nj.load_weights(block, w)
    first = nj.export_weights(block)
    assert_same(first, w)
    other = FlaxAdapter().build(name, spec_of(name).to_dict(), "float32")
    nj.load_weights(other, first)
    assert_same(nj.export_weights(other), first)


def test_weight_layouts_are_flax_layouts():
    build = FlaxAdapter().build
    block = build("NonLocalBlock2D", dict(in_channels=4, mode="concatenation"), "float32")
    w = {k: v.astype(np.float32) for k, v in
         random_weights(block.spec.schema(), np.random.default_rng(5)).items()}
    nj.load_weights(block, w)
    np.testing.assert_array_equal(block.theta.kernel[...], w["theta.weight"].transpose(2, 3, 1, 0))  # HWIO
    np.testing.assert_array_equal(block.concat_project.kernel[...],
                                  w["concat_project.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(block.bn.scale[...], w["bn.weight"])
    np.testing.assert_array_equal(block.bn.mean[...], w["bn.running_mean"])
    np.testing.assert_array_equal(block.bn.var[...], w["bn.running_var"])
    evc = build("ExplicitVisualCenter", CONFIGS["ExplicitVisualCenter"], "float32")
    we = random_float32("ExplicitVisualCenter")
    nj.load_weights(evc, we)
    np.testing.assert_array_equal(evc.lvc.fc[0].kernel[...], we["lvc.fc.0.weight"].T)     # (in, out)
    np.testing.assert_array_equal(evc.l_MLP.dw.dconv.conv.kernel[...],                    # depthwise
                                  we["l_MLP.dw.dconv.conv.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(evc.l_MLP.norm1.scale[...], we["l_MLP.norm1.weight"])
    np.testing.assert_array_equal(evc.lvc.LVC[3].codewords[...], we["lvc.LVC.3.codewords"])
    rga = build("RelationAwareAttention", CONFIGS["RelationAwareAttention"], "float32")
    assert rga.W_spatial[2] is None and rga.W_spatial[3].kernel[...].shape[-1] == 1


def test_load_is_atomic_and_lists_every_problem(fresh):
    block = nnx.clone(fresh["NonLocalBlock1D"])
    before = nj.export_weights(block)
    w = random_float32("NonLocalBlock1D")
    bad = dict(w, extra=np.zeros(3, np.float32))
    del bad["g.bias"]
    bad["W.weight"] = bad["W.weight"][..., None]
    bad["phi.bias"] = np.full_like(w["phi.bias"], np.nan)
    bad["bn.bias"] = w["bn.bias"].astype(np.int32)
    with pytest.raises(WeightError) as info:
        nj.load_weights(block, bad)
    problems = "\n".join(info.value.problems)
    for needle in ("missing 'g.bias'", "unexpected 'extra'", "'W.weight' has shape", "'phi.bias' has non-finite",
                   "'bn.bias' has dtype int32"):
        assert needle in problems
    assert len(info.value.problems) == 5
    assert_same(nj.export_weights(block), before)


class Model(nnx.Module):
    """A user model holding nlattn blocks in attributes and a list."""

    def __init__(self, rngs):
        self.stem = nnx.Conv(8, 8, (1, 1), rngs=rngs)
        self.stage = nnx.List([nj.Scale(0.5), nj.NonLocalBlock2D(8, mode="dot_product", rngs=rngs)])
        self.head = nj.SelfAttention(8, qk_ratio=2, rngs=rngs)

    def __call__(self, x):
        for block in self.stage:
            x = block(x)
        return self.head(self.stem(x))


def test_model_holding_several_blocks():
    model = Model(rngs())
    model.eval()
    names = nj.export_weights(model)
    assert {"stage.0.gamma", "stage.1.g.weight", "head.query_conv.weight"} <= set(names)
    assert not any(k.startswith("stem") for k in names)
    parts = {"stage.0": "Scale", "stage.1": "NonLocalBlock2D", "head": "SelfAttention"}
    w = {}
    for seed, (prefix, block) in enumerate(parts.items()):
        spec = {"stage.0": make_config("Scale", init=0.5),
                "stage.1": make_config("NonLocalBlock2D", in_channels=8, mode="dot_product"),
                "head": make_config("SelfAttention", in_channels=8, qk_ratio=2)}[prefix]
        w.update({f"{prefix}.{k}": v.astype(np.float32)
                  for k, v in random_weights(spec.schema(), np.random.default_rng(seed)).items()})
    nj.load_weights(model, w)
    assert_same(nj.export_weights(model), w)
    other = Model(rngs(1))
    nj.load_weights(other, nj.export_weights(model))
    assert_same(nj.export_weights(other), w)

    # atomic across blocks: a problem in the last block leaves the first ones untouched too
    changed = {k: v + 1 for k, v in w.items()}
    del changed["head.gamma"]
    changed["nowhere.weight"] = np.zeros(2, np.float32)
    with pytest.raises(WeightError) as info:
        nj.load_weights(model, changed)
    assert any("'head.gamma'" in p for p in info.value.problems)
    assert any("'nowhere.weight'" in p for p in info.value.problems)
    assert_same(nj.export_weights(model), w)
    with pytest.raises(TypeError, match="holds none"):
        nj.export_weights(nnx.Linear(2, 2, rngs=rngs()))


# ----------------------------------------------------------------------------------------------
# errors, options, imports
# ----------------------------------------------------------------------------------------------

def test_input_errors(fresh):
    nl, rga = fresh["NonLocalBlock1D"], fresh["RelationAwareAttention"]
    with pytest.raises(InputError, match=r"NonLocalBlock1D: expected a rank-3 channels-last input"):
        nl(jnp.zeros((2, 7, 7, 8)))
    with pytest.raises(InputError, match=r"expected 8 channels, got 5"):
        nl(jnp.zeros((2, 7, 5)))
    with pytest.raises(InputError, match=r"floating-point input, got dtype int32"):
        nl(jnp.zeros((2, 7, 8), jnp.int32))
    with pytest.raises(InputError, match=r"sub_sample"):
        nl(jnp.zeros((2, 1, 8)))
    with pytest.raises(InputError, match=r"built for spatial size \(3, 4\)"):
        rga(jnp.zeros((2, 4, 3, 8)))
    with pytest.raises(InputError, match=r"Scale: expected a floating-point input"):
        fresh["Scale"](jnp.zeros((2,), jnp.int32))


def test_config_errors():
    with pytest.raises(ConfigError, match=r"implementation must be one of \('auto', 'naive'\), got 'fast'"):
        nj.SelfAttention(8, implementation="fast")
    with pytest.raises(ConfigError, match="query_chunk_size must be an integer >= 1"):
        nj.NonLocalBlock2D(8, query_chunk_size=0)
    with pytest.raises(ConfigError, match="in_channels"):
        nj.NonLocalBlock2D(0)
    with pytest.raises(TypeError, match="multiple values"):
        nj.SelfAttention(8, in_channels=8)
    for name in ("ChannelAttention", "NonLocalMeans", "Scale"):   # no fast path: both resolve to naive
        assert nj.BLOCKS[name](implementation="auto").implementation == "naive"


def test_every_config_field_is_a_keyword():
    for config in (dict(in_channels=4, inter_channels=2, mode="gaussian", sub_sample=False, bn_layer=False,
                        scale=0.5, num_heads=2, value_channels=4, bn_eps=1e-3, bn_momentum=0.2),
                   dict(in_channels=4, pool_first=True, share_query_key=True)):
        block = nnx.eval_shape(lambda: nj.NonLocalBlock3D(**config, implementation="naive", query_chunk_size=4))
        assert block.spec == make_config("NonLocalBlock3D", **config)
        assert (block.implementation, block.query_chunk_size) == ("naive", 4)


def test_import_isolation_and_missing_framework_message():
    code = ("import sys, nlattn.jax; "
            "bad = [m for m in ('torch', 'tensorflow', 'keras') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
    code = ("import sys; sys.modules['flax'] = None\n"
            "try:\n    import nlattn.jax\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert "pip install nlattn[jax]" in out


# ----------------------------------------------------------------------------------------------
# fast paths: exact (conformance above), and never an N×M intermediate
# ----------------------------------------------------------------------------------------------

FAST = [("NonLocalBlock2D", dict(in_channels=4, mode=m)) for m in
        ("embedded_gaussian", "gaussian", "dot_product", "concatenation")] + [
        ("SelfAttention", dict(in_channels=4, qk_ratio=2)), ("PositionAttention", dict(in_channels=4, qk_ratio=4))]


def _intermediate_shapes(fn, *args):
    """Shapes of every value the traced ``fn`` computes, sub-computations (scan bodies ...) included."""
    shapes = set()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            shapes.update(tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
            for p in eqn.params.values():
                for q in (p if isinstance(p, (tuple, list)) else (p,)):
                    if hasattr(q, "eqns"):
                        walk(q)
                    elif hasattr(getattr(q, "jaxpr", None), "eqns"):
                        walk(q.jaxpr)
    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return shapes


@pytest.mark.parametrize("name,config", FAST, ids=[f"{n}-{c.get('mode', '')}" for n, c in FAST])
def test_fast_path_never_forms_the_relation_matrix(name, config):
    """N = 11·13 = 143 queries, M = 5·6 = 30 keys (pooled) or 143: the naive path has an (N, M)
    intermediate, the fast path (forward and gradient) none with both sizes."""
    x = jnp.ones((1, 11, 13, 4))
    n = 143
    m = 30 if name.startswith("NonLocal") else 143
    paths = {}
    for impl in ("naive", "auto"):
        block = nnx.eval_shape(lambda: nj.BLOCKS[name](**config, implementation=impl, query_chunk_size=16))
        graphdef, state = nnx.split(block)
        fwd = lambda s, x: nnx.merge(graphdef, s)(x)                        # noqa: E731
        grad = jax.grad(lambda s, x: jnp.sum(fwd(s, x)), argnums=(0, 1))
        paths[impl] = _intermediate_shapes(fwd, state, x) | _intermediate_shapes(grad, state, x)
    has_nm = lambda shapes: any(s.count(n) >= 2 if n == m else n in s and m in s for s in shapes)  # noqa: E731
    assert has_nm(paths["naive"])
    assert not has_nm(paths["auto"])
