"""nlattn.viz (attention maps as arrays and pictures), nlattn.info (cost report) and nlattn.gates.

Maps are checked against the float64 reference's own maps (the rows of the queries, the key grid
of sub-sampled keys, the criss-cross passes composed as dense N×N matrices), against the facts that
a softmax sums to 1 and that a unit-norm feature is closest to itself, and non-local means'
weights against the filter's output. Costs are checked against each framework's own parameter
count, hand counts of FLOPs and a measured peak.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import nlattn
from conftest import FRAMEWORKS, ONE_CASE_PER_BLOCK, driver
from nlattn import viz
from nlattn.cli import main
from nlattn.info import info
from nlattn.numpy_ref import run as reference
from nlattn.specs import make_config, random_weights

TOL = 1e-5  # float32 (docs/design.md §5)

#: (block, config, channels-first shape, queries): every block with a map, sub-sampled keys in 1D/2D/3D
MAP_CASES = {
    "nl1d": ("NonLocalBlock1D", {"in_channels": 4}, (2, 4, 9), [(0,), (8,)]),
    "nl2d": ("NonLocalBlock2D", {"in_channels": 4}, (2, 4, 5, 7), [(0, 0), (4, 6), (2, 3)]),
    "nl2d-heads-dot": (
        "NonLocalBlock2D",
        {"in_channels": 4, "num_heads": 2, "mode": "dot_product"},
        (1, 4, 4, 5),
        [(1, 2)],
    ),
    "nl3d": ("NonLocalBlock3D", {"in_channels": 4}, (1, 4, 3, 5, 4), [(0, 0, 0), (2, 4, 3)]),
    "sagan": ("SelfAttention", {"in_channels": 8}, (2, 8, 4, 5), [(0, 0), (3, 4)]),
    "pam": ("PositionAttention", {"in_channels": 8}, (1, 8, 5, 4), [(2, 1)]),
    "cca": ("CrissCrossAttention", {"in_channels": 8}, (2, 8, 4, 5), [(0, 0), (3, 2)]),
    "cca-r2": ("CrissCrossAttention", {"in_channels": 8, "recurrence": 2}, (1, 8, 4, 5), [(1, 3), (3, 0)]),
    "rga": (
        "RelationAwareAttention",
        {"in_channels": 8, "spatial_size": (4, 5), "cha_ratio": 2, "spa_ratio": 2, "down_ratio": 2},
        (2, 8, 4, 5),
        [(1, 1)],
    ),
    "dnl2d": ("DisentangledNonLocal2D", {"in_channels": 4}, (2, 4, 4, 5), [(0, 0), (3, 4)]),
    "gc": ("GlobalContext", {"in_channels": 8, "ratio": 0.5}, (2, 8, 4, 5), None),
    "cam": ("ChannelAttention", {}, (2, 5, 4, 3), None),
    "evc": ("ExplicitVisualCenter", {"in_channels": 4, "num_codes": 3}, (1, 4, 4, 5), None),
}
SOFTMAX = {"nl1d", "nl2d", "nl3d", "dnl2d", "sagan", "pam", "cca", "cca-r2", "gc", "cam", "evc"}
#: Keras and Flax: the cases that run what viz does differently per framework (the layout and eval
#: mode of ``run``, the one-pass twin CCNet builds). That every block's map in every framework is
#: the reference's is the conformance suite's check; here torch stands for the frameworks.
PER_FRAMEWORK = ("nl2d", "cca-r2", "cam")


def _error(got, want) -> float:
    return float(np.max(np.abs(got - want)) / max(1.0, float(np.max(np.abs(want)))))


def _loaded(fw: str, block: str, config: dict, seed: int = 0):
    spec = make_config(block, **config)
    weights = random_weights(spec.schema(), np.random.default_rng(seed))
    return driver(fw).loaded(block, config, weights), weights


def _dense_criss_cross(a: np.ndarray) -> np.ndarray:
    """One pass's (H, W, H + W) map as the N×N matrix over positions (row-major)."""
    h, w = a.shape[:2]
    dense = np.zeros((h, w, h, w))
    for i in range(h):
        for j in range(w):
            dense[i, j, :, j] += a[i, j, :h]
            dense[i, j, i, :] += a[i, j, h:]
    return dense.reshape(h * w, h * w)


@pytest.mark.parametrize(
    "fw, case", [("torch", c) for c in MAP_CASES] + [(fw, c) for fw in FRAMEWORKS[1:] for c in PER_FRAMEWORK]
)
def test_maps_match_the_reference(fw, case):
    block_name, config, shape, queries = MAP_CASES[case]
    block, weights = _loaded(fw, block_name, config)
    spec = block.spec
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    ref = reference(block_name, x.astype(np.float64), weights, spec.to_dict(), return_attention=True)[1]
    b, spatial = shape[0], shape[2:]
    if block_name in viz.POSITIONAL or block_name == "RelationAwareAttention":
        rows = ref.mean(1) if ref.ndim == 4 else ref  # mean over heads, as key_maps does
        grid = viz.key_grid(spec, spatial)
        want = rows[:, [np.ravel_multi_index(q, spatial) for q in queries]].reshape(b, len(queries), *grid)
        keys = viz.key_maps(block, x, queries)
        assert keys.shape == want.shape and _error(keys, want) <= TOL
        if case in SOFTMAX:
            np.testing.assert_allclose(keys.sum(tuple(range(2, keys.ndim))), 1.0, atol=TOL)
        maps = viz.query_maps(block, x, queries)
        assert maps.shape == (b, len(queries), *spatial)
        window = spec.pool_window if getattr(spec, "sub_sample", False) else (1,) * len(spatial)
        # every input pixel of a key's pooling window shows that key's weight; floor-dropped ones 0
        index = np.ix_(*[np.arange(g * p) // p for g, p in zip(grid, window)])
        covered = tuple(slice(0, g * p) for g, p in zip(grid, window))
        np.testing.assert_array_equal(maps[(..., *covered)], keys[(..., *index)])
        assert maps.sum() == pytest.approx(keys.sum() * math.prod(window))
    elif block_name == "CrissCrossAttention":
        passes = viz.criss_cross_passes(block, x)
        assert len(passes) == spec.recurrence
        want, h = [], x.astype(np.float64)
        for _ in range(spec.recurrence):  # the reference's passes, one at a time
            h, a = reference(block_name, h, weights, {**spec.to_dict(), "recurrence": 1}, return_attention=True)
            want.append(a)
        assert max(_error(p, w) for p, w in zip(passes, want)) <= TOL
        maps = viz.query_maps(block, x, queries)
        for i in range(b):
            composed = np.eye(math.prod(spatial))
            for a in want:  # A_eff = A_R ⋯ A_1
                composed = _dense_criss_cross(a[i]) @ composed
            rows = composed[[np.ravel_multi_index(q, spatial) for q in queries]].reshape(len(queries), *spatial)
            assert _error(maps[i], rows) <= TOL
        np.testing.assert_allclose(maps.sum((2, 3)), 1.0, atol=TOL)
    elif block_name == "GlobalContext":
        got = viz.context_map(block, x)
        assert _error(got, ref.reshape(got.shape)) <= TOL
        np.testing.assert_allclose(got.sum((1, 2)), 1.0, atol=TOL)
    elif block_name == "ChannelAttention":
        got = viz.channel_map(block, x)
        assert _error(got, ref) <= TOL
        np.testing.assert_allclose(got.sum(-1), 1.0, atol=TOL)
    else:
        got = viz.codeword_maps(block, x)
        assert got.shape == (b, config["num_codes"], *spatial)
        assert _error(got, np.moveaxis(ref, -1, 1).reshape(got.shape)) <= TOL
        np.testing.assert_allclose(got.sum(1), 1.0, atol=TOL)


def test_gaussian_map_of_an_image_peaks_at_the_query():
    """Unit-norm features: xᵢ·xⱼ ≤ 1 = xᵢ·xᵢ, so softmax(scale·xᵢ·xⱼ) is largest at the query
    pixel itself (and wherever the image has the same value)."""
    from skimage.data import camera

    image = camera()[::32, ::32] / 255.0  # 16×16
    angle = np.pi / 2 * image
    x = np.stack([np.cos(angle), np.sin(angle)])[None]  # (1, 2, 16, 16), ‖x_ij‖ = 1
    config = {"in_channels": 2, "mode": "gaussian", "sub_sample": False, "scale": 30.0}
    block = driver("torch").make("NonLocalBlock2D", config)
    queries = [(0, 0), (5, 11), (15, 15), (8, 3)]
    maps = viz.query_maps(block, x, queries)[0]
    for m, (qy, qx) in zip(maps, queries):
        same = np.isclose(image, image[qy, qx])
        assert m[qy, qx] == pytest.approx(m.max(), rel=TOL)
        assert m[~same].max() < m[qy, qx]


def test_nl_means_weights_give_the_filtered_pixel():
    case = ONE_CASE_PER_BLOCK["NonLocalMeans"]
    block = driver("torch").make("NonLocalMeans", case.config)
    x = np.random.default_rng(2).random(case.shape)
    queries = [(0, 0), (6, 7), (11, 12)]
    w = viz.query_maps(block, x, queries)
    filtered = reference("NonLocalMeans", x, {}, case.config)
    got = np.einsum("bqhw,bchw->bcq", w, x)
    want = np.stack([filtered[:, :, qy, qx] for qy, qx in queries], -1)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(w.sum((2, 3)), 1.0, rtol=1e-12)
    d = case.config["patch_distance"]
    for i, (qy, qx) in enumerate(queries):  # nothing outside the search window
        outside = np.ones(x.shape[2:], bool)
        outside[max(0, qy - d) : qy + d + 1, max(0, qx - d) : qx + d + 1] = False
        assert not w[:, i][:, outside].any()


def test_query_errors_name_the_block():
    block = driver("torch").make("SelfAttention", {"in_channels": 8})
    with pytest.raises(nlattn.InputError, match=r"SelfAttention: a query .*\(4, 5\), got \(4, 0\)"):
        viz.query_maps(block, np.zeros((1, 8, 4, 5), np.float32), [(4, 0)])
    with pytest.raises(nlattn.ConfigError, match="ChannelAttention: .*channel_map"):
        viz.query_maps(driver("torch").make("ChannelAttention", {}), np.zeros((1, 8, 4, 5), np.float32), [(0, 0)])


def _png_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        return img.size


#: the viz command for every 2D block with a map: (block, config, channels or None for a picture)
VIZ_CLI = {
    "NonLocalBlock2D": ({"in_channels": 3, "mode": "gaussian"}, None),
    "SelfAttention": ({"in_channels": 8}, 8),
    "PositionAttention": ({"in_channels": 8}, 8),
    "CrissCrossAttention": ({"in_channels": 8, "recurrence": 2}, 8),
    "RelationAwareAttention": (
        {"in_channels": 8, "spatial_size": (6, 8), "cha_ratio": 2, "spa_ratio": 2, "down_ratio": 2},
        8,
    ),
    "ChannelAttention": ({}, None),
    "GlobalContext": ({"in_channels": 8, "ratio": 0.5}, 8),
    "ExplicitVisualCenter": ({"in_channels": 4, "num_codes": 2}, 4),
    "NonLocalMeans": ({"patch_size": 3, "patch_distance": 2, "h": 0.5}, None),
}


@pytest.mark.parametrize(
    "fw, block", [("torch", b) for b in VIZ_CLI] + [("tf", "CrissCrossAttention"), ("jax", "ChannelAttention")]
)
def test_viz_command_writes_a_png(tmp_path, capsys, fw, block):
    from PIL import Image

    config, channels = VIZ_CLI[block]
    rng = np.random.default_rng(3)
    if channels is None:
        image = tmp_path / "image.png"
        Image.fromarray((rng.random((6, 8, 3)) * 255).astype(np.uint8)).save(image)
    else:
        image = tmp_path / "features.npy"
        np.save(image, rng.standard_normal((channels, 6, 8)))
    saved = tmp_path / "block.safetensors"
    spec = make_config(block, **config)
    nlattn.save_weights(saved, random_weights(spec.schema(), rng), block=block, config=spec.to_dict())
    out = tmp_path / "map.png"
    argv = ["viz", str(saved), str(image), "--query", "0,0", "--query", "5,7", "--out", str(out), "--framework", fw]
    assert main(argv) == 0, capsys.readouterr().err
    assert out.stat().st_size > 0
    width, height = _png_size(out)
    assert width >= 300 and height >= 300  # at least one 3-inch panel at 100 dpi


def test_viz_command_errors(tmp_path, capsys):
    image = tmp_path / "image.png"
    from PIL import Image

    Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(image)
    argv = ["viz", "NonLocalBlock2D", str(image), "--config", "in_channels=3", "--out", str(tmp_path / "m.png")]
    assert main(argv) == 2
    assert "give --query Y,X" in capsys.readouterr().err
    assert main([*argv[:-2], "--config", "in_channels=16", "--query", "1,1", "--out", "x.png"]) == 1
    assert "expects 16 input channels" in capsys.readouterr().err


def test_figure_grid():
    fig = viz.figure(np.zeros((6, 8)), np.random.default_rng(0).random((5, 6, 8)), [(1, 1)] * 5, ncols=3)
    assert len([ax for ax in fig.axes if ax.has_data()]) == 6  # the image and one overlay per query
    assert fig.get_size_inches().tolist() == [9.0, 6.0]


# --------------------------------------------------------------------------------------------
# nlattn.info
# --------------------------------------------------------------------------------------------


def _shapes_only(fw: str, name: str, config: dict):
    """The block with its variables; Flax's under nnx.eval_shape (no random-init compiles)."""
    if fw != "jax":
        return driver(fw).make(name, config)
    from flax import nnx

    cls = driver(fw).module.BLOCKS[name]
    return nnx.eval_shape(lambda: cls(**config, rngs=nnx.Rngs(0)))


def _count(fw: str, block) -> tuple[int, int]:
    """(trainable, running statistics) as the framework counts them."""
    if fw == "torch":
        buffers = [b for n, b in block.named_buffers() if not n.endswith("num_batches_tracked")]
        return sum(p.numel() for p in block.parameters()), sum(b.numel() for b in buffers)
    if fw == "tf":
        assert block.count_params() == sum(math.prod(w.shape) for w in block.weights)
        return (
            sum(math.prod(w.shape) for w in block.trainable_weights),
            sum(math.prod(w.shape) for w in block.non_trainable_weights),
        )
    from flax import nnx

    def size(state):
        return sum(math.prod(v.shape) for v in __import__("jax").tree.leaves(state))

    return size(nnx.state(block, nnx.Param)), size(nnx.state(block, nnx.BatchStat))


@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_parameter_count_is_the_frameworks(fw):
    for name, case in ONE_CASE_PER_BLOCK.items():
        block = _shapes_only(fw, name, case.config)
        cost = info(name, case.shape, **case.config)
        assert (cost.parameters, cost.buffers) == _count(fw, block), name
        assert info(block, case.shape).parameters == cost.parameters


def test_flops_by_hand():
    # SelfAttention, B = 2, C = 16, 6×10: N = 60, Cq = 2. Q, K: 2·N·C·Cq each; V: 2·N·C·C;
    # energies QᵀK: 2·N·N·Cq; A·V: 2·N·N·C (per batch item). Both paths do the same work.
    b, c, n, cq = 2, 16, 60, 2
    sagan = b * (2 * 2 * n * c * cq + 2 * n * c * c + 2 * n * n * cq + 2 * n * n * c)
    cost = info("SelfAttention", (b, c, 6, 10), in_channels=c)
    assert cost.flops == {"naive": sagan, "fast": sagan}
    assert cost.auto == "fast"
    # NonLocalBlock2D dot_product, B = 1, C = 8, 6×10, sub_sample: N = 60, M = 3·5 = 15, Ci = 4.
    # θ: 2·N·C·Ci; φ, g convolved then pooled: 2·N·C·Ci each; W: 2·N·Ci·C.
    # naive: θᵀφ 2·N·M·Ci, A·g 2·N·M·Ci; fast: φᵀg 2·M·Ci·Ci, θ·(φᵀg) 2·N·Ci·Ci.
    n, m, c, ci = 60, 15, 8, 4
    convs = 3 * 2 * n * c * ci + 2 * n * ci * c
    cost = info("NonLocalBlock2D", (1, c, 6, 10), in_channels=c, mode="dot_product")
    assert cost.flops == {"naive": convs + 4 * n * m * ci, "fast": convs + 2 * m * ci * ci + 2 * n * ci * ci}
    assert info("CrissCrossAttention", (1, 16, 5, 5)).auto == "naive"


MEASURE = """
import gc, json, sys
sys.path.insert(0, {bench!r})
import torch
from bench import PeakRSS
import nlattn.torch as nt

torch.manual_seed(0)
block = nt.NonLocalBlock2D(16, implementation="naive").eval()
x = torch.randn(1, 16, 128, 128)
with torch.no_grad():
    block(x[..., :32, :32])  # warm-up at a small size: lazy initialisation, not the peak
gc.collect()
import bench
rss = bench._status_kib("VmRSS")
meter = PeakRSS().start()
with torch.no_grad():
    y = block(x)
print(json.dumps((meter.stop() - rss) * 1024))
"""


def test_memory_estimate_within_30_percent_of_the_measured_peak():
    """The naive non-local forward at 128×128 (C = 16: the two N×M float32 tensors, energies and
    softmax, 512 MiB, dominate), measured in a fresh torch process as bench.py measures."""
    bench = str(Path(__file__).resolve().parent.parent / "benchmarks")
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(MEASURE).format(bench=bench)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    shape = (1, 16, 128, 128)
    estimate = info("NonLocalBlock2D", shape, framework="torch").memory["naive"]["forward"]
    estimate -= math.prod(shape) * 4  # the input was resident before the measurement
    assert abs(estimate - measured) <= 0.3 * measured, (estimate / 2**20, measured / 2**20)


def test_info_command(capsys):
    assert main(["info", "NonLocalBlock2D", "--input", "1,64,32,32", "--config", "mode=dot_product"]) == 0
    text = capsys.readouterr().out
    assert f"{info('NonLocalBlock2D', (1, 64, 32, 32), mode='dot_product').parameters:,}" in text
    assert "takes its fast path" in text
    assert main(["info", "NonLocalBlock2D", "--input", "1,64,32"]) == 1
    assert "expected a rank-4 input" in capsys.readouterr().err
    assert main(["info", "SelfAttention", "--input", "1,x"]) == 2


# --------------------------------------------------------------------------------------------
# nlattn.gates
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_gates_of_a_model(fw):
    d = driver(fw)

    def block(name, config, key, gamma=None):
        weights = random_weights(make_config(name, **config).schema(), np.random.default_rng(0))
        if gamma is not None:
            weights["gamma"] = np.array([gamma])
        return d.loaded(name, config, weights, **({"name": key} if fw == "tf" else {}))

    kids = {
        "sa": block("SelfAttention", {"in_channels": 8}, "sa", 0.5),
        "head": {
            "cam": block("ChannelAttention", {"in_channels": 8}, "cam", 0.0),
            "cca": block("CrissCrossAttention", {"in_channels": 8}, "cca", -1.5),
        },
        "nl": block("NonLocalBlock2D", {"in_channels": 8}, "nl"),  # no gate
        "scale": block("Scale", {}, "scale", 0.25),
    }
    model = d.container(kids)
    assert nlattn.gates(model) == {"sa.gamma": 0.5, "head.cam.gamma": 0.0, "head.cca.gamma": -1.5, "scale.gamma": 0.25}
    weights = nlattn.export_weights(model)
    weights["head.cam.gamma"] = np.array([2.0], np.float32)
    nlattn.load_weights(model, weights)  # what a training step does to a gate
    assert nlattn.gates(model)["head.cam.gamma"] == 2.0
    assert nlattn.gates(kids["sa"]) == {"gamma": 0.5}
    with pytest.raises(TypeError, match="contains no nlattn"):
        nlattn.gates(d.container({"x": d.not_a_block()}))
