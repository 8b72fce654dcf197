"""The float64 reference against independent facts: explicit loops, identities, equivariances."""

import itertools
import json
import math

import numpy as np
import pytest

import nlattn
from nlattn import ConfigError, InputError, WeightError, make_config
from nlattn import numpy_ref as ref
from nlattn.specs import random_weights

RNG = np.random.default_rng(1234)


def weights_for(block, **config):
    return random_weights(make_config(block, **config).schema(), np.random.default_rng(7))


def softmax_list(values):
    m = max(values)
    e = [math.exp(v - m) for v in values]
    return [v / sum(e) for v in e]


def conv1x1(w, b, x, c_out):
    """(C_in,) pixel vector -> (C_out,) by explicit loops."""
    return [sum(w[o, i] * x[i] for i in range(len(x))) + (b[o] if b is not None else 0.0) for o in range(c_out)]


# --- non-local, explicit loops ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["embedded_gaussian", "gaussian", "dot_product", "concatenation"])
def test_non_local_matches_loops(mode):
    """Tiny 2D block without sub-sampling, every mode, against loops over positions."""
    c, h, w_ = 4, 2, 3
    cfg = dict(in_channels=c, mode=mode, sub_sample=False, bn_layer=True)
    w = weights_for("NonLocalBlock2D", **cfg)
    x = RNG.normal(size=(1, c, h, w_))
    out, attn = ref.non_local_2d(x, w, return_attention=True, **cfg)

    pix = [x[0, :, i, j] for i in range(h) for j in range(w_)]
    n = len(pix)
    ci = c // 2
    emb = lambda name, p: conv1x1(w[f"{name}.weight"][:, :, 0, 0], w[f"{name}.bias"], p, ci)  # noqa: E731
    theta = [list(p) if mode == "gaussian" else emb("theta", p) for p in pix]
    phi = [list(p) if mode == "gaussian" else emb("phi", p) for p in pix]
    g = [emb("g", p) for p in pix]
    expected_attn = np.zeros((n, n))
    for i in range(n):
        if mode == "concatenation":
            wc = w["concat_project.weight"].reshape(-1)
            row = [
                max(0.0, sum(wc[k] * theta[i][k] for k in range(ci)) + sum(wc[ci + k] * phi[j][k] for k in range(ci)))
                / n
                for j in range(n)
            ]
        else:
            dots = [sum(a * b for a, b in zip(theta[i], phi[j])) for j in range(n)]
            row = softmax_list(dots) if mode in ("embedded_gaussian", "gaussian") else [d / n for d in dots]
        expected_attn[i] = row
    np.testing.assert_allclose(attn[0], expected_attn, rtol=1e-12, atol=1e-14)

    for idx, (i, j) in enumerate(itertools.product(range(h), range(w_))):
        y = [sum(expected_attn[idx, m] * g[m][k] for m in range(n)) for k in range(ci)]
        z = conv1x1(w["W.weight"][:, :, 0, 0], w["W.bias"], y, c)
        z = [
            (z[k] - w["bn.running_mean"][k]) / math.sqrt(w["bn.running_var"][k] + 1e-5) * w["bn.weight"][k]
            + w["bn.bias"][k]
            for k in range(c)
        ]
        np.testing.assert_allclose(out[0, :, i, j], np.array(z) + pix[idx], rtol=1e-12, atol=1e-13)


def test_non_local_subsample_pools_phi_and_g_after_conv():
    """AlexHex7: φ and g are max-pooled (2×2, floor) after their conv; θ is not pooled."""
    cfg = dict(in_channels=4, mode="dot_product", bn_layer=False)
    w = weights_for("NonLocalBlock2D", **cfg)
    x = RNG.normal(size=(2, 4, 5, 7))
    _, attn = ref.non_local_2d(x, w, return_attention=True, **cfg)
    assert attn.shape == (2, 35, 2 * 3)  # floor(5/2) * floor(7/2) keys

    def conv(name):
        return np.einsum("oi,bihw->bohw", w[f"{name}.weight"][:, :, 0, 0], x) + w[f"{name}.bias"][None, :, None, None]

    phi = conv("phi")[:, :, :4, :6].reshape(2, 2, 2, 2, 3, 2).max(axis=(3, 5)).reshape(2, 2, -1)
    theta = conv("theta").reshape(2, 2, -1)
    np.testing.assert_allclose(attn, np.einsum("bcn,bcm->bnm", theta, phi) / 6, rtol=1e-12)


def test_pool_first_differs_from_pool_after():
    cfg = dict(in_channels=4, bn_layer=False)
    w = weights_for("NonLocalBlock2D", **cfg)
    x = RNG.normal(size=(2, 4, 4, 4))
    a = ref.non_local_2d(x, w, **cfg)
    b = ref.non_local_2d(x, w, pool_first=True, **cfg)
    assert np.max(np.abs(a - b)) > 1e-3


def test_dot_product_equals_reassociated_form():
    """3D dot_product: x + W((θᵀφ / M) g) equals x + W(θ (φᵀ g) / M), φ and g pooled (1, 2, 2)."""
    cfg = dict(in_channels=6, mode="dot_product", bn_layer=False)
    w = weights_for("NonLocalBlock3D", **cfg)
    x = RNG.normal(size=(2, 6, 2, 5, 4))
    out = ref.non_local_3d(x, w, **cfg)

    def conv(name, t):
        return (
            np.einsum("oi,bithw->bothw", w[f"{name}.weight"][..., 0, 0, 0], t)
            + w[f"{name}.bias"][None, :, None, None, None]
        )

    def pool(t):  # (1, 2, 2) floor: T stays, H 5 -> 2, W 4 -> 2
        b, c, tt = t.shape[:3]
        return t[:, :, :, :4, :4].reshape(b, c, tt, 2, 2, 2, 2).max(axis=(4, 6)).reshape(b, c, -1)

    theta = conv("theta", x).reshape(2, 3, -1)
    phi, g = pool(conv("phi", x)), pool(conv("g", x))
    m = phi.shape[-1]
    assert m == 2 * 2 * 2
    y = np.einsum("bcn,bcd->bdn", theta, np.einsum("bcm,bdm->bcd", phi, g)) / m
    expected = conv("W", y.reshape(2, 3, 2, 5, 4)) + x
    np.testing.assert_allclose(out, expected, rtol=1e-11, atol=1e-12)


def test_heads_split_channels():
    """num_heads=h equals h independent single-head attentions over channel groups."""
    cfg = dict(in_channels=8, num_heads=2, sub_sample=False, bn_layer=False)
    w = weights_for("NonLocalBlock1D", **cfg)
    x = RNG.normal(size=(2, 8, 6))
    _, attn = ref.non_local_1d(x, w, return_attention=True, **cfg)
    theta = np.einsum("oi,bil->bol", w["theta.weight"][..., 0], x) + w["theta.bias"][None, :, None]
    phi = np.einsum("oi,bil->bol", w["phi.weight"][..., 0], x) + w["phi.bias"][None, :, None]
    for head in range(2):
        sl = slice(2 * head, 2 * head + 2)
        e = np.einsum("bcn,bcm->bnm", theta[:, sl], phi[:, sl])
        expected = np.exp(e - e.max(-1, keepdims=True))
        np.testing.assert_allclose(attn[:, head], expected / expected.sum(-1, keepdims=True), rtol=1e-12)


def test_share_query_key_uses_theta_for_phi():
    cfg = dict(in_channels=4, share_query_key=True, sub_sample=False, bn_layer=False)
    w = weights_for("NonLocalBlock2D", **cfg)
    assert "phi.weight" not in w
    x = RNG.normal(size=(2, 4, 3, 3))
    _, attn = ref.non_local_2d(x, w, return_attention=True, **cfg)
    theta = (
        np.einsum("oi,bihw->bohw", w["theta.weight"][:, :, 0, 0], x) + w["theta.bias"][None, :, None, None]
    ).reshape(2, 2, -1)
    e = np.einsum("bcn,bcm->bnm", theta, theta)
    np.testing.assert_allclose(attn, np.exp(e) / np.exp(e).sum(-1, keepdims=True), rtol=1e-12)


# --- SAGAN / PAM / CAM / CCNet -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "fn,block", [(ref.self_attention, "SelfAttention"), (ref.position_attention, "PositionAttention")]
)
def test_sagan_pam_match_loops(fn, block):
    w = weights_for(block, in_channels=8)
    x = RNG.normal(size=(1, 8, 2, 2))
    out, attn = fn(x, w, return_attention=True)
    pix = [x[0, :, i, j] for i in range(2) for j in range(2)]
    q = [conv1x1(w["query_conv.weight"][:, :, 0, 0], w["query_conv.bias"], p, 1) for p in pix]
    k = [conv1x1(w["key_conv.weight"][:, :, 0, 0], w["key_conv.bias"], p, 1) for p in pix]
    v = [conv1x1(w["value_conv.weight"][:, :, 0, 0], w["value_conv.bias"], p, 8) for p in pix]
    for i in range(4):
        a = softmax_list([q[i][0] * k[j][0] for j in range(4)])
        np.testing.assert_allclose(attn[0, i], a, rtol=1e-12)
        o = [sum(a[j] * v[j][c] for j in range(4)) for c in range(8)]
        np.testing.assert_allclose(out[0, :, i // 2, i % 2], w["gamma"][0] * np.array(o) + pix[i], rtol=1e-12)


def test_cam_max_minus_form_is_softmax_of_negative_energy():
    w = {"gamma": np.array([0.7])}
    x = RNG.normal(size=(2, 5, 3, 4))
    out, attn = ref.channel_attention(x, w, return_attention=True)
    xf = x.reshape(2, 5, -1)
    e = -(xf @ xf.transpose(0, 2, 1))
    sm = np.exp(e - e.max(-1, keepdims=True))
    sm /= sm.sum(-1, keepdims=True)
    np.testing.assert_allclose(attn, sm, rtol=1e-12)
    np.testing.assert_allclose(out, 0.7 * (sm @ xf).reshape(x.shape) + x, rtol=1e-12)


@pytest.mark.parametrize("recurrence", [1, 2])
def test_criss_cross_brute_force(recurrence):
    """Per pixel: softmax over its column without itself and its row with itself, R passes."""
    cfg = dict(in_channels=8, qk_ratio=4, recurrence=recurrence)
    w = weights_for("CrissCrossAttention", **cfg)
    x0 = RNG.normal(size=(1, 8, 3, 4))
    out = ref.criss_cross_attention(x0, w, **cfg)
    x = x0[0].copy()
    c, h, wd = x.shape
    proj = lambda name, t: (
        np.einsum("oi,ihw->ohw", w[f"{name}.weight"][:, :, 0, 0], t)  # noqa: E731
        + w[f"{name}.bias"][:, None, None]
    )
    for _ in range(recurrence):
        q, k, v = proj("query_conv", x), proj("key_conv", x), proj("value_conv", x)
        new = np.empty_like(x)
        for i in range(h):
            for j in range(wd):
                keys = [(a, j) for a in range(h) if a != i] + [(i, b) for b in range(wd)]
                a = softmax_list([float(q[:, i, j] @ k[:, p, r]) for p, r in keys])
                new[:, i, j] = w["gamma"][0] * sum(aa * v[:, p, r] for aa, (p, r) in zip(a, keys)) + x[:, i, j]
        x = new
    np.testing.assert_allclose(out[0], x, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize(
    "block,fn",
    [
        ("NonLocalBlock2D", ref.non_local_2d),
        ("SelfAttention", ref.self_attention),
        ("PositionAttention", ref.position_attention),
    ],
)
def test_permutation_equivariance(block, fn):
    """Without sub-sampling, permuting positions permutes the output the same way."""
    cfg = {"in_channels": 8}
    if block == "NonLocalBlock2D":
        cfg["sub_sample"] = False
    w = weights_for(block, **cfg)
    x = RNG.normal(size=(2, 8, 3, 5))
    perm = RNG.permutation(15)
    xp = x.reshape(2, 8, 15)[:, :, perm].reshape(x.shape)
    np.testing.assert_allclose(
        fn(xp, w, **cfg).reshape(2, 8, 15), fn(x, w, **cfg).reshape(2, 8, 15)[:, :, perm], rtol=1e-11, atol=1e-12
    )


# --- identity at init, stability, BN train ----------------------------------------------------------


@pytest.mark.parametrize(
    "block,config,zero",
    [
        ("NonLocalBlock2D", {"in_channels": 4}, ["bn.weight", "bn.bias"]),
        ("NonLocalBlock1D", {"in_channels": 4, "bn_layer": False}, ["W.weight", "W.bias"]),
        ("SelfAttention", {"in_channels": 8}, ["gamma"]),
        ("PositionAttention", {"in_channels": 8}, ["gamma"]),
        ("ChannelAttention", {}, ["gamma"]),
        ("CrissCrossAttention", {"in_channels": 8, "recurrence": 2}, ["gamma"]),
    ],
)
def test_identity_at_published_init(block, config, zero):
    cfg = make_config(block, **config)
    w = random_weights(cfg.schema(), np.random.default_rng(0))
    w.update({k: np.zeros_like(w[k]) for k in zero})
    shape = (2, 4, 6) if block == "NonLocalBlock1D" else (2, cfg.in_channels or 5, 4, 5)
    x = RNG.normal(size=shape)
    np.testing.assert_array_equal(ref.run(block, x, w, config), x)


@pytest.mark.parametrize(
    "block,config",
    [
        ("NonLocalBlock2D", {"in_channels": 8}),
        ("SelfAttention", {"in_channels": 8}),
        ("ChannelAttention", {}),
        ("CrissCrossAttention", {"in_channels": 8}),
    ],
)
def test_large_activations_give_no_nan(block, config):
    w = weights_for(block, **config)
    x = RNG.normal(size=(2, 8, 4, 5)) * 1e4  # energies ~1e8: exp would overflow without max-subtraction
    out, attn = ref.run(block, x, w, config, return_attention=True)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(attn))
    np.testing.assert_allclose(attn.sum(-1), 1.0, rtol=1e-12)


@pytest.mark.parametrize("unbiased", [True, False])
def test_batchnorm_train_statistics(unbiased):
    """Train mode: batch statistics for the output; running stats updated with momentum."""
    cfg = dict(in_channels=4, bn_layer=True, sub_sample=False, bn_momentum=0.25)
    w = weights_for("NonLocalBlock2D", **cfg)
    x = RNG.normal(size=(3, 4, 3, 3))
    stats = ref.RunningStats(unbiased)
    out = ref.non_local_2d(x, w, training=True, stats=stats, **cfg)
    w_nobn = {k: v for k, v in w.items() if not k.startswith("bn.")}
    z = ref.non_local_2d(x, w_nobn, **{**cfg, "bn_layer": False}) - x  # W(y), before BN
    mean, var = z.mean(axis=(0, 2, 3)), z.var(axis=(0, 2, 3))
    bn = (z - mean[None, :, None, None]) / np.sqrt(var[None, :, None, None] + 1e-5)
    np.testing.assert_allclose(
        out, bn * w["bn.weight"][None, :, None, None] + w["bn.bias"][None, :, None, None] + x, rtol=1e-10, atol=1e-12
    )
    n = 3 * 3 * 3
    update_var = var * n / (n - 1) if unbiased else var
    np.testing.assert_allclose(stats.updates["bn.running_mean"], 0.75 * w["bn.running_mean"] + 0.25 * mean)
    np.testing.assert_allclose(stats.updates["bn.running_var"], 0.75 * w["bn.running_var"] + 0.25 * update_var)


def test_rga_spatial_only_is_a_sigmoid_gate():
    cfg = dict(in_channels=8, spatial_size=(3, 4), use_channel=False, cha_ratio=2, spa_ratio=2, down_ratio=2)
    w = weights_for("RelationAwareAttention", **cfg)
    x = RNG.normal(size=(2, 8, 3, 4))
    out, rel = ref.relation_aware_attention(x, w, return_attention=True, **cfg)
    gate = out / x
    # the same gate for every channel at a position, strictly inside (0, 1)
    np.testing.assert_allclose(gate, np.broadcast_to(gate[:, :1], gate.shape), rtol=1e-9)
    assert np.all((gate > 0) & (gate < 1)) and rel.shape == (2, 12, 12)


def test_evc_assignment_is_a_distribution_over_codes():
    w = weights_for("ExplicitVisualCenter", in_channels=8, num_codes=5)
    out, assign = ref.explicit_visual_center(
        RNG.normal(size=(2, 8, 4, 3)), w, return_attention=True, in_channels=8, num_codes=5
    )
    assert out.shape == (2, 8, 4, 3) and assign.shape == (2, 12, 5)
    np.testing.assert_allclose(assign.sum(-1), 1.0, rtol=1e-12)


def test_gelu_is_exact():
    from nlattn.numpy_ref._ops import gelu

    x = np.array([-3.0, -0.5, 0.0, 0.7, 2.5])
    np.testing.assert_allclose(gelu(x), [x_ * 0.5 * (1 + math.erf(x_ / math.sqrt(2))) for x_ in x], rtol=1e-15)


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "block,config,match",
    [
        ("SelfAttention", {"in_channels": 4}, "in_channels // qk_ratio"),
        ("NonLocalBlock2D", {"in_channels": 8, "mode": "bogus"}, "mode must be one of"),
        ("NonLocalBlock2D", {"in_channels": 8, "num_heads": 3}, "must divide"),
        ("NonLocalBlock2D", {"in_channels": 8, "mode": "concatenation", "num_heads": 2}, "concatenation"),
        ("RelationAwareAttention", {"in_channels": 16, "spatial_size": (8, 8)}, "down_ratio"),
        ("RelationAwareAttention", {"in_channels": 64, "spatial_size": (2, 2)}, "spa_ratio"),
        ("NonLocalMeans", {"patch_size": 4}, "odd"),
        ("ExplicitVisualCenter", {"in_channels": 2}, "in_channels"),
        ("CrissCrossAttention", {"in_channels": 8, "recurrence": 0}, "recurrence"),
        ("SelfAttention", {"in_channels": 8, "bogus": 1}, "unknown option"),
        # strict types: a string is not a bool, NaN is not a number (these were accepted in 0.1)
        ("NonLocalBlock2D", {"in_channels": 8, "bn_layer": "False"}, "bn_layer must be True or False"),
        ("NonLocalBlock2D", {"in_channels": 8, "sub_sample": "no"}, "sub_sample must be True or False"),
        ("NonLocalBlock2D", {"in_channels": 8.0}, "in_channels must be an integer"),
        ("NonLocalBlock2D", {"in_channels": 8, "scale": float("nan")}, "scale must be a finite number"),
        ("ExplicitVisualCenter", {"in_channels": 8, "layer_scale_init": float("nan")}, "layer_scale_init"),
        ("ExplicitVisualCenter", {"in_channels": 8, "bn_momentum": 5}, r"bn_momentum must be in \[0, 1\]"),
        ("ExplicitVisualCenter", {"in_channels": 8, "encoding_bn_eps": 0.0}, "encoding_bn_eps must be > 0"),
        (
            "RelationAwareAttention",
            {"in_channels": 16, "spatial_size": (4, 5), "cha_ratio": 2, "spa_ratio": 4, "down_ratio": 2, "bn_eps": -1},
            "bn_eps must be > 0",
        ),
        ("RelationAwareAttention", {"in_channels": 16, "spatial_size": "4x5"}, "spatial_size must be a tuple"),
        ("Scale", {"init": "abc"}, "init must be a finite number"),
        ("NonLocalMeans", {"h": float("inf")}, "h must be a finite number"),
    ],
)
def test_bad_configs_fail_at_construction(block, config, match):
    with pytest.raises(ConfigError, match=match) as e:
        make_config(block, **config)
    assert block in str(e.value)


def test_numpy_scalars_are_plain_values_in_the_config():
    cfg = make_config("NonLocalBlock2D", in_channels=np.int64(16), sub_sample=np.bool_(False), bn_eps=np.float32(1e-3))
    assert (cfg.in_channels, cfg.sub_sample) == (16, False)
    assert type(cfg.in_channels) is int and type(cfg.sub_sample) is bool and type(cfg.bn_eps) is float
    assert json.loads(json.dumps(cfg.to_dict()))["in_channels"] == 16
    rga = make_config(
        "RelationAwareAttention", in_channels=16, spatial_size=[np.int32(4), 5], cha_ratio=2, spa_ratio=4, down_ratio=2
    )
    assert rga.spatial_size == (4, 5) and all(type(s) is int for s in rga.spatial_size)


@pytest.mark.parametrize(
    "block,config,shape,match",
    [
        ("SelfAttention", {"in_channels": 8}, (2, 8, 4), "rank-4"),
        ("SelfAttention", {"in_channels": 8}, (2, 6, 4, 4), "expected 8 channels, got 6"),
        (
            "RelationAwareAttention",
            {"in_channels": 8, "spatial_size": (4, 4), "cha_ratio": 2, "spa_ratio": 2, "down_ratio": 2},
            (2, 8, 4, 5),
            r"spatial size \(4, 4\)",
        ),
        ("NonLocalBlock2D", {"in_channels": 4}, (2, 4, 1, 5), "sub_sample"),
    ],
)
def test_bad_inputs(block, config, shape, match):
    w = weights_for(block, **config)
    with pytest.raises(InputError, match=match) as e:
        ref.run(block, np.zeros(shape), w, config)
    assert block in str(e.value)


def test_integer_input_rejected():
    with pytest.raises(InputError, match="floating"):
        ref.channel_attention(np.zeros((1, 2, 3, 3), dtype=np.int32), {"gamma": np.zeros(1)})


def test_weight_errors_list_every_problem():
    w = weights_for("SelfAttention", in_channels=8)
    del w["key_conv.bias"]
    w["query_conv.weight"] = np.zeros((2, 8, 1, 1))
    w["value_conv.bias"] = np.full(8, np.nan)
    w["extra"] = np.zeros(1)
    w["gamma"] = np.zeros(1, dtype=np.int64)
    with pytest.raises(WeightError) as e:
        ref.self_attention(np.zeros((1, 8, 2, 2)), w)
    text = str(e.value)
    for piece in (
        "missing 'key_conv.bias'",
        "'query_conv.weight' has shape (2, 8, 1, 1)",
        "non-finite",
        "unexpected 'extra'",
        "'gamma' has dtype int64",
    ):
        assert piece in text
    assert len(e.value.problems) == 5 and text.startswith("SelfAttention")


def test_every_block_has_a_reference_and_a_config():
    assert set(ref.REFERENCE) == set(nlattn.BLOCKS)


def test_float_dtype_check_knows_low_precision_floats_once_ml_dtypes_is_loaded():
    import ml_dtypes  # noqa: F401  (jax and tensorflow load it: numpy then knows "bfloat16")

    from nlattn.specs import check_float_dtype

    for ok in (
        "bfloat16",
        "torch.bfloat16",
        np.dtype("bfloat16"),
        "float16",
        np.float32,
        "float8_e4m3fn",
        "<class 'jax.numpy.float64'>",
    ):
        check_float_dtype("NonLocalBlock2D", ok)
    for bad in ("int32", "torch.int64", np.dtype(bool), "complex64", "uint8"):
        with pytest.raises(InputError, match="NonLocalBlock2D: expected a floating-point input"):
            check_float_dtype("NonLocalBlock2D", bad)


# --- GCNet global context and the disentangled non-local block ------------------------------------


def _layer_norm_list(values, eps):
    m = sum(values) / len(values)
    v = sum((t - m) ** 2 for t in values) / len(values)
    return [(t - m) / math.sqrt(v + eps) for t in values]


@pytest.mark.parametrize("pooling_type", ["att", "avg"])
def test_global_context_matches_loops(pooling_type):
    """Both fusions, against loops: pooled context, conv → LayerNorm(C', 1, 1) → ReLU → conv,
    out = x·σ(mul) + add (mmcv's ContextBlock order: multiply first)."""
    c, h, w_ = 6, 2, 3
    cfg = dict(in_channels=c, ratio=0.5, pooling_type=pooling_type, channel_mul=True)
    w = weights_for("GlobalContext", **cfg)
    x = RNG.normal(size=(1, c, h, w_))
    out, attn = ref.global_context(x, w, return_attention=True, **cfg)

    pix = [x[0, :, i, j] for i in range(h) for j in range(w_)]
    if pooling_type == "att":
        logits = [conv1x1(w["conv_mask.weight"][:, :, 0, 0], w["conv_mask.bias"], p, 1)[0] for p in pix]
        a = softmax_list(logits)
    else:
        a = [1.0 / len(pix)] * len(pix)
    context = [sum(a[j] * pix[j][k] for j in range(len(pix))) for k in range(c)]

    def transform(p):
        t = conv1x1(w[f"{p}.0.weight"][:, :, 0, 0], w[f"{p}.0.bias"], context, 3)
        t = [max(0.0, g * v + b) for g, v, b in zip(w[f"{p}.1.weight"], _layer_norm_list(t, 1e-5), w[f"{p}.1.bias"])]
        return conv1x1(w[f"{p}.3.weight"][:, :, 0, 0], w[f"{p}.3.bias"], t, c)

    mul = [1.0 / (1.0 + math.exp(-v)) for v in transform("channel_mul_conv")]
    add = transform("channel_add_conv")
    expected = np.array(
        [[[pix[i * w_ + j][k] * mul[k] + add[k] for j in range(w_)] for i in range(h)] for k in range(c)]
    )
    np.testing.assert_allclose(out[0], expected, rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(attn[0], a, rtol=1e-12)


def test_global_context_average_pooling_is_attention_pooling_with_a_constant_mask():
    """A conv_mask with zero weights gives every position the same logit: softmax = 1/N."""
    cfg = dict(in_channels=8, ratio=0.5, channel_mul=True)
    w = weights_for("GlobalContext", **cfg)
    w.update({"conv_mask.weight": np.zeros((1, 8, 1, 1)), "conv_mask.bias": np.array([0.7])})
    x = RNG.normal(size=(2, 8, 3, 4))
    avg = {k: v for k, v in w.items() if not k.startswith("conv_mask")}
    np.testing.assert_allclose(
        ref.global_context(x, w, **cfg), ref.global_context(x, avg, **{**cfg, "pooling_type": "avg"}), rtol=1e-12
    )


@pytest.mark.parametrize(
    "config,inter",
    [
        # mmcv ContextBlock: int(C * ratio)
        ({"in_channels": 256, "ratio": 1 / 16}, 16),
        ({"in_channels": 104, "ratio": 1 / 16}, 6),  # 6.5 truncates
        # timm GlobalContext: make_divisible(C * rd_ratio, rd_divisor, round_limit=0)
        ({"in_channels": 104, "ratio": 1 / 16, "rounding": "timm"}, 7),  # 6.5 rounds half up
        ({"in_channels": 24, "ratio": 1 / 8, "rounding": "timm", "divisor": 4}, 4),  # 3 rounds up to a multiple
        ({"in_channels": 8, "ratio": 1 / 16, "rounding": "timm", "divisor": 8}, 8),  # never below the divisor
        ({"in_channels": 256, "ratio": 1 / 8, "rounding": "timm", "divisor": 8}, 32),
        ({"in_channels": 8, "inter_channels": 5}, 5),  # timm's rd_channels
    ],
)
def test_global_context_width_follows_each_source(config, inter):
    assert make_config("GlobalContext", **config).inter == inter


def test_global_context_published_init():
    """mmcv's last_zero_init: an add branch starts at 0 (identity), a mul branch at σ(0) = 1/2."""
    x = RNG.normal(size=(2, 8, 3, 4))
    for config, factor in (({}, 1.0), ({"channel_add": False, "channel_mul": True}, 0.5)):
        cfg = make_config("GlobalContext", in_channels=8, ratio=0.5, **config)
        w = random_weights(cfg.schema(), np.random.default_rng(0))
        w.update(
            {
                n: np.zeros_like(w[n])
                for layer in cfg.schema()
                if getattr(layer, "zero_init", False)
                for n in (t.name for t in layer.tensors())
            }
        )
        np.testing.assert_array_equal(ref.global_context(x, w, **cfg.to_dict()), x * factor)


def test_disentangled_non_local_matches_loops():
    """Whitened θ, φ with temperature and 1/√Ci, the unary term, and one W + BN for both terms."""
    c, h, w_, t = 4, 2, 3, 0.3
    cfg = dict(in_channels=c, temperature=t)
    w = weights_for("DisentangledNonLocal2D", **cfg)
    x = RNG.normal(size=(1, c, h, w_))
    out, attn = ref.disentangled_non_local_2d(x, w, return_attention=True, **cfg)

    pix = [x[0, :, i, j] for i in range(h) for j in range(w_)]
    n, ci = len(pix), c // 2
    emb = lambda name, p, k=ci: conv1x1(w[f"{name}.weight"][:, :, 0, 0], w[f"{name}.bias"], p, k)  # noqa: E731
    theta, phi, g = ([emb(name, p) for p in pix] for name in ("theta", "phi", "g"))
    for rows in (theta, phi):  # whitening: subtract each channel's mean over positions
        means = [sum(r[k] for r in rows) / n for k in range(ci)]
        rows[:] = [[r[k] - means[k] for k in range(ci)] for r in rows]
    expected_attn = [
        softmax_list([sum(theta[i][k] * phi[j][k] for k in range(ci)) / math.sqrt(ci) / t for j in range(n)])
        for i in range(n)
    ]
    m = softmax_list([emb("conv_mask", p, 1)[0] for p in pix])
    u = [sum(m[j] * g[j][k] for j in range(n)) for k in range(ci)]

    def w_bn(v):  # the shared conv_out: W then BN (eval)
        z = conv1x1(w["W.weight"][:, :, 0, 0], w["W.bias"], v, c)
        return [
            (z[k] - w["bn.running_mean"][k]) / math.sqrt(w["bn.running_var"][k] + 1e-5) * w["bn.weight"][k]
            + w["bn.bias"][k]
            for k in range(c)
        ]

    unary = w_bn(u)
    for i in range(n):
        y = [sum(expected_attn[i][j] * g[j][k] for j in range(n)) for k in range(ci)]
        expected = [pix[i][k] + v + unary[k] for k, v in enumerate(w_bn(y))]
        np.testing.assert_allclose(out[0, :, i // w_, i % w_], expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(attn[0], expected_attn, rtol=1e-10, atol=1e-14)


def test_disentangled_non_local_ignores_the_theta_and_phi_biases():
    """Whitening removes anything constant over positions, a conv bias included."""
    cfg = dict(in_channels=6, use_scale=False)
    w = weights_for("DisentangledNonLocal1D", **cfg)
    x = RNG.normal(size=(2, 6, 7))
    shifted = {**w, "theta.bias": w["theta.bias"] + 3.0, "phi.bias": w["phi.bias"] - 5.0}
    np.testing.assert_allclose(
        ref.disentangled_non_local_1d(x, shifted, **cfg), ref.disentangled_non_local_1d(x, w, **cfg), rtol=1e-11
    )


@pytest.mark.parametrize("unbiased", [True, False])
def test_disentangled_non_local_updates_the_shared_running_statistics_twice(unbiased):
    """BN(W(y)) then BN(W(u)), each with its own batch statistics: the running statistics take
    the pairwise term's update, then the unary term's on top of it."""
    cfg = dict(in_channels=4, bn_momentum=0.25)
    w = weights_for("DisentangledNonLocal2D", **cfg)
    x = RNG.normal(size=(3, 4, 2, 3))
    stats = ref.RunningStats(unbiased)
    out = ref.disentangled_non_local_2d(x, w, training=True, stats=stats, **cfg)
    # the two terms before BN: without it, out - x = W(y) + W(u); W(u) (B, C) from u = Σⱼ mⱼ gⱼ
    plain = {k: v for k, v in w.items() if not k.startswith("bn.")}
    z_sum = ref.disentangled_non_local_2d(x, plain, **cfg, bn_layer=False) - x

    def one_by_one(name, t):  # a 1×1 conv of t (B, C, N)
        return np.einsum("oc,bcn->bon", w[f"{name}.weight"][:, :, 0, 0], t) + w[f"{name}.bias"][None, :, None]

    flat = x.reshape(3, 4, 6)
    m = np.exp(one_by_one("conv_mask", flat)[:, 0])
    m /= m.sum(-1, keepdims=True)
    u = np.einsum("bn,bcn->bc", m, one_by_one("g", flat))
    z_u = u @ w["W.weight"][:, :, 0, 0].T + w["W.bias"]  # (B, C)
    z_y = z_sum - z_u[:, :, None, None]  # (B, C, H, W)

    def bn(z, axes, n):
        mean, var = z.mean(axis=axes), z.var(axis=axes)
        return mean, (var * n / (n - 1) if unbiased else var), var

    mean_y, upd_y, var_y = bn(z_y, (0, 2, 3), 3 * 2 * 3)
    mean_u, upd_u, var_u = bn(z_u, (0,), 3)
    r_mean = 0.75 * (0.75 * w["bn.running_mean"] + 0.25 * mean_y) + 0.25 * mean_u
    r_var = 0.75 * (0.75 * w["bn.running_var"] + 0.25 * upd_y) + 0.25 * upd_u
    np.testing.assert_allclose(stats.updates["bn.running_mean"], r_mean, rtol=1e-12)
    np.testing.assert_allclose(stats.updates["bn.running_var"], r_var, rtol=1e-12)
    gamma, beta = w["bn.weight"], w["bn.bias"]
    norm_y = (z_y - mean_y[:, None, None]) / np.sqrt(var_y[:, None, None] + 1e-5)
    norm_u = (z_u - mean_u) / np.sqrt(var_u + 1e-5)
    expected = x + gamma[:, None, None] * norm_y + beta[:, None, None] + (gamma * norm_u + beta)[:, :, None, None]
    np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-12)
