"""What every framework must do alike, written once and run for torch, Keras and Flax (``fw``).

Configs come from the conformance catalogue (``ONE_CASE_PER_BLOCK``, ``CASES``), so a new block
is covered here without touching this file.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest

import nlattn
from conftest import FRAMEWORKS, ONE_CASE_PER_BLOCK
from nlattn import ConfigError, InputError, WeightError
from nlattn.conformance import CASES
from nlattn.conformance.adapter import BUILTIN, available_adapters
from nlattn.conformance.runner import error, jobs, run_check
from nlattn.numpy_ref import run as reference
from nlattn.specs import BatchNorm, Conv, Gate, Param, Uniform, random_weights, tensors
from nlattn.weights import load_file

FIXTURES = Path(__file__).parent / "fixtures" / "v0.1"

# ---------------------------------------------------------------------------------------------
# conformance: every built-in adapter of every framework, every case, dtype and check
# ---------------------------------------------------------------------------------------------

_AVAILABLE, _MISSING = available_adapters([name for name in BUILTIN if name != "numpy"])
ADAPTERS = {adapter.name: adapter for adapter in _AVAILABLE}
# what a column declares unsupported (torch-onnx: NonLocalMeans) is tested in test_conformance.py
JOBS = [(name, *job) for name, adapter in ADAPTERS.items() for job in jobs(adapter) if adapter.supports(job[0]) is None]


def test_every_builtin_column_is_available():
    """Every framework is installed in CI: a column that cannot load is a failure, not a skip."""
    assert not _MISSING


@pytest.mark.parametrize("adapter, case, dtype, check", JOBS, ids=[f"{a}-{c.id}-{chk}-{d}" for a, c, d, chk in JOBS])
def test_conformance(adapter, case, dtype, check):
    result = run_check(ADAPTERS[adapter], case, dtype, check)
    assert result.passed, result.describe()


def test_every_framework_has_a_fast_and_a_naive_column_for_every_block():
    for fw in FRAMEWORKS:
        columns = [a for a in ADAPTERS.values() if type(a).__module__.startswith(f"nlattn.{fw}.")]
        assert {a.implementation for a in columns} == {"auto", "naive"}, fw
        for adapter in columns:
            assert {c.block for c, _, _ in jobs(adapter)} == set(nlattn.BLOCKS), adapter.name


# ---------------------------------------------------------------------------------------------
# construction: the same keywords, registry and errors everywhere
# ---------------------------------------------------------------------------------------------


def test_registry_is_the_spec(fw):
    assert list(fw.module.BLOCKS) == list(nlattn.BLOCKS)
    assert all(getattr(fw.module, name) is cls for name, cls in fw.module.BLOCKS.items())
    assert all(
        issubclass(cls, fw.module.Block) and cls.config_class is nlattn.BLOCKS[name]
        for name, cls in fw.module.BLOCKS.items()
    )
    assert {"BLOCKS", "Block", "blocks", "export_weights", "load_weights", *nlattn.BLOCKS} <= set(fw.module.__all__)


@pytest.mark.parametrize("block", list(ONE_CASE_PER_BLOCK))
def test_every_config_field_is_a_keyword_and_binds_positionally(fw, block):
    cls, case = fw.module.BLOCKS[block], ONE_CASE_PER_BLOCK[block]
    fields = list(case.spec.to_dict())
    params = inspect.signature(cls).parameters
    assert list(params)[: len(fields)] == fields
    assert "implementation" in params
    m = fw.make(block, case.spec.to_dict())
    assert m.spec == case.spec
    config = case.spec.to_dict()
    first, rest = config[fields[0]], {k: v for k, v in config.items() if k != fields[0]}
    assert cls(first, **rest).spec == case.spec
    with pytest.raises(TypeError, match="multiple values"):
        cls(first, **config)


def test_config_errors_name_the_block_and_the_field(fw):
    cls = fw.module.SelfAttention
    with pytest.raises(ConfigError, match="SelfAttention.*implementation"):
        cls(16, implementation="flash")
    with pytest.raises(ConfigError, match="NonLocalBlock2D.*mode"):
        fw.module.NonLocalBlock2D(8, mode="softmax")
    with pytest.raises(ConfigError, match="ChannelAttention.*unknown option.*colour"):
        fw.module.ChannelAttention(colour="red")
    with pytest.raises(ConfigError, match="ChannelAttention.*unknown option.*query_chunk_size"):
        fw.module.ChannelAttention(query_chunk_size=4)  # no chunked path, no chunk size
    with pytest.raises(ConfigError, match="Scale: init must be a finite number"):
        fw.module.Scale(init="abc")
    assert fw.make("SelfAttention", dict(in_channels=16)).implementation == "auto"
    assert fw.make("ChannelAttention", {}, implementation="naive").implementation == "naive"
    if fw.name != "torch":  # Keras and Flax chunk their softmax attention
        with pytest.raises(ConfigError, match="query_chunk_size"):
            cls(16, query_chunk_size=0)
        assert fw.make("SelfAttention", dict(in_channels=16), query_chunk_size=7).query_chunk_size == 7


# ---------------------------------------------------------------------------------------------
# initialisation: the rules declared in the spec hold in every framework
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", list(ONE_CASE_PER_BLOCK))
def test_published_init_is_the_spec(fw, block):
    case = ONE_CASE_PER_BLOCK[block]
    w = fw.module.export_weights(fw.make(block, case.config))
    for layer in case.spec.schema():
        names = [t.name for t in layer.tensors()]
        if isinstance(layer, Param) and isinstance(layer.init, Uniform):
            value = w[layer.name]
            assert layer.init.low <= value.min() and value.max() <= layer.init.high, layer.name
            assert value.std() > 0, layer.name
        elif isinstance(layer, Param):
            assert np.all(w[layer.name] == layer.init), layer.name
        elif isinstance(layer, BatchNorm):
            p = layer.prefix
            assert np.all(w[f"{p}.weight"] == (0 if layer.zero_init else 1)) and np.all(w[f"{p}.bias"] == 0), p
            assert np.all(w[f"{p}.running_mean"] == 0) and np.all(w[f"{p}.running_var"] == 1), p
        elif isinstance(layer, Conv) and layer.zero_init:
            assert all(np.all(w[n] == 0) for n in names), layer.prefix
        elif isinstance(layer, Conv):
            assert np.any(w[f"{layer.prefix}.weight"] != 0), layer.prefix


def _identity_at_init(spec) -> bool:
    """Blocks whose spec starts them as the identity: a closed gate, or a zero last layer."""
    return any(
        (isinstance(layer, Gate) and layer.init == 0) or getattr(layer, "zero_init", False) for layer in spec.schema()
    )


IDENTITY_CASES = [c for c in CASES if _identity_at_init(c.spec)]


@pytest.mark.parametrize("case", IDENTITY_CASES, ids=[c.id for c in IDENTITY_CASES])
def test_identity_at_init(fw, case):
    m = fw.make(case.block, case.config)
    x = np.random.default_rng(0).normal(size=case.shape).astype(np.float32)
    np.testing.assert_array_equal(fw.run(m, x), x)
    np.testing.assert_array_equal(fw.run(m, x, training=True), x)


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "block, config, shape, dtype, needle",
    [
        ("NonLocalBlock2D", dict(in_channels=8), (2, 8, 5), "float32", "rank-4"),
        ("NonLocalBlock1D", dict(in_channels=8), (2, 8, 5, 5), "float32", "rank-3"),
        ("NonLocalBlock3D", dict(in_channels=4), (2, 4, 5, 5), "float32", "rank-5"),
        ("NonLocalBlock2D", dict(in_channels=8), (2, 6, 5, 5), "float32", "expected 8 channels, got 6"),
        ("NonLocalBlock2D", dict(in_channels=8), (2, 8, 1, 5), "float32", "at least"),
        ("SelfAttention", dict(in_channels=16), (2, 16, 4, 4), "int64", "int64"),
        (
            "RelationAwareAttention",
            dict(in_channels=16, spatial_size=(4, 5), cha_ratio=2, spa_ratio=4, down_ratio=2),
            (2, 16, 5, 4),
            "float32",
            "spatial size (4, 5)",
        ),
        ("NonLocalMeans", dict(patch_size=5), (1, 1, 2, 9), "float32", "patch_size // 2"),
    ],
)
def test_input_errors_name_the_block(fw, block, config, shape, dtype, needle):
    m = fw.make(block, config)
    with pytest.raises(InputError, match=block) as info:
        fw.run(m, np.zeros(shape, dtype))
    assert needle in str(info.value)


# ---------------------------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------------------------


def _random(spec, seed):
    return {k: v.astype(np.float32) for k, v in random_weights(spec.schema(), np.random.default_rng(seed)).items()}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_export_load_export_is_bit_exact(fw, case):
    m = fw.make(case.block, case.config)
    first = _random(case.spec, case.seed)
    fw.module.load_weights(m, first)
    second = fw.module.export_weights(m)
    assert list(second) == list(tensors(case.spec.schema()))  # schema order
    for k in first:
        assert second[k].dtype == np.float32 and first[k].tobytes() == second[k].tobytes(), k


def test_load_weights_is_atomic_and_lists_every_problem(fw):
    m = fw.make("NonLocalBlock2D", dict(in_channels=8))
    fw.module.load_weights(m, _random(m.spec, 0))
    before = fw.module.export_weights(m)
    bad = {k: v + 1 for k, v in before.items()}
    del bad["theta.weight"]  # missing
    bad["phi.bias"] = np.zeros(7, np.float32)  # wrong shape
    bad["W.bias"][0] = np.nan  # non-finite
    bad["gamma"] = np.zeros(1, np.float32)  # unexpected
    bad["g.weight"] = bad["g.weight"].astype(np.int32)  # not floating
    with pytest.raises(WeightError, match="NonLocalBlock2D") as info:
        fw.module.load_weights(m, bad)
    for needle in ("theta.weight", "phi.bias", "W.bias", "gamma", "g.weight"):
        assert needle in str(info.value)
    assert len(info.value.problems) == 5
    after = fw.module.export_weights(m)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def _model(fw):
    """Three blocks at two depths: ``attn``, ``stage.nl`` and ``stage.cam``."""
    return fw.container(
        dict(
            attn=fw.make("SelfAttention", dict(in_channels=8, qk_ratio=4), name="attn"),
            stage=dict(
                nl=fw.make("NonLocalBlock2D", dict(in_channels=8), name="nl"),
                cam=fw.make("ChannelAttention", dict(in_channels=8), name="cam"),
            ),
        )
    )


def _randomise(fw, model, seed):
    rng = np.random.default_rng(seed)
    for _, block in fw.module.blocks(model):
        w = random_weights(block.spec.schema(), rng)
        fw.module.load_weights(block, {k: v.astype(np.float32) for k, v in w.items()})


def test_model_with_several_blocks_round_trips(fw):
    a, b = _model(fw), _model(fw)
    _randomise(fw, a, 0)
    w = fw.module.export_weights(a)
    paths = [p for p, _ in fw.module.blocks(a)]
    assert sorted(paths) == ["attn", "stage.cam", "stage.nl"]
    expected = {f"{p}.{n}" for p, blk in fw.module.blocks(a) for n in tensors(blk.spec.schema())}
    assert set(w) == expected and "attn.query_conv.weight" in w
    fw.module.load_weights(b, w)
    again = fw.module.export_weights(b)
    assert all(w[k].tobytes() == again[k].tobytes() for k in w)


def test_model_load_is_atomic_across_blocks(fw):
    m = _model(fw)
    _randomise(fw, m, 1)
    before = fw.module.export_weights(m)
    bad = {k: v * 2 for k, v in before.items()}
    bad["attn.key_conv.weight"] = np.zeros((3, 3), np.float32)  # only this block is wrong
    bad["attn.extra"] = np.zeros(1, np.float32)
    bad["nowhere.weight"] = np.zeros(1, np.float32)
    with pytest.raises(WeightError) as info:
        fw.module.load_weights(m, bad)
    assert len(info.value.problems) == 3
    assert "attn.key_conv.weight" in str(info.value) and "nowhere.weight" in str(info.value)
    after = fw.module.export_weights(m)
    assert all(np.array_equal(before[k], after[k]) for k in before)  # the other blocks too


def test_weights_of_a_model_without_blocks(fw):
    with pytest.raises(TypeError, match="no nlattn"):
        fw.module.export_weights(fw.not_a_block())


def test_framework_neutral_api_dispatches(fw):
    m = fw.make("SelfAttention", dict(in_channels=8))
    fw.module.load_weights(m, _random(m.spec, 3))
    mine, theirs = fw.module.export_weights(m), nlattn.export_weights(m)
    assert list(theirs) == list(mine) and all(np.array_equal(theirs[k], mine[k]) for k in mine)


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("*.safetensors")), ids=lambda p: p.stem)
def test_files_written_by_nlattn_0_1_load(fw, path):
    """Canonical files written before the one-shape refactor load, and the block computes with them."""
    ckpt = load_file(path)
    m = nlattn.build(ckpt, fw.name)
    got = fw.module.export_weights(m)
    assert all(got[k].tobytes() == np.asarray(v, np.float32).tobytes() for k, v in ckpt.weights.items())
    shape = (2, *ckpt.spec().example_input_shape()[1:])
    x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    want = reference(ckpt.block, x.astype(np.float64), ckpt.weights, ckpt.config)
    if hasattr(m, "eval"):
        m.eval()
    assert error(fw.run(m, x), want) <= 1e-5


def test_values_are_checked_in_the_variables_dtype(fw):
    """1e300 is finite in float64 and infinite in float32: refused, not stored as inf."""
    m = fw.make("SelfAttention", dict(in_channels=8))
    before = fw.module.export_weights(m)
    w = {k: v.astype(np.float64) for k, v in before.items()}
    w["value_conv.bias"][0] = 1e300
    with pytest.raises(WeightError, match="'value_conv.bias' is not finite"):
        fw.module.load_weights(m, w)
    after = fw.module.export_weights(m)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_negative_running_variance_is_refused(fw):
    m = fw.make("NonLocalBlock2D", dict(in_channels=4))
    w = _random(m.spec, 0)
    w["bn.running_var"][1] = -0.5
    with pytest.raises(WeightError, match="'bn.running_var' has negative values"):
        fw.module.load_weights(m, w)


def test_two_threads_loading_into_one_block_leave_one_weight_set(fw, monkeypatch):
    import importlib
    import random
    import threading
    import time

    access = importlib.import_module(f"nlattn.{fw.name}._weights").ACCESS
    assign = access.assign

    rng = random.Random(0)

    def slow_assign(variable, value):  # widen the window a mixture would need
        time.sleep(rng.random() * 2e-4)
        assign(variable, value)

    monkeypatch.setattr(access, "assign", slow_assign)
    m = fw.make("NonLocalBlock2D", dict(in_channels=8))
    sets = [_random(m.spec, 10), _random(m.spec, 11)]
    for _ in range(20):
        barrier = threading.Barrier(2)

        def load(w, barrier=barrier):
            barrier.wait()
            fw.module.load_weights(m, w)

        threads = [threading.Thread(target=load, args=(w,)) for w in sets]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        got = fw.module.export_weights(m)
        assert any(all(np.array_equal(got[k], w[k]) for k in w) for w in sets), "a mixture of both"


# ---------------------------------------------------------------------------------------------
# hostile inputs: empty batches, NaN, half precision
# ---------------------------------------------------------------------------------------------


def _input(case, rng, batch=None):
    shape = case.shape if batch is None else (batch, *case.shape[1:])
    if case.block == "NonLocalMeans":  # an image in [0, 1]
        return rng.uniform(0, 1, shape)
    return rng.normal(size=shape)


@pytest.mark.parametrize("block", list(ONE_CASE_PER_BLOCK))
def test_batch_zero_gives_an_empty_output(fw, block):
    """As torch and Keras convolutions do: (0, C, *S) in, (0, C, *S) out, and an empty map."""
    case = ONE_CASE_PER_BLOCK[block]
    m = fw.loaded(block, case.config, _random(case.spec, 0))
    x = np.zeros((0, *case.shape[1:]), np.float32)
    assert fw.run(m, x).shape == x.shape
    if case.has_attention:
        out, attn = fw.run(m, x, return_attention=True)
        assert out.shape == x.shape and attn.shape[0] == 0
        full = fw.run(m, _input(case, np.random.default_rng(0)).astype(np.float32), return_attention=True)[1]
        assert attn.shape[1:] == full.shape[1:]


#: one case per block family and fast path: where NaN could take another route than in the reference
NAN_CASES = [
    c
    for c in CASES
    if c.id
    in (
        "nl2d-embedded", "nl2d-embedded-heads", "nl2d-gaussian", "nl2d-dot", "nl2d-concat",
        "nl2d-sharedqk", "nl3d-dot-poolfirst", "sagan", "pam", "cam", "rcca", "rga-sc", "evc",
        "nlmeans-color-sigma", "scale", "gc-att-add", "dnl2d-temp02-bn",
    )
]  # fmt: skip


@pytest.mark.parametrize("implementation", ["auto", "naive"])
@pytest.mark.parametrize("case", NAN_CASES, ids=[c.id for c in NAN_CASES])
def test_nan_propagates_as_in_the_reference(fw, case, implementation):
    """The rule (docs/design.md §4): a NaN in the input makes exactly the outputs NaN that it makes
    NaN in the float64 reference, on every path."""
    w = _random(case.spec, case.seed)
    m = fw.loaded(case.block, case.config, w, implementation=implementation)
    x = _input(case, np.random.default_rng(case.seed))
    x[(0, 0, *(s // 2 for s in case.shape[2:]))] = np.nan
    want = np.isnan(reference(case.block, x, w, case.config))
    got = np.isnan(fw.run(m, x.astype(np.float32)))
    assert want.any() and not want.all()
    assert np.array_equal(got, want), f"{got.sum()} NaN outputs, the reference has {want.sum()}"


HALF_PRECISION = [
    ("NonLocalBlock2D", dict(in_channels=8, sub_sample=False)),
    ("NonLocalBlock2D", dict(in_channels=8, sub_sample=False, mode="gaussian")),
    ("NonLocalBlock2D", dict(in_channels=8, sub_sample=False, mode="dot_product")),
    ("NonLocalBlock2D", dict(in_channels=8, sub_sample=False, mode="concatenation")),
    ("SelfAttention", dict(in_channels=8, qk_ratio=2)),
    ("PositionAttention", dict(in_channels=8, qk_ratio=2)),
    ("GlobalContext", dict(in_channels=8, ratio=0.5, channel_mul=True)),
    ("DisentangledNonLocal2D", dict(in_channels=8)),
]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("implementation", ["auto", "naive"])
@pytest.mark.parametrize("block, config", HALF_PRECISION, ids=[f"{b}-{c.get('mode', '')}" for b, c in HALF_PRECISION])
def test_half_precision_stays_finite_where_float32_does(fw, block, config, implementation, dtype):
    """Large inputs of one sign, whose energies (|θ·φ| > 65504) and sums over the 256 keys overflow
    float16, while every activation the block stores and its output fit it: finite in half
    precision on every path (the values are small, and dot_product's θ too, so that A v is)."""
    spec = nlattn.make_config(block, **config)
    w = _random(spec, 0)
    small = (
        ("W.", "value_conv", "g.", "theta.")
        if spec.block.startswith("NonLocal") and spec.mode == "dot_product"
        else ("W.", "value_conv", "g.")
    )
    w.update({k: v * (1e-3 if k.startswith("theta.") else 0.1) for k, v in w.items() if k.startswith(small)})
    x = 150 + 50 * np.random.default_rng(1).normal(size=(1, 8, 16, 16))
    want = reference(block, x, w, config)
    assert np.isfinite(want).all() and np.abs(want).max() < 4096  # what float16 can hold, with room
    m = fw.loaded(block, config, w, dtype=dtype, implementation=implementation)
    got = fw.run(m, x.astype(np.float32), dtype=dtype)
    assert np.isfinite(got).all(), f"{(~np.isfinite(got)).sum()} non-finite outputs"
