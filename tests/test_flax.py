"""What only nlattn.jax has: nnx.jit == eager, train mode under jit, Flax layouts and nnx paths,
.msgpack files of 0.1, the kernels, the fast paths' memory shape (no N×M intermediate), and the
computation ``dtype`` apart from ``param_dtype`` (mixed precision).

Conformance, inits, weight round trips and errors are checked for every framework alike in
tests/test_blocks.py."""

import subprocess
import sys
from pathlib import Path
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, serialization

import nlattn
import nlattn.jax as nj
from conftest import ONE_CASE_PER_BLOCK
from nlattn import WeightError
from nlattn.conformance import CASES
from nlattn.conformance.runner import error
from nlattn.jax import kernels
from nlattn.jax._base import PointwiseConv, Sequential
from nlattn.jax.conformance import FlaxAdapter, FlaxMixedAdapter, FlaxNaiveAdapter
from nlattn.jax.nl_means import fast_exp
from nlattn.numpy_ref import nl_means as nl_means_ref
from nlattn.numpy_ref import run as reference
from nlattn.specs import make_config, random_weights

jax.config.update("jax_default_matmul_precision", "float32")

TOL = 1e-5


def test_conformance_shapes_run_several_query_chunks():
    """The "flax" adapter's small chunk makes the catalogue's softmax cases run several chunks,
    some with a ragged last one; the fast-path blocks really are on their fast path."""
    chunk = FlaxAdapter.query_chunk_size
    softmax = [
        c
        for c in CASES
        if c.block in ("SelfAttention", "PositionAttention")
        or c.config.get("mode", "embedded_gaussian") in ("embedded_gaussian", "gaussian")
        and c.block.startswith("NonLocal")
    ]
    n = [int(np.prod(c.shape[2:])) for c in softmax]
    assert len(softmax) >= 10 and all(k > chunk for k in n) and sum(k % chunk != 0 for k in n) >= 5
    c = softmax[0]
    block = FlaxAdapter().build(c.block, c.config, "float32")
    assert block.implementation == "auto" and block.query_chunk_size == chunk
    assert FlaxNaiveAdapter().build(c.block, c.config, "float32").implementation == "naive"


# ----------------------------------------------------------------------------------------------
# one real (published-init) block of every class
# ----------------------------------------------------------------------------------------------

#: blocks named here run on SHAPES with options chosen for a second look; any other block takes its
#: first catalogue case's config and shape, so a new block joins every test below with no edit here
CHOSEN = {
    "NonLocalBlock1D": dict(in_channels=8),
    "NonLocalBlock2D": dict(in_channels=8, mode="concatenation"),
    "NonLocalBlock3D": dict(in_channels=8, mode="dot_product", bn_layer=False),
    "SelfAttention": dict(in_channels=8, qk_ratio=2),
    "PositionAttention": dict(in_channels=8, qk_ratio=2),
    "ChannelAttention": dict(),
    "CrissCrossAttention": dict(in_channels=8, qk_ratio=2, recurrence=2),
    "RelationAwareAttention": dict(in_channels=8, spatial_size=(3, 4), cha_ratio=2, spa_ratio=2, down_ratio=2),
    "ExplicitVisualCenter": dict(in_channels=8, num_codes=4, mlp_ratio=1),
    "NonLocalMeans": dict(patch_size=3, patch_distance=1, h=0.5),
    "Scale": dict(init=0.5),
    "GlobalContext": dict(in_channels=8, ratio=0.5, channel_mul=True),
    "DisentangledNonLocal1D": dict(in_channels=8),
    "DisentangledNonLocal2D": dict(in_channels=8, bn_layer=False, use_scale=False),
    "DisentangledNonLocal3D": dict(in_channels=8, temperature=0.5),
}
SHAPES = {1: (2, 7, 8), 2: (2, 3, 4, 8), 3: (2, 2, 3, 4, 8)}  # channels-last
CONFIGS = {name: CHOSEN.get(name, case.config) for name, case in ONE_CASE_PER_BLOCK.items()}
assert set(CONFIGS) == set(nj.BLOCKS)


def rngs(seed=0):
    """NNX rngs with the "rbg" PRNG: its initialisers compile about twice as fast as threefry's
    (compilation dominates building small blocks on CPU); the inits' distributions are the same."""
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def spec_of(name):
    return make_config(name, **CONFIGS[name])


def shape_of(name):
    """The channels-last input shape of a block of ``CONFIGS``."""
    if name in CHOSEN:
        return SHAPES[spec_of(name).spatial_dims]
    b, c, *spatial = ONE_CASE_PER_BLOCK[name].shape
    return (b, *spatial, c)


def input_of(name, seed=0):
    shape = shape_of(name)
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
    return {
        k: v.astype(np.float32) for k, v in random_weights(spec_of(name).schema(), np.random.default_rng(seed)).items()
    }


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype == np.float32, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


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
    if attention:  # return_attention=True falls back to the materialising path: same output
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


def test_weight_layouts_are_flax_layouts():
    build = FlaxAdapter().build
    block = build("NonLocalBlock2D", dict(in_channels=4, mode="concatenation"), "float32")
    w = {k: v.astype(np.float32) for k, v in random_weights(block.spec.schema(), np.random.default_rng(5)).items()}
    nj.load_weights(block, w)
    np.testing.assert_array_equal(block.theta.kernel[...], w["theta.weight"].transpose(2, 3, 1, 0))  # HWIO
    np.testing.assert_array_equal(block.concat_project.kernel[...], w["concat_project.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(block.bn.scale[...], w["bn.weight"])
    np.testing.assert_array_equal(block.bn.mean[...], w["bn.running_mean"])
    np.testing.assert_array_equal(block.bn.var[...], w["bn.running_var"])
    evc = build("ExplicitVisualCenter", CONFIGS["ExplicitVisualCenter"], "float32")
    we = random_float32("ExplicitVisualCenter")
    nj.load_weights(evc, we)
    np.testing.assert_array_equal(evc.lvc.fc[0].kernel[...], we["lvc.fc.0.weight"].T)  # (in, out)
    np.testing.assert_array_equal(
        evc.l_MLP.dw.dconv.conv.kernel[...],  # depthwise
        we["l_MLP.dw.dconv.conv.weight"].transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(evc.l_MLP.norm1.scale[...], we["l_MLP.norm1.weight"])
    np.testing.assert_array_equal(evc.lvc.LVC[3].codewords[...], we["lvc.LVC.3.codewords"])
    rga = build("RelationAwareAttention", CONFIGS["RelationAwareAttention"], "float32")
    assert rga.W_spatial[2] is jax.nn.relu and rga.W_spatial[3].kernel[...].shape[-1] == 1  # Sequential
    assert isinstance(rga.W_spatial, Sequential) and len(rga.W_spatial) == 5
    assert evc.lvc.LVC[3].scale[...].shape == (4,) and len(evc.lvc.LVC) == 7 and len(evc.lvc.fc) == 2


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
    assert {path: type(b).__name__ for path, b in nj.blocks(model)} == {
        "stage.0": "Scale",
        "stage.1": "NonLocalBlock2D",
        "head": "SelfAttention",
    }
    parts = {"stage.0": "Scale", "stage.1": "NonLocalBlock2D", "head": "SelfAttention"}
    w = {}
    for seed, prefix in enumerate(parts):
        spec = {
            "stage.0": make_config("Scale", init=0.5),
            "stage.1": make_config("NonLocalBlock2D", in_channels=8, mode="dot_product"),
            "head": make_config("SelfAttention", in_channels=8, qk_ratio=2),
        }[prefix]
        w.update(
            {
                f"{prefix}.{k}": v.astype(np.float32)
                for k, v in random_weights(spec.schema(), np.random.default_rng(seed)).items()
            }
        )
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
    with pytest.raises(TypeError, match="contains no nlattn block"):
        nj.export_weights(nnx.Linear(2, 2, rngs=rngs()))


FIXTURES = sorted((Path(__file__).parent / "fixtures" / "v0.1").glob("*.safetensors"))


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_weight_files_written_by_v0_1_still_load(path):
    """The canonical ``.safetensors`` and the Flax ``.msgpack`` (an ``nnx.state`` pure dict) written
    by nlattn 0.1 both load into a fresh block and give the same weights; so does a fresh block's
    own state written the same way (its ``nnx.state`` paths are those of 0.1)."""
    ckpt = nlattn.load_file(path)
    block = nj.BLOCKS[ckpt.block](**ckpt.config, rngs=rngs())
    nj.load_weights(block, ckpt.weights)
    want = {k: np.asarray(v) for k, v in ckpt.weights.items()}
    assert_same(nj.export_weights(block), want)

    data = serialization.msgpack_restore(path.with_suffix(".msgpack").read_bytes())
    other = nj.BLOCKS[ckpt.block](**ckpt.config, rngs=rngs(1))
    state = nnx.state(other)
    nnx.replace_by_pure_dict(state, data)
    nnx.update(other, state)
    assert_same(nj.export_weights(other), want)
    written = serialization.msgpack_restore(serialization.msgpack_serialize(nnx.to_pure_dict(nnx.state(block))))
    assert jax.tree.structure(written) == jax.tree.structure(data)
    for a, b in zip(jax.tree.leaves(written), jax.tree.leaves(data), strict=True):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------------------------
# errors, options, imports
# ----------------------------------------------------------------------------------------------


def test_import_isolation_and_missing_framework_message():
    code = (
        "import sys, nlattn.jax; "
        "bad = [m for m in ('torch', 'tensorflow', 'keras') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    code = (
        "import sys; sys.modules['flax'] = None\ntry:\n    import nlattn.jax\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert "pip install nlattn[jax]" in out


# ----------------------------------------------------------------------------------------------
# fast paths: exact (conformance above), and never an N×M intermediate
# ----------------------------------------------------------------------------------------------


def test_kernels_equal_the_materialised_relations():
    """Each kernel of kernels.py (heads-first, 1/M included) against A v with A formed, two heads,
    a ragged last query chunk."""
    r = np.random.default_rng(0)
    q, k = (jnp.asarray(r.normal(size=(2, 2, n, 3)), jnp.float32) for n in (11, 7))
    v = jnp.asarray(r.normal(size=(2, 2, 7, 5)), jnp.float32)
    a, b = q[..., 0], k[..., 0]
    e = q @ jnp.swapaxes(k, -1, -2)
    cases = [
        (kernels.softmax_attention(q, k, v, 0.5, query_chunk_size=4), jax.nn.softmax(0.5 * e) @ v),
        (kernels.softmax_attention(q, k, v), kernels.softmax(e) @ v),
        (kernels.dot_product_attention(q, k, v, 0.5), 0.5 * e / 7 @ v),
        (kernels.concatenation_attention(a, b, v), jax.nn.relu(a[..., :, None] + b[..., None, :]) / 7 @ v),
    ]
    for got, want in cases:
        assert got.shape == (2, 2, 11, 5) and error(got, want) <= TOL


FAST = [
    ("NonLocalBlock2D", dict(in_channels=4, mode=m))
    for m in ("embedded_gaussian", "gaussian", "dot_product", "concatenation")
] + [
    ("SelfAttention", dict(in_channels=4, qk_ratio=2)),
    ("PositionAttention", dict(in_channels=4, qk_ratio=4)),
    ("DisentangledNonLocal2D", dict(in_channels=4)),
]


def _intermediate_shapes(fn, *args):
    """Shapes of every value the traced ``fn`` computes, sub-computations (scan bodies ...) included."""
    shapes = set()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            shapes.update(tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
            for p in eqn.params.values():
                for q in p if isinstance(p, (tuple, list)) else (p,):
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
        block = nnx.eval_shape(lambda impl=impl: nj.BLOCKS[name](**config, implementation=impl, query_chunk_size=16))
        graphdef, state = nnx.split(block)
        fwd = lambda s, x, graphdef=graphdef: nnx.merge(graphdef, s)(x)
        grad = jax.grad(lambda s, x, fwd=fwd: jnp.sum(fwd(s, x)), argnums=(0, 1))
        paths[impl] = _intermediate_shapes(fwd, state, x) | _intermediate_shapes(grad, state, x)
    has_nm = lambda shapes: any(s.count(n) >= 2 if n == m else n in s and m in s for s in shapes)  # noqa: E731
    assert has_nm(paths["naive"])
    assert not has_nm(paths["auto"])


# ----------------------------------------------------------------------------------------------
# precision: the computation dtype apart from the parameters' (NNX), float32 attention cores
# ----------------------------------------------------------------------------------------------


def loaded(name, weights, **dtypes):
    """A block of ``CONFIGS`` built without random init (``nnx.eval_shape``), holding ``weights``."""
    m = nnx.eval_shape(lambda: nj.BLOCKS[name](**CONFIGS[name], **dtypes, rngs=rngs()))
    nnx.update(m, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nnx.state(m)))
    nj.load_weights(m, weights)
    m.eval()
    return m


def traced(name, **dtypes):
    """(output dtypes, convolution operand dtypes) of a block of ``CONFIGS`` on a float32 input,
    plain call and attention call, found by tracing alone (nothing is compiled or run)."""
    block = nnx.eval_shape(lambda: nj.BLOCKS[name](**CONFIGS[name], **dtypes, rngs=rngs()))
    block.eval()
    graphdef, state = nnx.split(block)
    x = jax.ShapeDtypeStruct(shape_of(name), jnp.float32)
    attention = spec_of(name).attention is not None
    # 1×1 convs traced as the convs they are (PointwiseConv runs them as dots with nnx.Conv's
    # own dtype rules: test_pointwise_conv_is_the_conv)
    with mock.patch.object(PointwiseConv, "__call__", nnx.Conv.__call__):
        jaxpr = jax.make_jaxpr(lambda s, x: _outputs(nnx.merge(graphdef, s), x, False))(state, x)
    outs = [v.dtype.name for v in jaxpr.out_avals]
    convs = [e.invars[0].aval.dtype.name for e in jaxpr.jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
    if attention:
        outs += [v.dtype.name for v in jax.eval_shape(lambda s, x: _outputs(nnx.merge(graphdef, s), x, True), state, x)]
    return block, outs, convs


@pytest.mark.parametrize(
    "dtypes", [{}, {"dtype": jnp.bfloat16}, {"param_dtype": jnp.bfloat16}], ids=["f32", "bf16-compute", "bf16-params"]
)
def test_pointwise_conv_is_the_conv(dtypes):
    """The 1×1 convs the blocks build run as dots: the same output, dtype and gradients as
    ``nnx.Conv`` with the same parameters."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 5, 6)), jnp.float32)
    conv = nnx.Conv(6, 4, (1, 1), rngs=nnx.Rngs(0), **dtypes)
    pointwise = PointwiseConv(6, 4, (1, 1), rngs=nnx.Rngs(0), **dtypes)
    want, got = conv(x), pointwise(x)
    assert got.dtype == want.dtype and got.shape == want.shape
    tol = 1e-5 if want.dtype == jnp.float32 else 2e-2
    assert error(np.asarray(got, np.float64), np.asarray(want, np.float64)) <= tol
    grads = [nnx.grad(lambda m: (m(x).astype(jnp.float32) ** 2).sum())(m) for m in (pointwise, conv)]
    for g, w in zip(*(jax.tree.leaves(g) for g in grads)):
        assert error(np.asarray(g, np.float64), np.asarray(w, np.float64)) <= tol


@pytest.mark.parametrize("name", list(CONFIGS))
def test_computation_dtype_apart_from_param_dtype(name):
    """NNX's convention, in every block: ``param_dtype`` is what is stored, ``dtype`` what is
    computed in. ``dtype=bfloat16, param_dtype=float32`` keeps float32 parameters, runs the layers
    in bfloat16 (EVC's encoding features excepted: float32, as its codeword distances) and returns
    bfloat16 output and map for a float32 input. Without ``dtype`` it is inferred from the input
    and the parameters. (Values: the "flax-mixed" conformance column.)"""
    mixed, outs, convs = traced(name, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    assert {a.dtype for a in jax.tree.leaves(nnx.state(mixed, nnx.Param))} <= {jnp.dtype(jnp.float32)}
    assert set(outs) == {"bfloat16"}
    wide = ["float32"] if name == "ExplicitVisualCenter" else []  # lvc.LVC.0
    assert sorted(convs) == sorted(["bfloat16"] * (len(convs) - len(wide)) + wide)
    _, outs, _ = traced(name, param_dtype=jnp.bfloat16)  # dtype=None: float32 input, bfloat16 parameters
    assert set(outs) == {"float32"}


def test_evc_codebook_stays_float32():
    """As torch keeps it: the codewords and smoothing scales are float32 whatever ``param_dtype``,
    and loading and export keep their full precision."""
    w = random_float32("ExplicitVisualCenter")
    evc = loaded("ExplicitVisualCenter", w, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    encoding = evc.lvc.LVC[3]
    assert encoding.codewords[...].dtype == encoding.scale[...].dtype == jnp.float32
    assert evc.conv1.kernel[...].dtype == jnp.bfloat16
    np.testing.assert_array_equal(nj.export_weights(evc)["lvc.LVC.3.codewords"], w["lvc.LVC.3.codewords"])


def test_fast_exp_and_non_local_means_in_float16():
    """fast_exp's mantissa needs 21 bits: in float16 it returned 0 (and the filter 0/0 = NaN
    everywhere). It runs in float32 inside; the float16 filter is within the half-precision
    tolerance of the float64 reference. A NaN argument gives 0, as the reference's bit trick."""
    y = np.array([0.0, -0.5, -1.0, -3.0, -10.0, np.nan])
    want = nl_means_ref.fast_exp(y)
    assert want[-1] == 0.0
    for dtype in (jnp.float16, jnp.bfloat16, jnp.float32):
        got = np.asarray(fast_exp(jnp.asarray(y, dtype)), np.float64)
        assert got.dtype == np.float64 and np.abs(got - want).max() <= 4e-3, dtype  # the dtype's rounding
    x = np.random.default_rng(0).uniform(0, 1, (2, 9, 10, 3))
    config = dict(patch_size=3, patch_distance=2, h=0.3)
    block = nj.NonLocalMeans(**config, dtype=jnp.float16)
    got = block(x.astype(np.float32))
    assert got.dtype == jnp.float16
    want = reference("NonLocalMeans", np.moveaxis(x, -1, 1), {}, config)
    assert error(np.moveaxis(np.asarray(got, np.float64), -1, 1), want) <= 2e-2


def test_concatenation_kernel_propagates_nan_as_the_materialised_sum():
    """The sorted prefix sums see only the keys with aᵢ + bⱼ > 0; the materialised sum also
    multiplies the others' NaN by 0: NaN in aᵢ spoils query i, in any bⱼ every query, in vⱼ
    every query's channel."""
    r = np.random.default_rng(0)
    a, b, v = r.normal(size=(3, 1, 6)), r.normal(size=(3, 1, 5)), r.normal(size=(3, 1, 5, 2))
    a[0, 0, 2] = b[1, 0, 3] = v[2, 0, 1, 0] = np.nan
    want = np.isnan(np.einsum("bhnm,bhmc->bhnc", np.maximum(a[..., :, None] + b[..., None, :], 0.0), v))
    for dtype in (jnp.float32, jnp.float16):
        got = kernels.concatenation_attention(*(jnp.asarray(t, dtype) for t in (a, b, v)))
        assert got.dtype == dtype and np.array_equal(np.isnan(np.asarray(got)), want)


def test_conformance_columns_of_half_precision():
    """The "flax" column runs whole blocks in bfloat16 and float16 (``dtype = param_dtype``),
    "flax-mixed" float32 parameters with a half-precision computation."""
    assert FlaxAdapter.dtypes == ("float32", "bfloat16", "float16")
    assert FlaxMixedAdapter.dtypes == ("bfloat16", "float16") and FlaxMixedAdapter.implementation == "auto"
    whole = FlaxAdapter().build("SelfAttention", CONFIGS["SelfAttention"], "float16")
    mixed = FlaxMixedAdapter().build("SelfAttention", CONFIGS["SelfAttention"], "float16")
    assert whole.dtype == whole.param_dtype == mixed.dtype == jnp.float16 and mixed.param_dtype == jnp.float32
    assert whole.query_conv.kernel[...].dtype == jnp.float16 and mixed.query_conv.kernel[...].dtype == jnp.float32


# ----------------------------------------------------------------------------------------------
# training-grade fast paths: the chunked softmax attention's custom VJP (probabilities recomputed
# chunk by chunk from the saved log-sum-exp) against the materialised gradient, and no N×M
# array anywhere in the gradient, stacked loop residuals included
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_softmax_attention_gradient_equals_the_materialised_one(dtype):
    """dq, dk, dv for a random cotangent: two heads, c = 3 ≠ cv = 5, 11 queries in chunks of 4
    (ragged last; scale 0.5) or in one (no scale), against the VJP of softmax(s·q kᵀ) v formed in float64."""
    r = np.random.default_rng(0)
    q, k = (r.normal(size=(2, 2, n, 3)) for n in (11, 7))
    v, d_out = r.normal(size=(2, 2, 7, 5)), r.normal(size=(2, 2, 11, 5))
    tol = {"float32": TOL, "float64": 1e-9}[dtype]
    with jax.enable_x64(True):
        for scale, chunk in ((0.5, 4), (None, 64)):
            formed = lambda q, k, v, s=scale: jax.nn.softmax((q @ jnp.swapaxes(k, -1, -2)) * (s or 1.0)) @ v
            want = jax.vjp(formed, q, k, v)[1](d_out)
            args = [jnp.asarray(t, dtype) for t in (q, k, v)]
            fast = lambda q, k, v, s=scale, c=chunk: kernels.softmax_attention(q, k, v, s, query_chunk_size=c)
            got = jax.jit(lambda *a, f=fast: jax.vjp(f, *a)[1](jnp.asarray(d_out, dtype)))(*args)
            for g, w in zip(got, want):
                assert g.dtype == dtype and error(g, w) <= tol, (scale, chunk)


TRAINED = FAST + [
    ("NonLocalBlock2D", dict(in_channels=4, mode="gaussian", num_heads=2, scale=0.3)),
    ("NonLocalBlock2D", dict(in_channels=4, num_heads=2, share_query_key=True, value_channels=4)),
]


def _random_block(name, config, **kw):
    block = nj.BLOCKS[name](**config, **kw, rngs=rngs())
    nlattn.load_weights(block, random_weights(make_config(name, **config).schema(), np.random.default_rng(0)))
    return block


def test_fast_path_gradients_equal_the_naive_paths():
    """Input and parameter gradients of sin-summed outputs, fast (query chunks of 16: 143
    queries, a ragged last chunk) against naive, in float64 (in float32 a parameter the output
    barely depends on has a gradient of round-off only). Two heads, θ = φ shared, a scale,
    c ≠ cv; every catalogue case's gradients are conformance-checked against the reference as
    well (tests/test_blocks.py)."""
    config = dict(in_channels=4, num_heads=2, share_query_key=True, value_channels=4, scale=0.3)
    with jax.enable_x64(True):
        x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 11, 13, 4)))
        grads = []
        for impl in ("auto", "naive"):
            f64 = dict(dtype=jnp.float64, param_dtype=jnp.float64)
            block = _random_block("NonLocalBlock2D", config, implementation=impl, query_chunk_size=16, **f64)
            block.eval()
            grad = nnx.jit(nnx.grad(lambda block, x: jnp.sum(jnp.sin(block(x))), argnums=(0, 1)))
            grads.append(jax.tree.leaves(grad(block, x)))
    assert len(grads[0]) == len(grads[1]) > 2
    for fast, naive in zip(*grads):
        assert fast.dtype == jnp.float64 and error(fast, naive) <= 1e-9


def _largest_intermediate(fn, *args):
    """The element count of the largest value the traced ``fn`` computes (loop bodies included;
    a loop's stacked outputs are one value)."""
    return max(int(np.prod(s)) for s in _intermediate_shapes(fn, *args))


@pytest.mark.parametrize("name,config", TRAINED, ids=[f"{n}-{c.get('mode', '')}-{len(c)}" for n, c in TRAINED])
def test_fast_path_gradient_holds_nothing_as_large_as_the_relation(name, config):
    """N = 143 queries, M = 30 keys (pooled) or 143, chunks of 16: nothing in the forward or the
    gradient has N·M elements on the fast path (not the relation, not its chunks stacked by a
    loop to save them for the backward pass); the naive path has."""
    x = jnp.ones((1, 11, 13, 4))
    relation = 143 * (30 if name.startswith("NonLocal") else 143)
    largest = {}
    for impl in ("naive", "auto"):
        block = nnx.eval_shape(lambda impl=impl: nj.BLOCKS[name](**config, implementation=impl, query_chunk_size=16))
        block.train()
        graphdef, state = nnx.split(block)
        grad = jax.grad(lambda s, x, g=graphdef: jnp.sum(nnx.merge(g, s)(x)), argnums=(0, 1))
        largest[impl] = _largest_intermediate(grad, state, x)
    assert largest["naive"] >= relation
    assert largest["auto"] < relation / 4, largest


# ----------------------------------------------------------------------------------------------
# the forward's key blocks (online softmax: running maximum, sum and output per query chunk)
# ----------------------------------------------------------------------------------------------


def _formed(q, k, v, scale):
    return jax.nn.softmax((q @ jnp.swapaxes(k, -1, -2)) * (scale or 1.0)) @ v


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_softmax_attention_key_blocks_equal_the_materialised_relation(dtype):
    """11 queries, 13 keys (two heads, c = 3 ≠ cv = 5) in key blocks of 4 (a ragged, padded last
    block) with query chunks of 4 (ragged too), or of 1 with all queries at once: output and dq, dk, dv (the
    backward reads the key-blocked forward's log-sum-exp) against softmax(s·q kᵀ) v formed in float64."""
    r = np.random.default_rng(2)
    q, k = (r.normal(size=(2, 2, n, 3)) for n in (11, 13))
    v, d_out = r.normal(size=(2, 2, 13, 5)), r.normal(size=(2, 2, 11, 5))
    tol = {"float32": TOL, "float64": 1e-9}[dtype]
    with jax.enable_x64(True):
        for scale, chunk, block in ((0.5, 4, 4), (None, 64, 1)):
            out, pull = jax.vjp(lambda q, k, v, s=scale: _formed(q, k, v, s), q, k, v)
            want = (out, *pull(d_out))
            args = [jnp.asarray(t, dtype) for t in (*(q, k, v), d_out)]

            def fast(q, k, v, d_out, s=scale, c=chunk, b=block):
                f = lambda q, k, v: kernels.softmax_attention(q, k, v, s, query_chunk_size=c, key_block_size=b)  # noqa: E731
                out, pull = jax.vjp(f, q, k, v)
                return (out, *pull(d_out))

            got = jax.jit(fast)(*args)
            for g, w in zip(got, want):
                assert g.dtype == dtype and error(g, w) <= tol, (scale, chunk, block)


def test_softmax_attention_key_blocks_propagate_nan_and_inf_as_the_relation():
    """A NaN key, a key block of +inf energies and one of −inf energies (keys with an infinite
    channel): NaN exactly where the formed softmax has it, the rest equal; a whole first block of
    −inf energies must not turn the running sum into NaN (exp(−inf − (−inf)))."""
    r = np.random.default_rng(3)
    q = np.abs(r.normal(size=(2, 1, 6, 3))) + 0.1  # positive: sign(e) = sign(k)
    k, v = r.normal(size=(2, 1, 12, 3)), r.normal(size=(2, 1, 12, 2))
    k[0, 0, 0:4, 0], k[1, 0, 4:8, 2] = -np.inf, np.inf
    attend = jax.jit(lambda q, k, v: kernels.softmax_attention(q, k, v, query_chunk_size=4, key_block_size=4))
    with jax.enable_x64(True):
        want, got = _formed(q, k, v, None), attend(q, k, v)
        # only the −inf block in batch 0: a finite result there, +inf energies in batch 1: NaN
        assert bool(jnp.isfinite(want[0]).all()) and bool(jnp.isnan(want[1]).all())
        assert bool((jnp.isnan(got) == jnp.isnan(want)).all()) and error(got[0], want[0]) <= 1e-12
        k[0, 0, 5, 1] = np.nan
        want, got = _formed(q, k, v, None), attend(q, k, v)
        assert bool(jnp.isnan(want).all()) and bool(jnp.isnan(got).all())


def test_key_block_covers_the_keys_within_its_budget():
    """Every M gets blocks that cover it with less padding than 8 keys a block, each block within
    KEY_BLOCK_ELEMENTS (or MIN_KEY_BLOCK); M that fits is one block."""
    for m in (1, 7, 500, 511, 512, 513, 1000, 4096, 4097, 16384, 65536):
        for width in (1, 32, 128, 256, 384, 4096):
            block = kernels.key_block(m, width)
            steps = -(-m // block)
            assert steps * block >= m > (steps - 1) * block and steps * block - m < 8 * steps
            limit = max(kernels.MIN_KEY_BLOCK, kernels.KEY_BLOCK_ELEMENTS // width)
            assert block <= limit and (block == m) == (m <= limit)


def test_key_blocked_forward_holds_one_block_of_the_relation():
    """N = M = 143 in query chunks of 16 and key blocks of 16 (a padded last block): nothing in
    the forward has more than chunk · block elements of the relation; the gradient holds one
    (chunk, M) block at a time (the recomputation of the backward), never N·M."""
    q, k = jnp.ones((1, 1, 143, 3)), jnp.ones((1, 1, 143, 3))
    v = jnp.ones((1, 1, 143, 5))

    def fast(q, k, v):
        return kernels.softmax_attention(q, k, v, query_chunk_size=16, key_block_size=16)

    forward = _intermediate_shapes(fast, q, k, v)
    relation_blocks = [s for s in forward if len(s) >= 2 and s[-1] == 16 and s[-2] == 16]
    assert relation_blocks and max(int(np.prod(s)) for s in forward) < 143 * 143 / 4
    grad = jax.grad(lambda q, k, v: jnp.sum(fast(q, k, v)), argnums=(0, 1, 2))
    assert _largest_intermediate(grad, q, k, v) < 143 * 143 / 4
