"""What only nlattn.tf has: data formats, in_channels inferred at build, get_config and .keras files,
jit_compile, the Scale layer, functional models with unknown sizes, Keras names, mixed-precision
policies, messages in the user's layout, the other Keras backends (jax, torch).

Conformance (keras, keras-cf, keras-naive, keras-mixed), inits, weight round trips and errors are checked for
every framework alike in tests/test_blocks.py.
"""

from __future__ import annotations

import inspect
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import nlattn
import nlattn.tf as nk
from conftest import ONE_CASE_PER_BLOCK
from nlattn import ConfigError, InputError, WeightError
from nlattn.conformance.runner import error
from nlattn.numpy_ref import run as reference
from nlattn.specs import CONFIGS, BatchNorm, random_weights, tensors

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "v0.1"
# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

#: one config per block class (the catalogue's first case of it), with its channels-first input shape
ONE = {block: (case.config, case.shape) for block, case in ONE_CASE_PER_BLOCK.items()}


def channels_last(x):
    return np.moveaxis(x, 1, -1)


def rand(shape, seed=1, block=None):
    rng = np.random.default_rng(seed)
    if block == "NonLocalMeans":
        return rng.uniform(0, 1, shape)
    return rng.normal(size=shape)


def build(block, config, seed=0, **kw):
    """A channels_last layer with random (non-identity) weights, and those weights (float64)."""
    layer = getattr(nk, block)(**config, **kw)
    w = random_weights(make_spec(block, config).schema(), np.random.default_rng(seed))
    nk.load_weights(layer, w)
    return layer, w


def make_spec(block, config):
    return nlattn.make_config(block, **config)


def as_np(t):
    return keras.ops.convert_to_numpy(t)


# ---------------------------------------------------------------------------------------------
# compiled forms, saving, configs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", sorted(ONE))
def test_jit_compile_matches_eager_and_reference(block):
    config, shape = ONE[block]
    layer, w = build(block, config)
    x64 = rand(shape, block=block)
    x = tf.constant(channels_last(x64), tf.float32)
    eager = as_np(layer(x))
    compiled = as_np(tf.function(lambda t: layer(t), jit_compile=True)(x))
    ref = channels_last(reference(block, x64, w, config))
    assert error(compiled, eager) <= 1e-5
    assert error(compiled, ref) <= 1e-5


@pytest.mark.parametrize("block", sorted(ONE))
def test_saved_model_and_from_config_round_trip(block, tmp_path):
    config, shape = ONE[block]
    x = channels_last(rand(shape, block=block)).astype(np.float32)
    layer, _ = build(block, config, name="blk")
    inp = keras.Input(shape=x.shape[1:])
    model = keras.Model(inp, layer(inp))
    want = as_np(model(x))
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert np.array_equal(as_np(loaded(x)), want)
    a, b = nk.export_weights(model), nk.export_weights(loaded)
    assert list(a) == [f"blk.{n}" for n in tensors(layer.spec.schema())]
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # from_config: the full spec config, data_format and implementation survive
    cfg = layer.get_config()
    assert {k: cfg[k] for k in layer.spec.to_dict()} == layer.spec.to_dict()
    clone = type(layer).from_config(cfg)
    assert clone.get_config() == cfg
    nk.load_weights(clone, nk.export_weights(layer))
    assert np.array_equal(as_np(clone(x)), as_np(layer(x)))


def test_get_config_keeps_data_format_and_inferred_channels():
    layer = nk.NonLocalBlock2D(mode="dot_product", data_format="channels_first")
    layer(np.zeros((1, 6, 4, 4), np.float32))
    cfg = layer.get_config()
    assert cfg["in_channels"] == 6 and cfg["data_format"] == "channels_first"
    assert cfg["mode"] == "dot_product" and cfg["implementation"] == "auto"
    assert nk.NonLocalBlock2D.from_config(cfg).spec == layer.spec


# ---------------------------------------------------------------------------------------------
# unknown sizes: functional models on keras.Input((None, None, C)), compute_output_shape, .keras
# ---------------------------------------------------------------------------------------------


def check_unknown_sizes(block: str, directory) -> None:
    """A functional model on ``keras.Input`` with unknown batch and spatial sizes (RGA: its fixed
    (H, W), batch still unknown) runs ``block`` at two input sizes, eagerly and through ``predict``,
    matches the reference, and round-trips through a ``.keras`` file. Backend-neutral: the other
    backends run it in a subprocess (``test_unknown_sizes_on_the_other_backends``)."""
    config, shape = ONE[block]
    spec = make_spec(block, config)
    c, fixed = shape[1], spec.fixed_spatial_size
    spatial = fixed or (None,) * len(shape[2:])
    symbolic = (None, *spatial, c)
    layer = getattr(nk, block)(**config, **({"query_chunk_size": 5} if spec.query_chunked else {}), name="blk")
    inp = keras.Input(symbolic[1:])
    out = layer(inp)
    assert tuple(out.shape) == symbolic and tuple(layer.compute_output_shape(symbolic)) == symbolic
    if spec.attention is not None:  # the map's sizes are symbolic too
        _, attn = layer(inp, return_attention=True)
        assert attn.shape[0] is None
    model = keras.Model(inp, out)
    w = random_weights(spec.schema(), np.random.default_rng(0))
    nk.load_weights(layer, w)
    sizes = [shape, (shape[0] + 1, c, *(s if fixed else s + 3 for s in shape[2:]))]
    xs = [rand(size, block=block) for size in sizes]
    inputs = [channels_last(x).astype(np.float32) for x in xs]
    want = [channels_last(reference(block, x, w, config)) for x in xs]
    got = [as_np(model(x)) for x in inputs]
    for x, y, ref in zip(inputs, got, want):
        assert y.shape == ref.shape and error(y, ref) <= 1e-5
        assert error(model.predict(x, verbose=0), ref) <= 1e-5
    path = os.path.join(directory, f"{block}.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert tuple(loaded.inputs[0].shape) == symbolic
    for x, y in zip(inputs, got):
        assert np.array_equal(as_np(loaded(x)), y)


@pytest.mark.parametrize("block", sorted(ONE))
def test_functional_model_with_unknown_sizes(block, tmp_path):
    check_unknown_sizes(block, tmp_path)


@pytest.mark.parametrize("block", sorted(ONE))
def test_every_size_symbolic_in_a_traced_function(block):
    """Traced once with every size unknown (tf.function with a None signature: ops see symbolic
    shapes, never ints), then run at two sizes."""
    config, shape = ONE[block]
    spec = make_spec(block, config)
    layer, w = build(block, config)
    c, fixed = shape[1], spec.fixed_spatial_size
    signature = tf.TensorSpec((None, *(fixed or (None,) * len(shape[2:])), c), tf.float32)
    traced = tf.function(lambda t: layer(t), input_signature=[signature])
    for size in (shape, (1, c, *(s if fixed else s + 2 for s in shape[2:]))):
        x = rand(size, block=block)
        ref = channels_last(reference(block, x, w, config))
        assert error(as_np(traced(channels_last(x).astype(np.float32))), ref) <= 1e-5
    assert traced.experimental_get_tracing_count() == 1


def test_compute_output_shape_checks_the_input():
    layer = nk.NonLocalBlock3D(in_channels=8, data_format="channels_first")
    assert layer.compute_output_shape((None, 8, None, None, None)) == (None, 8, None, None, None)
    assert layer.compute_output_shape((2, 8, 3, 5, 4)) == (2, 8, 3, 5, 4)
    with pytest.raises(InputError, match=r"expected 8 channels, got 4 \(input shape \(None, 4, None, 5, 4\)"):
        layer.compute_output_shape((None, 4, None, 5, 4))
    assert nk.Scale().compute_output_shape((None, 3)) == (None, 3)


# ---------------------------------------------------------------------------------------------
# init, data format, channel inference
# ---------------------------------------------------------------------------------------------


def test_bn_conventions_follow_the_spec():
    layer = nk.NonLocalBlock2D(in_channels=4, bn_eps=1e-3, bn_momentum=0.01)
    layer.build((None, 4, 4, 4))
    bn = layer.bn
    assert bn.epsilon == pytest.approx(1e-3) and bn.momentum == pytest.approx(0.99)
    default = nk.SelfAttention(in_channels=8)
    assert default.data_format == keras.config.image_data_format() == "channels_last"


def test_channels_first_equals_channels_last():
    x = rand((2, 6, 5, 7)).astype(np.float32)
    last, w = build("NonLocalBlock2D", dict(in_channels=6, mode="concatenation"))
    first = nk.NonLocalBlock2D(in_channels=6, mode="concatenation", data_format="channels_first")
    nk.load_weights(first, w)
    a = as_np(first(x))
    b = np.moveaxis(as_np(last(np.moveaxis(x, 1, -1))), -1, 1)
    assert error(a, b) <= 1e-6


def test_in_channels_inferred_and_checked_at_build():
    layer = nk.NonLocalBlock2D(mode="gaussian")
    assert not layer.built
    out = layer(np.zeros((1, 4, 4, 6), np.float32))
    assert layer.spec.in_channels == 6 and out.shape == (1, 4, 4, 6)
    cam = nk.ChannelAttention()
    cam(np.zeros((1, 3, 3, 5), np.float32))
    assert cam.spec.in_channels is None  # CAM has no convs: any channel count
    with pytest.raises(InputError, match="expected 4 channels, got 6"):
        nk.SelfAttention(in_channels=4, qk_ratio=2)(np.zeros((1, 4, 4, 6), np.float32))


def test_unbuilt_layer_without_channels_cannot_export():
    with pytest.raises(ValueError, match="in_channels is unknown"):
        nk.export_weights(nk.NonLocalBlock2D())


def test_unbuilt_layer_without_channels_says_so_everywhere(tmp_path):
    """Not "expected an nlattn block": the framework-neutral calls say what is missing."""
    layer = nk.NonLocalBlock2D(mode="dot_product")
    for call in (
        lambda: nlattn.save_weights(tmp_path / "w.safetensors", layer),
        lambda: nlattn.export_weights(layer),
        lambda: layer.spec,
    ):
        with pytest.raises(ConfigError, match="NonLocalBlock2D: in_channels is unknown until the layer is built"):
            call()
    assert not (tmp_path / "w.safetensors").exists()
    layer(np.zeros((1, 4, 4, 6), np.float32))  # once built, it saves
    path = nlattn.save_weights(tmp_path / "w.safetensors", layer)
    assert nlattn.load_file(path).config["in_channels"] == 6


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "block, config, shape, dtype, needle",
    [
        ("NonLocalBlock2D", dict(), (2, 5, 4), "float32", "rank-4"),  # in_channels to be inferred
        ("Scale", dict(), (2, 3), "int32", "floating-point"),
    ],
)
def test_input_errors(block, config, shape, dtype, needle):
    with pytest.raises(InputError, match=needle):
        getattr(nk, block)(**config)(np.zeros(shape, dtype))


def test_input_errors_after_build():
    layer = nk.NonLocalBlock2D(in_channels=4)
    layer(np.zeros((1, 4, 4, 4), np.float32))
    with pytest.raises(InputError, match=r"expected 4 channels, got 3 \(input shape \(1, 4, 4, 3\), channels_last\)"):
        layer(np.zeros((1, 4, 4, 3), np.float32))
    with pytest.raises(InputError, match="floating-point"):
        layer(np.zeros((1, 4, 4, 4), np.int64))


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_input_errors_show_the_shape_as_passed(data_format):
    """The shape in a message is the one the user passed, in their layout (not reordered)."""
    layer = nk.SelfAttention(in_channels=4, qk_ratio=2, data_format=data_format)
    shape = (1, 5, 6, 3) if data_format == "channels_last" else (1, 3, 5, 6)
    with pytest.raises(InputError) as e:
        layer(np.zeros(shape, np.float32))
    assert f"expected 4 channels, got 3 (input shape {shape}, {data_format})" in str(e.value)
    layout = "(B, H, W, C)" if data_format == "channels_last" else "(B, C, H, W)"
    with pytest.raises(InputError, match=rf"rank-4 input {re.escape(layout)} \({data_format}\), got shape \(2, 5, 4\)"):
        nk.NonLocalBlock2D(data_format=data_format)(np.zeros((2, 5, 4), np.float32))
    rga = nk.RelationAwareAttention(8, (5, 6), cha_ratio=2, spa_ratio=2, down_ratio=2, data_format=data_format)
    wrong = (1, 6, 5, 8) if data_format == "channels_last" else (1, 8, 6, 5)
    with pytest.raises(InputError, match=r"built for spatial size \(5, 6\).*got \(6, 5\)"):
        rga(np.zeros(wrong, np.float32))


def test_keras_config_errors():
    with pytest.raises(ConfigError, match="data_format"):
        nk.ChannelAttention(data_format="NHWC")
    with pytest.raises(ConfigError, match="spatial_size"):  # checked before in_channels is known
        nk.RelationAwareAttention(in_channels=8)
    with pytest.raises(ConfigError, match="must divide"):  # validated when building
        nk.NonLocalBlock2D(mode="gaussian", num_heads=3)(np.zeros((1, 4, 4, 4), np.float32))


# ---------------------------------------------------------------------------------------------
# half precision and mixed-precision policies (their conformance columns: keras, keras-mixed)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "mixed_bfloat16", "mixed_float16"])
def test_evc_codebook_stays_float32(dtype):
    """As torch keeps it: the codebook's logits s_k‖x − d_k‖² are large, a half-precision scale
    alone moves the assignments by percents. The other variables follow the policy."""
    config, shape = ONE["ExplicitVisualCenter"]
    layer, w = build("ExplicitVisualCenter", config, dtype=dtype)
    policy = keras.dtype_policies.get(dtype)
    encoding = layer.lvc.LVC[3]
    assert [v.dtype for v in (encoding.codewords, encoding.scale)] == ["float32", "float32"]
    assert layer.l_MLP.layer_scale_1.dtype == layer.cnv1.kernel.dtype == policy.variable_dtype
    assert (
        nk.export_weights(layer)["lvc.LVC.3.codewords"].tobytes()
        == w["lvc.LVC.3.codewords"].astype(np.float32).tobytes()
    )  # not rounded through the half dtype
    x = rand(shape)
    out, assign = layer(channels_last(x).astype(np.float32), return_attention=True)
    assert out.dtype == assign.dtype == policy.compute_dtype
    ref, ref_assign = reference("ExplicitVisualCenter", x, w, config, return_attention=True)
    assert error(as_np(out).astype(np.float64), channels_last(ref)) <= 2e-2
    assert error(as_np(assign).astype(np.float64), ref_assign) <= 2e-2


def test_mixed_policy_keeps_variables_float32_and_computes_in_half():
    layer, w = build("NonLocalBlock2D", dict(in_channels=8, mode="concatenation"), dtype="mixed_float16")
    assert {v.dtype for v in layer.weights} == {"float32"}
    x = 10 * rand((2, 8, 7, 9))
    out = layer(channels_last(x).astype(np.float32))
    assert out.dtype == "float16"
    ref = channels_last(reference("NonLocalBlock2D", x, w, dict(in_channels=8, mode="concatenation")))
    assert error(as_np(out).astype(np.float64), ref) <= 2e-2


@pytest.mark.parametrize("implementation", ["auto", "naive"])
def test_3d_non_local_runs_in_float16_on_tensorflow(implementation):
    """TF has no CPU MaxPool3D kernel for float16; the sub-sampling is a reshape and a max (which
    also propagates NaN), so the 3D block runs in float16 like the others."""
    config = dict(in_channels=8, mode="dot_product")
    layer, w = build("NonLocalBlock3D", config, dtype="float16", implementation=implementation)
    x = rand((2, 8, 3, 5, 6))
    out = layer(channels_last(x).astype(np.float16))
    ref = channels_last(reference("NonLocalBlock3D", x, w, config))
    assert out.dtype == "float16" and error(as_np(out).astype(np.float64), ref) <= 2e-2


def test_keras_dtypes_variable_restricts_every_column(monkeypatch):
    from nlattn.tf.conformance import KerasAdapter, KerasMixedAdapter, KerasNaiveAdapter

    assert KerasAdapter().dtypes == KerasNaiveAdapter().dtypes == ("float32", "bfloat16", "float16")
    assert KerasMixedAdapter().dtypes == ("bfloat16", "float16") and KerasMixedAdapter().name == "keras-mixed"
    monkeypatch.setenv("NLATTN_KERAS_DTYPES", "float32")
    assert KerasAdapter().dtypes == ("float32",) and KerasMixedAdapter().dtypes == ()
    monkeypatch.setenv("NLATTN_KERAS_DTYPES", "float16, bfloat16")
    assert KerasAdapter().dtypes == ("bfloat16", "float16")


# ---------------------------------------------------------------------------------------------
# Scale
# ---------------------------------------------------------------------------------------------


def test_scale_gamma_is_trainable_with_the_right_gradient():
    layer = nk.Scale()
    x = tf.constant(rand((2, 3, 4)), tf.float32)
    assert not as_np(layer(x)).any()  # init 0: the gate starts closed
    assert [v.path.split("/")[-1] for v in layer.trainable_weights] == ["gamma"]
    assert layer.gamma.shape == (1,) and as_np(layer.gamma).tolist() == [0.0]
    layer.gamma.assign([0.75])
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = tf.reduce_sum(layer(x) * x)
    gx, gg = tape.gradient(y, [x, layer.gamma.value])
    assert np.allclose(as_np(gx), 2 * 0.75 * as_np(x), atol=1e-6)
    assert np.allclose(as_np(gg), [np.sum(as_np(x) ** 2)], rtol=1e-6)
    assert as_np(nk.Scale(init=0.5)(x)).tolist() == (0.5 * as_np(x)).tolist()
    assert nk.Scale.from_config(nk.Scale(init=0.25).get_config()).spec.init == 0.25


def test_scale_is_the_gate_of_the_attention_blocks():
    layer = nk.CrissCrossAttention(in_channels=8)
    layer.build((None, 3, 3, 8))
    assert isinstance(layer.gamma, nk.Scale)
    assert any(v is layer.gamma.gamma for v in layer.trainable_weights)


def test_scale_trains_with_fit():
    layer = nk.Scale(init=0.0)
    inp = keras.Input(shape=(3,))
    model = keras.Model(inp, layer(inp))
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    x = np.ones((4, 3), np.float32)
    model.fit(x, 2 * x, epochs=1, batch_size=4, verbose=0)
    # one SGD step on mean((g·x − 2x)²) from g = 0: g = 0.1 · 2·2 = 0.4
    assert float(as_np(layer.gamma)[0]) == pytest.approx(0.4, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------------------------


def _nested_model():
    inner_in = keras.Input(shape=(4, 5, 8))
    inner = keras.Model(inner_in, nk.NonLocalBlock2D(in_channels=8, name="nl")(inner_in), name="stage2")
    inp = keras.Input(shape=(4, 5, 8))
    h = nk.SelfAttention(in_channels=8, name="sa")(inp)
    h = nk.NonLocalBlock2D(in_channels=8, mode="dot_product", name="nl1")(h)
    return keras.Model(inp, inner(h))


def test_model_with_several_blocks_round_trips():
    model = _nested_model()
    w = nk.export_weights(model)
    assert "sa.gamma" in w and "nl1.theta.weight" in w and "stage2.nl.bn.running_var" in w
    rng = np.random.default_rng(3)
    new = {
        k: (rng.uniform(0.5, 1.5, v.shape) if k.endswith("running_var") else rng.normal(0, 0.5, v.shape)).astype(
            np.float32
        )
        for k, v in w.items()
    }
    nk.load_weights(model, new)
    got = nk.export_weights(model)
    assert got.keys() == new.keys() and all(np.array_equal(got[k], new[k]) for k in new)
    x = rand((2, 4, 5, 8)).astype(np.float32)
    # the model is the composition of the blocks' references
    cfg = lambda p: {k[len(p) + 1 :]: v for k, v in new.items() if k.startswith(p + ".")}  # noqa: E731
    y = reference("SelfAttention", np.moveaxis(x, -1, 1), cfg("sa"), dict(in_channels=8))
    y = reference("NonLocalBlock2D", y, cfg("nl1"), dict(in_channels=8, mode="dot_product"))
    y = reference("NonLocalBlock2D", y, cfg("stage2.nl"), dict(in_channels=8))
    assert error(as_np(model(x)), np.moveaxis(y, 1, -1)) <= 1e-5


def test_model_load_is_atomic_across_blocks():
    model = _nested_model()
    before = nk.export_weights(model)
    bad = {k: v + 1 for k, v in before.items()}
    bad["stage2.nl.W.weight"] = np.zeros((1, 1))
    bad["nl2.theta.weight"] = np.zeros(1)
    with pytest.raises(WeightError) as e:
        nk.load_weights(model, bad)
    assert "'stage2.nl.W.weight' has shape (1, 1)" in str(e.value)
    assert "(NonLocalBlock2D at 'stage2.nl')" in str(e.value)
    assert "unexpected 'nl2.theta.weight'" in str(e.value)
    after = nk.export_weights(model)
    assert all(np.array_equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("*.safetensors")), ids=lambda p: p.stem)
def test_files_written_by_nlattn_0_1_load_into_a_fresh_layer(path, tmp_path):
    """Canonical files written before the one-shape refactor load into a fresh layer, which then
    holds exactly the file's weights, in schema order (also after a .weights.h5 round trip)."""
    ckpt = nlattn.load_file(path)
    layer = nk.BLOCKS[ckpt.block](**ckpt.config)
    nk.load_weights(layer, ckpt.weights)
    got = nk.export_weights(layer)
    assert list(got) == list(tensors(layer.spec.schema())) and got.keys() == ckpt.weights.keys()
    assert all(got[k].tobytes() == np.asarray(v, np.float32).tobytes() for k, v in ckpt.weights.items())
    shape = channels_last(np.zeros(layer.spec.example_input_shape())).shape[1:]
    saved = keras.Sequential([keras.Input(shape), layer])
    h5 = str(tmp_path / f"{path.stem}.weights.h5")
    saved.save_weights(h5)
    fresh = nk.BLOCKS[ckpt.block](**ckpt.config)
    keras.Sequential([keras.Input(shape), fresh]).load_weights(h5)
    again = nk.export_weights(fresh)
    assert all(again[k].tobytes() == got[k].tobytes() for k in got)


@pytest.mark.parametrize("block", sorted(ONE))
def test_keras_names_have_no_dots_and_weight_paths_are_unique(block):
    """Dotted layer or weight names break Keras on the torch backend (its parameters are keyed by
    variable path); the canonical prefixes are kept, dots as underscores."""
    config, shape = ONE[block]
    layer, _ = build(block, config, name="blk")
    layer(channels_last(rand(shape, block=block)).astype(np.float32))
    names = [sub.name for sub in layer._flatten_layers(include_self=True, recursive=True)]
    paths = [v.path for v in layer.weights]
    assert not [n for n in names + paths if "." in n]
    assert len(set(paths)) == len(paths)
    assert all(p.startswith("blk/") for p in paths)


# ---------------------------------------------------------------------------------------------
# data parallelism: the synchronized keyword, SAGAN's split (the distributed steps themselves:
# tests/test_keras_distributed.py)
# ---------------------------------------------------------------------------------------------

#: the blocks whose schema can hold BatchNorm layers, which take ``synchronized``
SYNC_BLOCKS = sorted(b for b in ONE if nk.BLOCKS[b].has_batch_norm)


def test_synchronized_is_a_keyword_of_the_blocks_with_batchnorm():
    assert SYNC_BLOCKS == sorted(b for b, case in ONE_CASE_PER_BLOCK.items() if case.has_batchnorm)
    for block, (config, _) in ONE.items():
        cls = nk.BLOCKS[block]
        params = inspect.signature(cls).parameters
        assert ("synchronized" in params) == cls.has_batch_norm, block
        if cls.has_batch_norm:
            assert params["synchronized"].default is False and not cls(**config).synchronized
        else:
            with pytest.raises(ConfigError, match=f"{block}: unknown option.*synchronized"):
                cls(**config, synchronized=True)
            with pytest.raises(ConfigError, match=f"{block} has no BatchNorm"):
                cls(**config).synchronized = True
    with pytest.raises(ConfigError, match="NonLocalBlock2D: synchronized must be a bool, got 'True'"):
        nk.NonLocalBlock2D(8, synchronized="True")


def check_synchronized_on_this_backend() -> None:
    """tensorflow: every BatchNorm gets Keras' ``synchronized=True`` (moments all-reduced over
    the replicas); jax: accepted, Keras' own flag left False (Keras refuses it there, and
    ``keras.distribution`` normalises with the global batch's moments anyway); torch: refused,
    Keras has no data-parallel engine there. Run on every backend
    (``test_unknown_sizes_on_the_other_backends``)."""
    backend = keras.backend.backend()
    if backend == "torch":
        with pytest.raises(ConfigError, match="NonLocalBlock2D: synchronized=True needs the tensorflow backend"):
            nk.NonLocalBlock2D(8, synchronized=True)
        layer = nk.NonLocalBlock2D(8)
        with pytest.raises(ConfigError, match="synchronized=True needs"):
            layer.synchronized = True
        assert not layer.synchronized and not nk.convert_sync_batchnorm(layer, synchronized=False).synchronized
        return
    layer = nk.ExplicitVisualCenter(8, num_codes=4, synchronized=True)
    bns = layer.batch_norms()
    assert len(bns) == 9 and all(bn.synchronized == (backend == "tensorflow") for bn in bns)
    x = np.random.default_rng(0).normal(size=(2, 5, 6, 8)).astype(np.float32)
    assert as_np(layer(x, training=True)).shape == x.shape


def test_synchronized_on_tensorflow():
    check_synchronized_on_this_backend()


@pytest.mark.parametrize("block", SYNC_BLOCKS)
def test_synchronized_reaches_every_batchnorm_and_the_config(block):
    """Every BatchNorm of the schema is synchronised (also when set after build); the config
    keeps the flag. Outside a strategy (one replica) the step is the unsynchronised one."""
    config, shape = ONE[block]
    layer, w = build(block, config, synchronized=True, dtype="float64")
    n = sum(isinstance(t, BatchNorm) for t in layer.spec.schema())
    assert n == len(layer.batch_norms()) > 0 and all(bn.synchronized for bn in layer.batch_norms())
    cfg = layer.get_config()
    assert cfg["synchronized"] is True and type(layer).from_config(cfg).synchronized
    plain, _ = build(block, config, dtype="float64")
    assert plain.get_config()["synchronized"] is False
    x = channels_last(rand(shape))
    assert error(as_np(layer(x, training=True)), as_np(plain(x, training=True))) <= 1e-12
    ours, theirs = nk.export_weights(layer), nk.export_weights(plain)
    assert all(error(ours[k], theirs[k]) <= 1e-12 for k in ours)  # the running statistics too
    plain.synchronized = True  # once built: the BatchNorms follow
    assert all(bn.synchronized for bn in plain.batch_norms())
    plain.synchronized = False
    assert not any(bn.synchronized for bn in plain.batch_norms())


def test_convert_sync_batchnorm_sets_every_block_of_a_model_and_keeps_it(tmp_path):
    model = _nested_model()
    x = rand((2, 4, 5, 8)).astype(np.float32)
    before, want = nk.export_weights(model), as_np(model(x))
    assert nk.convert_sync_batchnorm(model) is model
    found = dict(nk.blocks(model))
    assert [p for p, b in found.items() if b.synchronized] == ["nl1", "stage2.nl"]  # not SelfAttention
    assert all(bn.synchronized for b in found.values() if b.has_batch_norm for bn in b.batch_norms())
    after = nk.export_weights(model)
    assert list(after) == list(before) and all(np.array_equal(after[k], before[k]) for k in before)
    assert np.array_equal(as_np(model(x)), want)  # inference: the running statistics
    path = str(tmp_path / "synchronised.keras")
    model.save(path)
    loaded = dict(nk.blocks(keras.models.load_model(path)))
    assert loaded["stage2.nl"].synchronized and loaded["stage2.nl"].batch_norms()[0].synchronized
    nk.convert_sync_batchnorm(model, synchronized=False)
    assert not any(b.synchronized for b in found.values())
    lazy = nk.NonLocalBlock2D()  # in_channels from the input: not built yet, and not built here
    assert nk.convert_sync_batchnorm(lazy).synchronized and not lazy.built
    lazy(x)
    assert lazy.batch_norms()[0].synchronized


@pytest.mark.parametrize("block", ["SelfAttention", "PositionAttention"])
def test_sagan_blocks_split_into_embed_relation_aggregate_residual(block):
    """As the non-local block (and torch's SAGAN/PAM): Q, K, V (B, 1, N, c); the relation (B, 1,
    N, N); the aggregation without it; the gated residual."""
    config, shape = ONE[block]
    layer, _ = build(block, config, dtype="float64")
    x = keras.ops.convert_to_tensor(channels_last(rand(shape)))
    want = as_np(layer(x))
    q, k, v = layer.embed(x)
    n, c = shape[2] * shape[3], shape[1]
    assert tuple(q.shape) == tuple(k.shape) == (shape[0], 1, n, c // config.get("qk_ratio", 8))
    assert tuple(v.shape) == (shape[0], 1, n, c)
    relation = layer.relation(q, k)
    assert tuple(relation.shape) == (shape[0], 1, n, n)
    assert error(as_np(layer.residual(x, layer.aggregate(q, k, v))), want) <= 1e-12
    assert error(as_np(layer.residual(x, keras.ops.matmul(relation, v))), want) <= 1e-12


# ---------------------------------------------------------------------------------------------
# packaging and the other Keras backends
# ---------------------------------------------------------------------------------------------


def _python(code, **env):
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env={**os.environ, **env}, timeout=300
    )


def test_imports_only_keras_and_names_the_extra_when_missing():
    r = _python(
        "import sys, keras\n"
        "before = set(sys.modules)\n"
        "import nlattn.tf\n"
        "new = {m.split('.')[0] for m in set(sys.modules) - before}\n"
        "print(sorted(new & {'torch', 'jax', 'flax', 'tensorflow'}))"
    )
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == "[]", r.stderr[-2000:]
    r = _python(
        "import sys; sys.modules['keras'] = None\ntry:\n    import nlattn.tf\nexcept ImportError as e:\n    print(e)"
    )
    assert "pip install nlattn[tf]" in r.stdout, r.stdout + r.stderr[-2000:]


#: the Keras backends other than this process's tensorflow, each checked in a subprocess
OTHER_BACKENDS = ["jax", "torch"]


def _backend_env(backend):
    """KERAS_BACKEND, and for jax XLA's CPU optimisation level 0: it only makes the many small
    compiles faster; values are unchanged in meaning and held to the same tolerances."""
    env = {**os.environ, "KERAS_BACKEND": backend}
    if backend == "jax":
        env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
    return env


@pytest.mark.parametrize("backend", OTHER_BACKENDS)
def test_conformance_cli_on_the_other_backends(backend):
    """The whole suite through ``nlattn conformance`` with KERAS_BACKEND=jax / torch (no gradients
    there), in float32 only (``NLATTN_KERAS_DTYPES``): the half-precision columns run here on
    tensorflow, and in every dtype take 6 min on jax."""
    start = time.time()
    r = subprocess.run(
        [sys.executable, "-m", "nlattn.cli", "conformance", "--framework", "keras", "--no-progress"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**_backend_env(backend), "NLATTN_KERAS_DTYPES": "float32"},
    )
    print(f"KERAS_BACKEND={backend} conformance: {time.time() - start:.0f} s")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    table = r.stdout
    assert "keras-cf" in table and "keras-naive" in table and " 0 failed" in table


@pytest.mark.parametrize("backend", OTHER_BACKENDS)
def test_unknown_sizes_on_the_other_backends(backend, tmp_path):
    """``check_unknown_sizes`` for every block with KERAS_BACKEND=jax / torch: symbolic sizes are
    jax's shape-polymorphic dimensions there, and torch's meta tensors; and
    ``check_synchronized_on_this_backend``; ``check_softmax_attention_gradient`` (custom gradients
    differ by backend: jax.custom_gradient, a torch autograd Function)."""
    code = (
        "import sys, keras\n"
        "sys.path.insert(0, 'tests')\n"
        "import test_keras as t\n"
        f"assert keras.backend.backend() == {backend!r}\n"
        "for block in sorted(t.ONE):\n"
        f"    t.check_unknown_sizes(block, {str(tmp_path)!r})\n"
        "t.check_synchronized_on_this_backend()\n"
        "t.check_softmax_attention_gradient('float32')\n"
        "print('ok')"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600, env=_backend_env(backend)
    )
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-2000:] + r.stderr[-3000:]


def test_conformance_cli_prints_keras_columns():
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "nlattn.cli",
            "conformance",
            "--framework",
            "keras",
            "--block",
            "Scale",
            "--block",
            "ChannelAttention",
            "--no-progress",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    header = r.stdout.splitlines()[0].split()
    assert header == ["block", "keras", "keras-cf", "keras-naive", "keras-mixed"]


# ---------------------------------------------------------------------------------------------
# fast paths (implementation="auto")
# ---------------------------------------------------------------------------------------------


def _op_shapes(layer, x):
    """The shape of every TensorFlow op output while ``layer(x)`` runs (eager ops and the bodies
    of any loop they build)."""
    from tensorflow.python.framework import op_callbacks

    shapes = []

    def record(op_type, inputs, attrs, outputs, op_name=None, graph=None):
        for o in outputs or ():
            if o.shape.rank is not None:
                shapes.append((op_type, tuple(o.shape)))

    op_callbacks.add_op_callback(record)
    try:
        layer(x)
    finally:
        op_callbacks.remove_op_callback(record)
    return shapes


FAST = [
    ("NonLocalBlock2D", dict(in_channels=8)),
    ("NonLocalBlock2D", dict(in_channels=8, mode="gaussian", num_heads=2, scale=0.3)),
    ("NonLocalBlock2D", dict(in_channels=8, mode="dot_product", num_heads=2)),
    ("NonLocalBlock2D", dict(in_channels=8, mode="dot_product", scale=0.3)),  # 0.1 ignored scale here
    ("NonLocalBlock2D", dict(in_channels=8, mode="concatenation")),
    ("SelfAttention", dict(in_channels=8, qk_ratio=2)),
    ("PositionAttention", dict(in_channels=8)),
]


@pytest.mark.parametrize("block, config", FAST, ids=[f"{b}-{c.get('mode', '')}" for b, c in FAST])
def test_fast_path_never_materialises_the_relation(block, config):
    # N = 256 queries; M = 64 keys after sub-sampling (SAGAN/PAM: M = N); chunks of 32 queries
    x = rand((2, 16, 16, 8)).astype(np.float32)
    n = 256
    m = 64 if block.startswith("NonLocal") else n
    heads = config.get("num_heads", 1)
    relation = 2 * heads * n * m  # B·heads·N·M elements
    for implementation in ("auto", "naive"):
        layer, _ = build(block, config, implementation=implementation, query_chunk_size=32)
        largest = max(np.prod(s) for _, s in _op_shapes(layer, x))
        if implementation == "auto":  # at most a chunk of the map, or the feature maps themselves
            assert largest <= max(2 * heads * 32 * m, x.size), (block, config, largest)
        else:  # the check can fail: the naive path holds the whole map
            assert largest >= relation


def test_criss_cross_stores_only_row_and_column_energies():
    x = rand((2, 9, 11, 8)).astype(np.float32)
    layer, _ = build("CrissCrossAttention", dict(in_channels=8))
    largest = max(np.prod(s) for _, s in _op_shapes(layer, x))
    assert largest == 2 * 9 * 11 * max(9, 11)  # B·N·max(H, W): row and column energies apart, no more


@pytest.mark.parametrize("block, config", FAST, ids=[f"{b}-{c.get('mode', '')}" for b, c in FAST])
def test_fast_path_compiles_and_matches_the_reference(block, config):
    # 7 × 9 = 63 queries in chunks of 16: four chunks, the last one ragged
    x64 = rand((2, 8, 7, 9))
    layer, w = build(block, config, query_chunk_size=16)
    x = tf.constant(channels_last(x64), tf.float32)
    compiled = as_np(tf.function(lambda t: layer(t), jit_compile=True)(x))
    ref = channels_last(reference(block, x64, w, config))
    assert error(compiled, ref) <= 1e-5
    assert error(as_np(layer(x)), ref) <= 1e-5
    # asking for the map takes the materialising path, with the same output
    out, attn = layer(x, return_attention=True)
    assert error(as_np(out), ref) <= 1e-5
    _, ref_attn = reference(block, x64, w, config, return_attention=True)
    assert error(as_np(attn), ref_attn) <= 1e-5


def test_implementation_is_accepted_by_every_class_and_kept_in_the_config():
    for block, (config, _) in ONE.items():
        for implementation in ("auto", "naive"):
            layer = getattr(nk, block)(**config, implementation=implementation)
            assert layer.get_config()["implementation"] == implementation
    chunked = {b for b in ONE if "query_chunk_size" in getattr(nk, b)(**ONE[b][0]).get_config()}
    assert chunked == {b for b in ONE if CONFIGS[b].query_chunked}
    assert {"NonLocalBlock2D", "SelfAttention", "PositionAttention", "DisentangledNonLocal2D"} <= chunked
    assert nk.SelfAttention(in_channels=8, query_chunk_size=7).get_config()["query_chunk_size"] == 7


def test_concatenation_fast_path_gradients_match_naive():
    x = tf.constant(rand((2, 6, 7, 8)), tf.float32)
    grads = []
    for implementation in ("auto", "naive"):
        layer, _ = build(
            "NonLocalBlock2D", dict(in_channels=8, mode="concatenation", bn_layer=False), implementation=implementation
        )
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.reduce_sum(tf.sin(layer(x)))
        grads.append([as_np(g) for g in tape.gradient(y, [x] + [v.value for v in layer.trainable_weights])])
    for a, b in zip(*grads):
        assert error(a, b) <= 1e-5


# ---------------------------------------------------------------------------------------------
# training-grade fast paths: the chunked softmax attention's custom gradient (probabilities
# recomputed chunk by chunk from the saved log-sum-exp) on every backend, and no N×M array in
# the compiled gradient, stacked loop residuals included
# ---------------------------------------------------------------------------------------------


def _gradients(f, args, cotangent):
    """The gradients of sum(f(*args) · cotangent) w.r.t. every arg, as float64 NumPy arrays, on
    this process's Keras backend."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        ts = [tf.constant(a) for a in args]
        with tf.GradientTape() as tape:
            tape.watch(ts)
            y = tf.reduce_sum(tf.cast(f(*ts), tf.float64) * cotangent)
        grads = tape.gradient(y, ts)
    elif backend == "jax":
        import jax

        grads = jax.grad(lambda *a: (f(*a).astype("float32") * cotangent).sum(), tuple(range(len(args))))(*args)
    else:
        import torch

        ts = [torch.tensor(a, requires_grad=True) for a in args]
        (f(*ts).double() * torch.tensor(cotangent)).sum().backward()
        grads = [t.grad for t in ts]
    return [np.asarray(as_np(g), np.float64) for g in grads]


def check_softmax_attention_gradient(dtype: str) -> None:
    """dq, dk, dv of ``kernels.softmax_attention`` (two heads, c = 3 ≠ cv = 5, 11 queries in
    chunks of 4 with a ragged last one, scale 0.5; or in one chunk, no scale) against the gradient
    of softmax(s·q kᵀ) v formed in float64 (by hand: P = softmax, dE = P ∘ (dO vᵀ − rowsum(dO vᵀ ∘ P))).
    Backend-neutral: the other backends run it in a subprocess."""
    from nlattn.tf import kernels

    r = np.random.default_rng(0)
    q, k = (r.normal(size=(2, 2, n, 3)) for n in (11, 7))
    v, d_out = r.normal(size=(2, 2, 7, 5)), r.normal(size=(2, 2, 11, 5))
    for scale, chunk in ((0.5, 4), (None, 16)):
        s = 1.0 if scale is None else scale
        e = s * q @ np.swapaxes(k, -1, -2)
        p = np.exp(e - e.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        dp = d_out @ np.swapaxes(v, -1, -2)
        de = s * p * (dp - (dp * p).sum(-1, keepdims=True))
        want = (de @ k, np.swapaxes(de, -1, -2) @ q, np.swapaxes(p, -1, -2) @ d_out)
        args = [t.astype(dtype) for t in (q, k, v)]
        got = _gradients(lambda *a, s=scale, c=chunk: kernels.softmax_attention(*a, s, query_chunk_size=c), args, d_out)
        for g, w in zip(got, want):
            assert error(g, w) <= {"float32": 1e-5, "float64": 1e-9}[dtype], (dtype, scale, chunk)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_softmax_attention_gradient_equals_the_materialised_one(dtype):
    check_softmax_attention_gradient(dtype)


def _largest_compiled_array(fn, *args):
    """The element count of the largest array in the XLA program of ``fn`` (jit_compile=True):
    every intermediate, loop bodies and the buffers a loop stacks its per-step values in."""
    hlo = tf.function(fn, jit_compile=True).experimental_get_compiler_ir(*args)(stage="hlo")
    return max(math.prod(int(d) for d in dims.split(",") if d) for dims in re.findall(r"\b[a-z]\w*\[([\d,]*)\]", hlo))


def _training_step(layer):
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.reduce_sum(layer(x, training=True))
        return tape.gradient(y, [x, *layer.trainable_variables])

    return step


#: every kernel (PositionAttention is SelfAttention's path), multi-head and shared θ = φ
TRAINED = [
    ("NonLocalBlock2D", dict(in_channels=8)),
    ("NonLocalBlock2D", dict(in_channels=8, mode="gaussian", num_heads=2, scale=0.3)),
    ("NonLocalBlock2D", dict(in_channels=8, num_heads=2, share_query_key=True, scale=0.3)),
    ("NonLocalBlock2D", dict(in_channels=8, mode="dot_product", num_heads=2)),
    ("NonLocalBlock2D", dict(in_channels=8, mode="concatenation")),
    ("SelfAttention", dict(in_channels=8, qk_ratio=2)),
]


@pytest.mark.parametrize("block, config", TRAINED, ids=[f"{b}-{c.get('mode', '')}-{len(c)}" for b, c in TRAINED])
def test_fast_path_training_step_holds_nothing_as_large_as_the_relation(block, config):
    """N = 256 queries, M = 64 keys (sub-sampled; SAGAN/PAM: M = N), chunks of 32: the compiled
    training step (train mode, gradients w.r.t. the input and every weight) has no array of
    B·heads·N·M elements on the fast path; the naive one has."""
    x = tf.constant(rand((2, 16, 16, 8)), tf.float32)
    m = 64 if block.startswith("NonLocal") else 256
    relation = 2 * config.get("num_heads", 1) * 256 * m
    largest = {}
    for implementation in ("auto", "naive"):
        layer, _ = build(block, config, implementation=implementation, query_chunk_size=32)
        largest[implementation] = _largest_compiled_array(_training_step(layer), x)
    assert largest["naive"] >= relation
    assert largest["auto"] < relation / 4, largest
