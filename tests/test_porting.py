"""Weights move between torch, Keras and Flax through the canonical dict, bit for bit.

Blocks are built with ``nlattn.build`` and ported with ``nlattn.export_weights`` /
``nlattn.load_weights`` (which dispatch on the block's framework); outputs after a port are
compared with the float64 reference (DESIGN §5: float32 error <= 1e-5 relative to
max(1, max|ref|)). Layouts: torch is channels-first, Keras (default) and Flax channels-last.
"""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import keras
import numpy as np
import pytest
import torch
from flax import nnx, serialization

import nlattn
from nlattn import WeightError, make_config
from nlattn.cli import main
from nlattn.numpy_ref import run
from nlattn.specs import random_weights, tensors
from nlattn.weights import WeightFileError, framework_of
from nlattn.weights.convert import keras_input_shape

FRAMEWORKS = ("torch", "tf", "jax")
TOL = 1e-5

#: one small config per block class, and its channels-first input shape
CONFIGS = {
    "NonLocalBlock1D": (dict(in_channels=4, mode="concatenation"), (2, 4, 6)),
    "NonLocalBlock2D": (dict(in_channels=4, pool_first=True, scale=0.5), (2, 4, 4, 6)),
    "NonLocalBlock3D": (dict(in_channels=4, mode="dot_product", bn_layer=False), (1, 4, 2, 4, 4)),
    "SelfAttention": (dict(in_channels=8), (2, 8, 3, 3)),
    "PositionAttention": (dict(in_channels=8, qk_ratio=4), (1, 8, 3, 4)),
    "ChannelAttention": (dict(in_channels=4), (2, 4, 3, 3)),
    "CrissCrossAttention": (dict(in_channels=8, recurrence=2), (1, 8, 3, 4)),
    "RelationAwareAttention": (
        dict(in_channels=8, spatial_size=(2, 4), cha_ratio=2, spa_ratio=2, down_ratio=2),
        (2, 8, 2, 4),
    ),
    "ExplicitVisualCenter": (dict(in_channels=4, num_codes=3, mlp_ratio=2), (1, 4, 4, 4)),
    "NonLocalMeans": (dict(patch_size=3, patch_distance=1, h=0.5), (1, 2, 5, 5)),
    "Scale": (dict(init=0.25), (2, 3, 4)),
}


@pytest.fixture(scope="module")
def blocks():
    """Built on first use and reused: {(framework, block name): block}."""
    cache = {}

    def get(fw, name):
        if (fw, name) not in cache:
            cache[fw, name] = nlattn.build(name, fw, **CONFIGS[name][0])
        return cache[fw, name]

    return get


def weights32(name, seed):
    spec = make_config(name, **CONFIGS[name][0])
    return {k: v.astype(np.float32) for k, v in random_weights(spec.schema(), np.random.default_rng(seed)).items()}


def forward(fw, block, x):
    """Eval-mode output of a block on a channels-first float64 array, as channels-first float64."""
    x32 = x.astype(np.float32)
    if fw == "torch":
        with torch.no_grad():
            return block.eval()(torch.from_numpy(x32)).numpy().astype(np.float64)
    last = np.moveaxis(x32, 1, -1)
    if fw == "tf":
        out = keras.ops.convert_to_numpy(block(last, training=False))
    else:  # one compiled call: much faster than op-by-op dispatch for these small inputs
        block.eval()
        out = np.asarray(nnx.jit(lambda m, v: m(v))(block, jnp.asarray(last)))
    return np.moveaxis(out, -1, 1).astype(np.float64)


def error(out, ref):
    return float(np.max(np.abs(out - ref)) / max(1.0, float(np.max(np.abs(ref)))))


def assert_bit_exact(got, expected, names):
    assert list(got) == names  # canonical names, schema order
    for k in names:
        assert got[k].dtype == np.float32 and got[k].shape == expected[k].shape, k
        assert np.array_equal(got[k], expected[k]), k


# ----------------------------------------------------------------------------------------------
# every block, every ordered pair of frameworks
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_port_every_pair_bit_exact_and_outputs_match(blocks, name):
    config, shape = CONFIGS[name]
    names = list(tensors(make_config(name, **config).schema()))
    for seed, (a, b) in enumerate(itertools.permutations(FRAMEWORKS, 2)):
        w = weights32(name, seed)  # new values for every pair: b held others
        nlattn.load_weights(blocks(a, name), w)
        exported = nlattn.export_weights(blocks(a, name))
        assert_bit_exact(exported, w, names)  # export -> load -> export in a
        nlattn.load_weights(blocks(b, name), exported)
        assert_bit_exact(nlattn.export_weights(blocks(b, name)), w, names)  # ... and in b

    w = weights32(name, 100)
    nlattn.load_weights(blocks("torch", name), w)
    for a, b in (("torch", "tf"), ("tf", "jax")):  # torch -> Keras -> Flax
        nlattn.load_weights(blocks(b, name), nlattn.export_weights(blocks(a, name)))
    x = np.random.default_rng(7).normal(size=shape).astype(np.float32).astype(np.float64)
    ref = run(name, x, {k: v.astype(np.float64) for k, v in w.items()}, config)
    for fw in FRAMEWORKS:
        out = forward(fw, blocks(fw, name), x)
        assert out.shape == ref.shape
        assert error(out, ref) <= TOL, f"{fw} {name}: error {error(out, ref):.2e} after the port"


def test_framework_is_read_from_the_block(blocks):
    assert [framework_of(blocks(fw, "Scale")) for fw in FRAMEWORKS] == list(FRAMEWORKS)
    assert framework_of(torch.nn.Sequential(blocks("torch", "Scale"))) == "torch"


# ----------------------------------------------------------------------------------------------
# failed loads change nothing
# ----------------------------------------------------------------------------------------------


def bad_variants(w):
    missing = {k: v for k, v in w.items() if k != "theta.bias"}
    extra = {**w, "theta.scale": np.ones(2, np.float32)}
    shaped = {**w, "phi.weight": np.ones((2, 4, 1, 2), np.float32)}
    ints = {**w, "g.bias": np.arange(2, dtype=np.int64)}
    nan = {**w, "bn.running_var": np.array([1, np.nan, 1, 1], np.float32)}
    return [
        (missing, "missing 'theta.bias'"),
        (extra, "unexpected 'theta.scale'"),
        (shaped, r"'phi.weight' has shape \(2, 4, 1, 2\)"),
        (ints, "'g.bias' has dtype int64"),
        (nan, "'bn.running_var' has non-finite values"),
    ]


@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_failed_load_changes_nothing(blocks, fw, tmp_path):
    name = "NonLocalBlock2D"
    block = blocks(fw, name)
    w = weights32(name, 11)
    nlattn.load_weights(block, w)
    before = nlattn.export_weights(block)
    for bad, match in bad_variants(w):
        with pytest.raises(WeightError, match=match):
            nlattn.load_weights(block, bad)
    # files: truncated, corrupt, foreign (no metadata), another block's weights
    good = tmp_path / "good.safetensors"
    nlattn.save_weights(good, {k: v + 1 for k, v in w.items()}, config=CONFIGS[name][0], block=name)
    data = good.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-16])
    (tmp_path / "junk.safetensors").write_bytes(b"\x10" + data[1:])
    from safetensors.numpy import save_file

    save_file(w, str(tmp_path / "foreign.safetensors"))
    other = tmp_path / "sagan.safetensors"
    nlattn.save_weights(other, weights32("SelfAttention", 0), config=CONFIGS["SelfAttention"][0], block="SelfAttention")
    bigger = tmp_path / "bigger.safetensors"
    cfg8 = dict(in_channels=8, pool_first=True, scale=0.5)
    nlattn.save_weights(
        bigger, random_weights(make_config(name, **cfg8).schema(), np.random.default_rng(0)), config=cfg8, block=name
    )
    for path, error_type, match in (
        ("cut.safetensors", WeightFileError, "truncated or corrupt"),
        ("junk.safetensors", WeightFileError, "truncated or corrupt"),
        ("foreign.safetensors", WeightFileError, "not an nlattn weights file"),
        ("sagan.safetensors", WeightError, "the weights are for a SelfAttention"),
        ("bigger.safetensors", WeightError, "other parameters than this block's"),
    ):
        with pytest.raises(error_type, match=match):
            nlattn.load_weights(block, tmp_path / path)
    after = nlattn.export_weights(block)
    assert all(np.array_equal(after[k], before[k]) for k in before)
    nlattn.load_weights(block, good)  # and a good file does load
    assert all(np.array_equal(nlattn.export_weights(block)[k], w[k] + 1) for k in w)


# ----------------------------------------------------------------------------------------------
# a model holding several blocks: torch -> Keras -> Flax -> torch
# ----------------------------------------------------------------------------------------------


def test_model_with_several_blocks_ports_round_the_frameworks():
    import nlattn.jax as nj
    import nlattn.tf as nk
    import nlattn.torch as nt

    class TorchNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.nl = nt.NonLocalBlock2D(8, mode="dot_product")
            self.sa = nt.SelfAttention(8)

        def forward(self, x):
            return self.sa(self.nl(x))

    class FlaxNet(nnx.Module):
        def __init__(self, rngs):
            self.nl = nj.NonLocalBlock2D(8, mode="dot_product", rngs=rngs)
            self.sa = nj.SelfAttention(8, rngs=rngs)

        def __call__(self, x):
            return self.sa(self.nl(x))

    keras_net = keras.Sequential(
        [keras.Input((4, 4, 8)), nk.NonLocalBlock2D(8, mode="dot_product", name="nl"), nk.SelfAttention(8, name="sa")]
    )
    torch_net, flax_net = TorchNet(), FlaxNet(nnx.Rngs(0))
    specs = {
        "nl": make_config("NonLocalBlock2D", in_channels=8, mode="dot_product"),
        "sa": make_config("SelfAttention", in_channels=8),
    }
    w = {
        f"{p}.{k}": v.astype(np.float32)
        for seed, (p, spec) in enumerate(specs.items())
        for k, v in random_weights(spec.schema(), np.random.default_rng(seed)).items()
    }

    nlattn.load_weights(torch_net, w)
    chain = (torch_net, keras_net, flax_net, TorchNet())
    for a, b in zip(chain, chain[1:]):
        nlattn.load_weights(b, nlattn.export_weights(a))
        got = nlattn.export_weights(b)
        assert set(got) == set(w) and all(np.array_equal(got[k], w[k]) and got[k].dtype == np.float32 for k in w)

    x = np.random.default_rng(3).normal(size=(2, 8, 4, 4)).astype(np.float32).astype(np.float64)
    w64 = {k: v.astype(np.float64) for k, v in w.items()}
    mid = run("NonLocalBlock2D", x, {k[3:]: v for k, v in w64.items() if k.startswith("nl.")}, specs["nl"].to_dict())
    ref = run("SelfAttention", mid, {k[3:]: v for k, v in w64.items() if k.startswith("sa.")}, specs["sa"].to_dict())
    for fw, net in zip(("torch", "tf", "jax", "torch"), chain):
        assert error(forward(fw, net, x), ref) <= TOL

    bad = {k: v for k, v in w.items() if k != "sa.gamma"}
    for net in chain[:3]:
        before = nlattn.export_weights(net)
        with pytest.raises(WeightError, match=r"sa \(SelfAttention\): missing 'gamma'|missing 'sa\.gamma'"):
            nlattn.load_weights(net, {**bad, "nl.theta.weight": bad["nl.theta.weight"] + 1})
        after = nlattn.export_weights(net)
        assert all(np.array_equal(after[k], before[k]) for k in before)


# ----------------------------------------------------------------------------------------------
# nlattn.build from a checkpoint, and nlattn convert to every framework's format
# ----------------------------------------------------------------------------------------------

ALEXHEX7 = {
    "g.weight": "g.0.weight",
    "g.bias": "g.0.bias",
    "phi.weight": "phi.0.weight",
    "phi.bias": "phi.0.bias",
    "W.weight": "W.0.weight",
    "W.bias": "W.0.bias",
    "bn.weight": "W.1.weight",
    "bn.bias": "W.1.bias",
    "bn.running_mean": "W.1.running_mean",
    "bn.running_var": "W.1.running_var",
}


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """An AlexHex7 NONLocalBlock2D checkpoint (.pth) and its weights in canonical names."""
    spec = make_config("NonLocalBlock2D", in_channels=4)
    w = {k: v.astype(np.float32) for k, v in random_weights(spec.schema(), np.random.default_rng(21)).items()}
    path = tmp_path_factory.mktemp("published") / "nl.pth"
    torch.save({"model": {"nl." + ALEXHEX7.get(k, k): torch.from_numpy(v) for k, v in w.items()}}, path)
    x = np.random.default_rng(22).normal(size=(2, 4, 4, 6)).astype(np.float32).astype(np.float64)
    return path, w, x, run(spec.block, x, {k: v.astype(np.float64) for k, v in w.items()}, spec.to_dict())


@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_build_from_checkpoint_and_file(published, fw, tmp_path):
    path, w, x, ref = published
    ckpt = nlattn.from_checkpoint(str(path), "alexhex7")
    block = nlattn.build(ckpt, fw)
    assert type(block).__name__ == "NonLocalBlock2D" and framework_of(block) == fw
    assert block.spec == ckpt.spec()
    assert error(forward(fw, block, x), ref) <= TOL
    nlattn.save_weights(tmp_path / "nl.safetensors", block)  # from the framework block
    again = nlattn.build(tmp_path / "nl.safetensors", fw)
    assert_bit_exact(nlattn.export_weights(again), w, list(w))


def test_build_passes_framework_keywords(published):
    path, w, x, ref = published
    layer = nlattn.build(nlattn.from_checkpoint(str(path), "alexhex7"), "keras", data_format="channels_first")
    assert layer.data_format == "channels_first" and layer.built
    out = keras.ops.convert_to_numpy(layer(x.astype(np.float32), training=False)).astype(np.float64)
    assert error(out, ref) <= TOL
    assert_bit_exact(nlattn.export_weights(layer), w, list(w))


def test_convert_to_each_framework_format(published, tmp_path, capsys):
    path, w, x, ref = published
    outputs = {}
    for suffix in (".safetensors", ".pt", ".weights.h5", ".msgpack"):
        dst = tmp_path / f"nl{suffix}"
        assert main(["convert", str(path), str(dst), "--source", "alexhex7"]) == 0
        assert "nl.W.1.running_var -> bn.running_var" in capsys.readouterr().out
        outputs[suffix] = dst

    ckpt = nlattn.load_file(outputs[".safetensors"])  # canonical: the reference
    assert error(run(ckpt.block, x, ckpt.weights, ckpt.config), ref) <= TOL

    import nlattn.jax as nj
    import nlattn.tf as nk
    import nlattn.torch as nt

    module = nt.NonLocalBlock2D(4)  # torch state dict
    module.load_state_dict(torch.load(outputs[".pt"], map_location="cpu", weights_only=True))
    assert error(forward("torch", module, x), ref) <= TOL

    layer = nk.NonLocalBlock2D(4)  # Keras weights
    keras.Sequential([keras.Input(keras_input_shape(layer)), layer]).load_weights(outputs[".weights.h5"])
    assert error(forward("tf", layer, x), ref) <= TOL

    block = nj.NonLocalBlock2D(4, rngs=nnx.Rngs(1))  # Flax nnx state
    state = nnx.state(block)
    nnx.replace_by_pure_dict(state, serialization.msgpack_restore(outputs[".msgpack"].read_bytes()))
    nnx.update(block, state)
    assert error(forward("jax", block, x), ref) <= TOL
    for got in (nt.export_weights(module), nk.export_weights(layer), nj.export_weights(block)):
        assert_bit_exact(got, w, list(w))
