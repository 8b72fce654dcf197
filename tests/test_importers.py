"""Importers of published checkpoints: each source's naming and layout -> canonical weights.

Every test writes a small checkpoint in the source's published naming and layout (random arrays,
names and shapes from the published module definitions), imports it, checks names, shapes, the
inferred config and where each value landed, and, where cheap, compares the float64 reference run
with the imported weights against an independent NumPy transcription of the published forward.
"""

from __future__ import annotations

import io
import pickle
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nlattn import ConfigError, WeightError, from_checkpoint, make_config
from nlattn.cli import main
from nlattn.numpy_ref import run
from nlattn.specs import WEIGHT_NORM_G, WEIGHT_NORM_V, random_weights, tensors
from nlattn.weights import SOURCES, WeightFileError, load_file

TOL = 1e-9  # float64 reference vs float64 transcription of the same float32 weights


def rand(rng, *shape):
    return rng.normal(0.0, 0.5, shape).astype(np.float32)


def bn_params(rng, prefix, n):
    return {
        f"{prefix}weight": rng.uniform(0.5, 1.5, n).astype(np.float32),
        f"{prefix}bias": rand(rng, n),
        f"{prefix}running_mean": rand(rng, n),
        f"{prefix}running_var": rng.uniform(0.5, 1.5, n).astype(np.float32),
        f"{prefix}num_batches_tracked": np.array(7, np.int64),
    }


def save_pt(path, obj):
    def conv(o):
        if isinstance(o, dict):
            return {k: conv(v) for k, v in o.items()}
        return torch.from_numpy(np.ascontiguousarray(o)) if isinstance(o, np.ndarray) else o

    torch.save(conv(obj), path)
    return path


# --- independent float64 transcriptions of the published forwards (channels-first) ------------


def f64(a):
    return np.asarray(a, np.float64)


def conv1x1(x, w, b=None):
    y = np.einsum("oc,bc...->bo...", f64(w).reshape(w.shape[0], -1), x)
    return y if b is None else y + f64(b).reshape(1, -1, *([1] * (x.ndim - 2)))


def max_pool(x, window):
    for axis, k in zip(range(2, x.ndim), window):
        n = x.shape[axis] // k
        x = np.take(x, np.arange(n * k), axis=axis)
        x = x.reshape(x.shape[:axis] + (n, k) + x.shape[axis + 1 :]).max(axis=axis + 1)
    return x


def batch_norm(x, sd, p, eps):
    shape = (1, -1) + (1,) * (x.ndim - 2)
    w, b, m, v = (f64(sd[p + k]).reshape(shape) for k in ("weight", "bias", "running_mean", "running_var"))
    return (x - m) / np.sqrt(v + eps) * w + b


def softmax(e, axis=-1):
    z = np.exp(e - e.max(axis=axis, keepdims=True))
    return z / z.sum(axis=axis, keepdims=True)


def alexhex7_forward(x, sd, mode):
    """AlexHex7 _NonLocalBlockND.forward, from its state dict."""
    b, nd = x.shape[0], x.ndim - 2
    sub = "g.0.weight" in sd
    k = ".0" if sub else ""
    pool = (lambda t: max_pool(t, (1, 2, 2) if nd == 3 else (2,) * nd)) if sub else (lambda t: t)
    g = pool(conv1x1(x, sd[f"g{k}.weight"], sd[f"g{k}.bias"]))
    g = g.reshape(b, g.shape[1], -1)
    if mode == "gaussian":
        theta, phi = x, pool(x)
    else:
        theta = conv1x1(x, sd["theta.weight"], sd["theta.bias"])
        phi = pool(conv1x1(x, sd[f"phi{k}.weight"], sd[f"phi{k}.bias"]))
    theta, phi = theta.reshape(b, theta.shape[1], -1), phi.reshape(b, phi.shape[1], -1)
    n, m = theta.shape[-1], phi.shape[-1]
    if mode == "concatenation":  # the explicit (b, 2Ci, N, M) concatenation and 1x1 projection
        cat = np.concatenate([np.repeat(theta[..., :, None], m, -1), np.repeat(phi[..., None, :], n, -2)], 1)
        f = np.maximum(np.einsum("c,bcnm->bnm", f64(sd["concat_project.0.weight"]).reshape(-1), cat), 0) / m
    else:
        f = np.einsum("bcn,bcm->bnm", theta, phi)
        f = softmax(f) if mode in ("embedded_gaussian", "gaussian") else f / m
    y = np.einsum("bnm,bcm->bcn", f, g).reshape(b, -1, *x.shape[2:])
    if "W.1.weight" in sd:
        return batch_norm(conv1x1(y, sd["W.0.weight"], sd["W.0.bias"]), sd, "W.1.", 1e-5) + x
    return conv1x1(y, sd["W.weight"], sd["W.bias"]) + x


def caffe2_forward(x, blobs, p, eps=1.0000001e-5):
    """video-nonlocal-net spacetime_nonlocal + add_nonlocal (USE_MAXPOOL, USE_SOFTMAX, USE_SCALE, USE_BN)."""
    b = x.shape[0]
    pooled = max_pool(x, (1, 2, 2))
    theta = conv1x1(x, blobs[p + "_theta_w"], blobs[p + "_theta_b"]).reshape(b, -1, x[0, 0].size)
    phi = conv1x1(pooled, blobs[p + "_phi_w"], blobs[p + "_phi_b"]).reshape(b, theta.shape[1], -1)
    g = conv1x1(pooled, blobs[p + "_g_w"], blobs[p + "_g_b"]).reshape(b, theta.shape[1], -1)
    prob = softmax(np.einsum("bcn,bcm->bnm", theta, phi) * theta.shape[1] ** -0.5, axis=2)
    t = np.einsum("bcm,bnm->bcn", g, prob).reshape(b, -1, *x.shape[2:])
    out = conv1x1(t, blobs[p + "_out_w"], blobs[p + "_out_b"])
    shape = (1, -1, 1, 1, 1)
    s, bb, rm, riv = (f64(blobs[f"{p}_bn_{k}"]).reshape(shape) for k in ("s", "b", "rm", "riv"))
    return (out - rm) / np.sqrt(riv + eps) * s + bb + x


def timm_forward(x, sd, p):
    """timm NonLocalAttn.forward (use_scale=True)."""
    b, c, h, w = x.shape
    t = conv1x1(x, sd[p + "t.weight"], sd[p + "t.bias"]).reshape(b, -1, h * w)
    pp = conv1x1(x, sd[p + "p.weight"], sd[p + "p.bias"]).reshape(b, t.shape[1], -1)
    g = conv1x1(x, sd[p + "g.weight"], sd[p + "g.bias"]).reshape(b, t.shape[1], -1)
    att = softmax(np.einsum("bcn,bcm->bnm", t, pp) * c**-0.5, axis=2)
    y = np.einsum("bnm,bcm->bcn", att, g).reshape(b, -1, h, w)
    return batch_norm(conv1x1(y, sd[p + "z.weight"], sd[p + "z.bias"]), sd, p + "norm.", 1e-5) + x


def pam_forward(x, sd, p):
    """DANet PAM_Module / SAGAN Self_Attn forward."""
    b, c, h, w = x.shape
    q = conv1x1(x, sd[p + "query_conv.weight"], sd[p + "query_conv.bias"]).reshape(b, -1, h * w)
    k = conv1x1(x, sd[p + "key_conv.weight"], sd[p + "key_conv.bias"]).reshape(b, -1, h * w)
    v = conv1x1(x, sd[p + "value_conv.weight"], sd[p + "value_conv.bias"]).reshape(b, c, h * w)
    attention = softmax(np.einsum("bcn,bcm->bnm", q, k), -1)
    out = np.einsum("bcm,bnm->bcn", v, attention).reshape(x.shape)
    return f64(sd[p + "gamma"]) * out + x


def cam_forward(x, gamma):
    b, c = x.shape[:2]
    q = x.reshape(b, c, -1)
    energy = q @ q.transpose(0, 2, 1)
    attention = softmax(energy.max(-1, keepdims=True) - energy, -1)
    return f64(gamma) * (attention @ q).reshape(x.shape) + x


def ccnet_forward(x, sd, p, recurrence, gamma="gamma"):
    """Criss-cross attention, pixel by pixel: column (self excluded) + row (self included)."""
    for _ in range(recurrence):
        q = conv1x1(x, sd[p + "query_conv.weight"], sd[p + "query_conv.bias"])
        k = conv1x1(x, sd[p + "key_conv.weight"], sd[p + "key_conv.bias"])
        v = conv1x1(x, sd[p + "value_conv.weight"], sd[p + "value_conv.bias"])
        out = np.zeros_like(x)
        b, _, h, w = x.shape
        for n in range(b):
            for i in range(h):
                for j in range(w):
                    keys = [(r, j) for r in range(h) if r != i] + [(i, c) for c in range(w)]
                    e = np.array([q[n, :, i, j] @ k[n, :, r, c] for r, c in keys])
                    a = softmax(e)
                    out[n, :, i, j] = sum(ai * v[n, :, r, c] for ai, (r, c) in zip(a, keys))
        x = f64(sd[p + gamma]) * out + x
    return x


def tt(sd, key):
    return torch.from_numpy(np.asarray(sd[key], np.float64))


def bn_t(x, sd, p, eps):
    return F.batch_norm(
        x,
        tt(sd, p + "running_mean"),
        tt(sd, p + "running_var"),
        tt(sd, p + "weight"),
        tt(sd, p + "bias"),
        training=False,
        eps=eps,
    )


def rga_forward(x, sd, p, spatial=True, channel=True):
    """RGA_Module.forward (eval), transcribed with torch.nn.functional in float64."""
    x = torch.from_numpy(x)

    def cbr(name, t):  # Sequential(conv 1x1 no bias, BN, ReLU)
        return F.relu(bn_t(F.conv2d(t, tt(sd, f"{p}{name}.0.weight")), sd, f"{p}{name}.1.", 1e-5))

    def gate(name, t):  # Sequential(conv, BN, ReLU, conv, BN)
        return bn_t(F.conv2d(cbr(name, t), tt(sd, f"{p}{name}.3.weight")), sd, f"{p}{name}.4.", 1e-5)

    b, c, h, w = x.shape
    if spatial:
        theta = cbr("theta_spatial", x).view(b, -1, h * w).permute(0, 2, 1)
        phi = cbr("phi_spatial", x).view(b, -1, h * w)
        gs = torch.matmul(theta, phi)
        joint = cbr(
            "gg_spatial", torch.cat((gs.permute(0, 2, 1).reshape(b, h * w, h, w), gs.reshape(b, h * w, h, w)), 1)
        )
        g = torch.mean(cbr("gx_spatial", x), dim=1, keepdim=True)
        x = torch.sigmoid(gate("W_spatial", torch.cat((g, joint), 1)).expand_as(x)) * x
    if channel:
        xc = x.view(b, c, -1).permute(0, 2, 1).unsqueeze(-1)
        theta = cbr("theta_channel", xc).squeeze(-1).permute(0, 2, 1)
        phi = cbr("phi_channel", xc).squeeze(-1)
        gc = torch.matmul(theta, phi)
        joint = cbr("gg_channel", torch.cat((gc.permute(0, 2, 1).unsqueeze(-1), gc.unsqueeze(-1)), 1))
        g = torch.mean(cbr("gx_channel", xc), dim=1, keepdim=True)
        x = torch.sigmoid(gate("W_channel", torch.cat((g, joint), 1)).transpose(1, 2)) * x
    return x.numpy()


def evc_forward(x, sd, p, bn2d_eps, block_eps, bn1d_eps):
    """CFPNet EVCBlock.forward (eval), transcribed with torch.nn.functional in float64."""
    x = torch.from_numpy(x)
    W = lambda name: tt(sd, p + name)  # noqa: E731
    bn = lambda t, name, eps=bn2d_eps: bn_t(t, sd, p + name + ".", eps)  # noqa: E731
    x1 = F.max_pool2d(F.relu(bn(F.conv2d(x, W("conv1.weight"), padding=3), "bn1")), 3, 1, 1)
    cb = "lvc.conv_1."  # ConvBlock(res_conv=True), BN eps 1e-6 in the module
    t = F.relu(bn(F.conv2d(x1, W(cb + "conv1.weight")), cb + "bn1", block_eps))
    t = F.relu(bn(F.conv2d(t, W(cb + "conv2.weight"), padding=1), cb + "bn2", block_eps))
    t = bn(F.conv2d(t, W(cb + "conv3.weight")), cb + "bn3", block_eps)
    xl = F.relu(t + bn(F.conv2d(x1, W(cb + "residual_conv.weight")), cb + "residual_bn", block_eps))
    z = F.relu(bn(F.conv2d(xl, W("lvc.LVC.0.weight")), "lvc.LVC.1"))
    b, c = z.shape[:2]
    z = z.view(b, c, -1).transpose(1, 2)  # Encoding
    codes, smooth = W("lvc.LVC.3.codewords"), W("lvc.LVC.3.scale")
    resid = z.unsqueeze(2) - codes.view(1, 1, *codes.shape)
    assign = F.softmax(smooth.view(1, 1, -1) * resid.pow(2).sum(3), dim=2)
    encoded = (assign.unsqueeze(3) * resid).sum(1)
    en = F.relu(bn(encoded, "lvc.LVC.4", bn1d_eps)).mean(dim=1)  # BatchNorm1d, ReLU, Mean
    gam = torch.sigmoid(F.linear(en, W("lvc.fc.0.weight"), W("lvc.fc.0.bias")))
    x_lvc = F.relu(xl + xl * gam.view(b, c, 1, 1))
    m = "l_MLP."
    gn = lambda t, name: F.group_norm(t, 1, W(name + ".weight"), W(name + ".bias"), eps=1e-5)  # noqa: E731
    d = F.silu(bn(F.conv2d(gn(x1, m + "norm1"), W(m + "dw.dconv.conv.weight"), groups=c), m + "dw.dconv.bn"))
    d = F.silu(bn(F.conv2d(d, W(m + "dw.pconv.conv.weight")), m + "dw.pconv.bn"))
    y = x1 + W(m + "layer_scale_1").view(1, -1, 1, 1) * d
    hidden = F.gelu(F.conv2d(gn(y, m + "norm2"), W(m + "mlp.fc1.weight"), W(m + "mlp.fc1.bias")))
    y = y + W(m + "layer_scale_2").view(1, -1, 1, 1) * F.conv2d(hidden, W(m + "mlp.fc2.weight"), W(m + "mlp.fc2.bias"))
    return F.conv2d(torch.cat((x_lvc, y), 1), W("cnv1.weight"), W("cnv1.bias")).numpy()


def check_reference(ckpt, x, expected):
    got = run(ckpt.block, x, ckpt.weights, ckpt.config)
    err = np.max(np.abs(got - expected))
    assert err < TOL, f"{ckpt.block}: reference with imported weights differs from the source by {err}"


# ----------------------------------------------------------------------------------------------
# AlexHex7
# ----------------------------------------------------------------------------------------------


def alexhex7_state(rng, nd, c, ci, mode="embedded_gaussian", sub=True, bn=True):
    k = (1,) * nd
    sd, s = {}, ".0" if sub else ""
    sd[f"g{s}.weight"], sd[f"g{s}.bias"] = rand(rng, ci, c, *k), rand(rng, ci)
    if mode != "gaussian":
        sd["theta.weight"], sd["theta.bias"] = rand(rng, ci, c, *k), rand(rng, ci)
        sd[f"phi{s}.weight"], sd[f"phi{s}.bias"] = rand(rng, ci, c, *k), rand(rng, ci)
    if mode == "concatenation":
        sd["concat_project.0.weight"] = rand(rng, 1, 2 * ci, 1, 1)
    if bn:
        sd["W.0.weight"], sd["W.0.bias"] = rand(rng, c, ci, *k), rand(rng, c)
        sd.update(bn_params(rng, "W.1.", c))
    else:
        sd["W.weight"], sd["W.bias"] = rand(rng, c, ci, *k), rand(rng, c)
    return sd


def test_alexhex7_pt_file_under_prefix(tmp_path):
    rng = np.random.default_rng(0)
    block = alexhex7_state(rng, 2, 6, 3)
    model = {
        "conv1.weight": rand(rng, 6, 3, 3, 3),
        "fc.weight": rand(rng, 10, 6),
        **{f"nl.{k}": v for k, v in block.items()},
    }
    path = save_pt(tmp_path / "net.pth", {"state_dict": model, "epoch": 3})
    ckpt = from_checkpoint(str(path), "alexhex7")
    assert ckpt.block == "NonLocalBlock2D" and ckpt.source == "alexhex7"
    cfg = ckpt.config
    assert (
        cfg["in_channels"],
        cfg["inter_channels"],
        cfg["mode"],
        cfg["sub_sample"],
        cfg["bn_layer"],
        cfg["pool_first"],
        cfg["scale"],
    ) == (6, 3, "embedded_gaussian", True, True, False, None)
    expected_map = {
        "g.weight": "nl.g.0.weight",
        "phi.bias": "nl.phi.0.bias",
        "theta.weight": "nl.theta.weight",
        "W.weight": "nl.W.0.weight",
        "bn.weight": "nl.W.1.weight",
        "bn.running_var": "nl.W.1.running_var",
    }
    for name, src in expected_map.items():
        assert ckpt.mapped[name] == src
        np.testing.assert_array_equal(ckpt.weights[name], model[src])
        assert ckpt.weights[name].dtype == np.float32
    assert list(ckpt.weights) == list(tensors(make_config("NonLocalBlock2D", **cfg).schema()))
    assert ckpt.dropped == {"nl.W.1.num_batches_tracked": "BatchNorm step counter (not a weight)"}
    x = np.random.default_rng(1).normal(size=(2, 6, 5, 4))
    check_reference(ckpt, x, alexhex7_forward(x, block, "embedded_gaussian"))


@pytest.mark.parametrize(
    "nd, mode, sub, bn, kw",
    [
        (1, "concatenation", False, True, {}),
        (3, "gaussian", True, False, {}),
        (2, "dot_product", True, True, {"mode": "dot_product"}),
        (2, "embedded_gaussian", False, False, {}),
    ],
)
def test_alexhex7_modes(nd, mode, sub, bn, kw):
    rng = np.random.default_rng(nd)
    sd = alexhex7_state(rng, nd, 4, 2, mode, sub, bn)
    ckpt = from_checkpoint(sd, "alexhex7", **kw)
    assert ckpt.block == f"NonLocalBlock{nd}D"
    assert (ckpt.config["mode"], ckpt.config["sub_sample"], ckpt.config["bn_layer"]) == (mode, sub, bn)
    if mode == "concatenation":
        np.testing.assert_array_equal(ckpt.weights["concat_project.weight"], sd["concat_project.0.weight"])
    x = np.random.default_rng(5).normal(size=(2, 4) + {1: (6,), 2: (4, 5), 3: (2, 4, 4)}[nd])
    check_reference(ckpt, x, alexhex7_forward(x, sd, mode))


def test_alexhex7_mode_is_an_argument_and_matters():
    rng = np.random.default_rng(3)
    sd = alexhex7_state(rng, 2, 4, 2)
    x = rng.normal(size=(1, 4, 4, 4))
    eg = from_checkpoint(sd, "alexhex7")
    dp = from_checkpoint(sd, "alexhex7", mode="dot_product")
    assert eg.config["mode"] == "embedded_gaussian" and dp.config["mode"] == "dot_product"
    assert any("mode" in n for n in eg.notes)
    assert np.max(np.abs(run(eg.block, x, eg.weights, eg.config) - run(dp.block, x, dp.weights, dp.config))) > 1e-3


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"mode": "gaussian"}, "contradicts"),
        ({"mode": "concatenation"}, "contradicts"),
        ({"in_channels": 8}, "in_channels=8 contradicts"),
        ({"inter_channels": 1}, "inter_channels=1 contradicts"),
        ({"bn_layer": False}, "bn_layer=False contradicts"),
        ({"sub_sample": False}, "sub_sample=False contradicts"),
        ({"no_such_option": 1}, "unknown option"),
    ],
)
def test_alexhex7_contradicting_keywords(kw, match):
    sd = alexhex7_state(np.random.default_rng(0), 2, 4, 2)
    with pytest.raises(ConfigError, match=match):
        from_checkpoint(sd, "alexhex7", **kw)


def test_alexhex7_failures_are_listed_and_input_untouched():
    rng = np.random.default_rng(0)
    sd = alexhex7_state(rng, 2, 4, 2)
    bad = dict(sd)
    del bad["theta.bias"]  # missing
    bad["phi.0.weight"] = rand(rng, 2, 4, 3, 1)  # mis-shaped
    bad["g.0.bias"] = np.arange(2)  # integer
    bad["W.0.bias"] = np.array([1, np.nan, 0, 0], np.float32)  # NaN
    before = {k: v.copy() for k, v in bad.items()}
    with pytest.raises(WeightError) as e:
        from_checkpoint(bad, "alexhex7")
    msg = str(e.value)
    assert "4 problem(s)" in msg
    assert "missing 'theta.bias'" in msg
    assert "'phi.weight' (from 'phi.0.weight') has shape (2, 4, 3, 1)" in msg
    assert "'g.bias' (from 'g.0.bias') has dtype int64" in msg
    assert "'W.bias' (from 'W.0.bias') has non-finite values" in msg
    assert set(bad) == set(before) and all(np.array_equal(bad[k], before[k], equal_nan=True) for k in bad)

    extra = {**sd, "theta.0.weight": rand(rng, 2, 4, 1, 1)}
    with pytest.raises(WeightError, match="cannot map 'theta.0.weight'"):
        from_checkpoint(extra, "alexhex7")


def test_several_blocks_need_a_prefix():
    rng = np.random.default_rng(0)
    sd = {
        **{f"layer2.0.nl.{k}": v for k, v in alexhex7_state(rng, 2, 4, 2).items()},
        **{f"layer3.1.nl.{k}": v for k, v in alexhex7_state(rng, 2, 8, 4).items()},
    }
    with pytest.raises(
        WeightError,
        match=r"2 blocks found; choose one with prefix=: 'layer2\.0\.nl\.', "
        r"'layer3\.1\.nl\.'",
    ):
        from_checkpoint(sd, "alexhex7")
    ckpt = from_checkpoint(sd, "alexhex7", prefix="layer3.1.nl")
    assert ckpt.config["in_channels"] == 8
    with pytest.raises(WeightError, match="no AlexHex7 non-local block at prefix 'layer4.'"):
        from_checkpoint(sd, "alexhex7", prefix="layer4.")
    with pytest.raises(WeightError, match="no AlexHex7 non-local block found"):
        from_checkpoint({"fc.weight": rand(rng, 2, 2)}, "alexhex7")


def test_unknown_source():
    with pytest.raises(ValueError, match="unknown checkpoint source 'keras'"):
        from_checkpoint({}, "keras")
    assert set(SOURCES) == {"alexhex7", "caffe2", "timm", "danet", "sagan", "ccnet", "rga", "cfpnet", "mmcv", "mmseg"}


# ----------------------------------------------------------------------------------------------
# Caffe2 (video-nonlocal-net)
# ----------------------------------------------------------------------------------------------


def caffe2_blobs(rng, p, c, ci, bias=True, bn="bn"):
    b = {}
    for name, (o, i) in {"theta": (ci, c), "phi": (ci, c), "g": (ci, c), "out": (c, ci)}.items():
        b[f"{p}_{name}_w"] = rand(rng, o, i, 1, 1, 1)
        b[f"{p}_{name}_w_momentum"] = rand(rng, o, i, 1, 1, 1)
        if bias:
            b[f"{p}_{name}_b"] = rand(rng, o)
    if bn:
        b[f"{p}_bn_s"], b[f"{p}_bn_b"] = rng.uniform(0.5, 1.5, c).astype(np.float32), rand(rng, c)
    if bn == "bn":
        b[f"{p}_bn_rm"], b[f"{p}_bn_riv"] = rand(rng, c), rng.uniform(0.5, 1.5, c).astype(np.float32)
    return b


class Py2Pickler(pickle._Pickler):
    """Writes strings and bytes as Python 2 ``str`` (BINSTRING), as a Python 2 cPickle would."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)

    dispatch[str] = save_py2_str
    dispatch[bytes] = save_py2_str


def py2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue().replace(b"numpy._core.", b"numpy.core.")


@pytest.mark.parametrize("writer", ["py3", "py2"])
def test_caffe2_pickle_pool_first_and_scale(tmp_path, writer):
    rng = np.random.default_rng(7)
    blobs = {
        **caffe2_blobs(rng, "nonlocal_conv3_1", 6, 3),
        **caffe2_blobs(rng, "nonlocal_conv4_3", 8, 4),
        "res3_1_branch2a_w": rand(rng, 6, 6, 3, 1, 1),
        "lr": np.float32(0.01),
        "model_iter": 400000,
    }
    path = tmp_path / "c2_model.pkl"
    data = pickle.dumps({"blobs": blobs}, protocol=2) if writer == "py3" else py2_pickle({"blobs": blobs})
    path.write_bytes(data)
    if writer == "py2":
        assert b"numpy.core.multiarray" in data and b"_codecs" not in data
    with pytest.raises(WeightError, match="'nonlocal_conv3_1', 'nonlocal_conv4_3'"):
        from_checkpoint(str(path), "caffe2")
    ckpt = from_checkpoint(str(path), "caffe2", prefix="nonlocal_conv3_1")
    cfg = ckpt.config
    assert ckpt.block == "NonLocalBlock3D"
    assert (
        cfg["in_channels"],
        cfg["inter_channels"],
        cfg["pool_first"],
        cfg["sub_sample"],
        cfg["mode"],
        cfg["bn_layer"],
    ) == (6, 3, True, True, "embedded_gaussian", True)
    assert cfg["scale"] == 3**-0.5 and cfg["bn_eps"] == 1.0000001e-5 and cfg["bn_momentum"] == pytest.approx(0.1)
    p = "nonlocal_conv3_1"
    for name, suffix in {
        "theta.weight": "theta_w",
        "g.bias": "g_b",
        "W.weight": "out_w",
        "bn.weight": "bn_s",
        "bn.bias": "bn_b",
        "bn.running_mean": "bn_rm",
        "bn.running_var": "bn_riv",
    }.items():
        np.testing.assert_array_equal(ckpt.weights[name], blobs[f"{p}_{suffix}"])
        assert ckpt.mapped[name] == f"{p}_{suffix}"
    assert all(k.endswith("_momentum") for k in ckpt.dropped) and len(ckpt.dropped) == 4
    x = np.random.default_rng(8).normal(size=(2, 6, 2, 4, 5))
    expected = caffe2_forward(x, blobs, p)
    check_reference(ckpt, x, expected)
    # the conventions matter: pooling after the conv, or no scale, give other outputs
    for change in ({"pool_first": False}, {"scale": None}):
        other = run(ckpt.block, x, ckpt.weights, {**cfg, **change})
        assert np.max(np.abs(other - expected)) > 1e-4


def test_caffe2_options_no_bias_and_affine():
    rng = np.random.default_rng(9)
    p = "nonlocal_conv4_5"
    blobs = caffe2_blobs(rng, p, 4, 2, bias=False, bn="affine")
    ckpt = from_checkpoint({"blobs": blobs}, "caffe2", use_scale=False, mode="dot_product")
    assert ckpt.config["bn_layer"] is False and ckpt.config["scale"] is None
    assert ckpt.config["mode"] == "dot_product"
    assert np.all(ckpt.weights["theta.bias"] == 0) and np.all(ckpt.weights["phi.bias"] == 0)
    np.testing.assert_allclose(
        ckpt.weights["W.weight"], blobs[f"{p}_out_w"] * blobs[f"{p}_bn_s"][:, None, None, None, None], rtol=1e-6
    )
    np.testing.assert_allclose(ckpt.weights["W.bias"], blobs[f"{p}_bn_b"], rtol=1e-6)
    assert any("NO_BIAS" in n for n in ckpt.notes) and any("USE_AFFINE" in n for n in ckpt.notes)
    with pytest.raises(ConfigError, match="mode='gaussian' contradicts"):
        from_checkpoint({"blobs": blobs}, "caffe2", mode="gaussian")


# ----------------------------------------------------------------------------------------------
# timm NonLocalAttn
# ----------------------------------------------------------------------------------------------


def timm_state(rng, p, c, rd):
    sd = {}
    for name, (o, i) in {"t": (rd, c), "p": (rd, c), "g": (rd, c), "z": (c, rd)}.items():
        sd[f"{p}{name}.weight"], sd[f"{p}{name}.bias"] = rand(rng, o, i, 1, 1), rand(rng, o)
    sd.update(bn_params(rng, f"{p}norm.", c))
    return sd


def test_timm_scale_and_no_subsampling(tmp_path):
    rng = np.random.default_rng(11)
    p = "stages.2.blocks.0.attn."
    sd = {**timm_state(rng, p, 8, 3), "stem.conv.weight": rand(rng, 8, 3, 3, 3)}
    ckpt = from_checkpoint(str(save_pt(tmp_path / "timm.pth", {"model": sd})), "timm")
    cfg = ckpt.config
    assert ckpt.block == "NonLocalBlock2D"
    assert (cfg["in_channels"], cfg["inter_channels"], cfg["sub_sample"], cfg["bn_layer"]) == (8, 3, False, True)
    assert cfg["scale"] == 8**-0.5
    for name, src in {
        "theta.weight": "t.weight",
        "phi.bias": "p.bias",
        "g.weight": "g.weight",
        "W.weight": "z.weight",
        "bn.running_mean": "norm.running_mean",
    }.items():
        np.testing.assert_array_equal(ckpt.weights[name], sd[p + src])
    x = np.random.default_rng(12).normal(size=(2, 8, 4, 3))
    expected = timm_forward(x, sd, p)
    check_reference(ckpt, x, expected)
    unscaled = from_checkpoint(sd, "timm", use_scale=False)
    assert unscaled.config["scale"] is None
    assert np.max(np.abs(run(unscaled.block, x, unscaled.weights, unscaled.config) - expected)) > 1e-4


# ----------------------------------------------------------------------------------------------
# DANet, SAGAN, CCNet
# ----------------------------------------------------------------------------------------------


def qkv_state(rng, p, c, cq):
    sd = {}
    for name, o in {"query_conv": cq, "key_conv": cq, "value_conv": c}.items():
        sd[f"{p}{name}.weight"], sd[f"{p}{name}.bias"] = rand(rng, o, c, 1, 1), rand(rng, o)
    sd[f"{p}gamma"] = rand(rng, 1)
    return sd


def test_danet_pam_and_cam(tmp_path):
    rng = np.random.default_rng(13)
    sd = {
        **qkv_state(rng, "module.head.sa.", 16, 2),
        "module.head.sc.gamma": rand(rng, 1),
        "module.head.conv5a.0.weight": rand(rng, 16, 32, 3, 3),
        "module.pretrained.layer1.0.gamma": rand(rng, 4),
    }  # a layer scale, not a CAM
    path = str(save_pt(tmp_path / "danet.pth", {"state_dict": sd}))
    with pytest.raises(
        WeightError,
        match=r"'module\.head\.sa\.' \(PositionAttention\), "
        r"'module\.head\.sc\.' \(ChannelAttention\)",
    ):
        from_checkpoint(path, "danet")
    pam = from_checkpoint(path, "danet", prefix="module.head.sa.")
    assert pam.block == "PositionAttention" and pam.config == {"in_channels": 16, "qk_ratio": 8}
    x = np.random.default_rng(14).normal(size=(2, 16, 3, 4))
    check_reference(pam, x, pam_forward(x, sd, "module.head.sa."))
    cam = from_checkpoint(path, "danet", prefix="module.head.sc", in_channels=16)
    assert cam.block == "ChannelAttention" and cam.config == {"in_channels": 16}
    np.testing.assert_array_equal(cam.weights["gamma"], sd["module.head.sc.gamma"])
    check_reference(cam, x, cam_forward(x, sd["module.head.sc.gamma"]))


def test_sagan_generator_attention_layers(tmp_path):
    rng = np.random.default_rng(15)
    sd = {
        **qkv_state(rng, "attn1.", 16, 2),
        **qkv_state(rng, "attn2.", 8, 1),
        "l1.0.weight_bar": rand(rng, 4, 16, 4, 4),
        "l1.0.weight_u": rand(rng, 4),
    }
    path = str(save_pt(tmp_path / "100_G.pth", sd))
    with pytest.raises(WeightError, match="'attn1.', 'attn2.'"):
        from_checkpoint(path, "sagan")
    ckpt = from_checkpoint(path, "sagan", prefix="attn2")
    assert ckpt.block == "SelfAttention" and ckpt.config == {"in_channels": 8, "qk_ratio": 8}
    assert ckpt.mapped == {k: f"attn2.{k}" for k in ckpt.weights}
    x = np.random.default_rng(16).normal(size=(1, 8, 4, 4))
    check_reference(ckpt, x, pam_forward(x, sd, "attn2."))
    with pytest.raises(ConfigError, match="qk_ratio=4 contradicts"):
        from_checkpoint(path, "sagan", prefix="attn2", qk_ratio=4)
    odd = from_checkpoint(qkv_state(rng, "", 16, 4), "sagan")  # C // 4 query channels
    assert odd.config["qk_ratio"] == 4


def test_ccnet_rcca_head_recurrence(tmp_path):
    rng = np.random.default_rng(17)
    sd = {**qkv_state(rng, "head.cca.", 8, 1), "head.conva.0.weight": rand(rng, 8, 16, 3, 3)}
    path = str(save_pt(tmp_path / "ccnet.pth", sd))
    one = from_checkpoint(path, "ccnet")
    assert one.block == "CrissCrossAttention" and one.config["recurrence"] == 1
    assert any("recurrence=2" in n for n in one.notes)
    two = from_checkpoint(path, "ccnet", recurrence=2)
    assert two.config == {"in_channels": 8, "qk_ratio": 8, "recurrence": 2} and not two.notes
    x = np.random.default_rng(18).normal(size=(1, 8, 3, 4))
    check_reference(two, x, ccnet_forward(x, sd, "head.cca.", 2))
    check_reference(one, x, ccnet_forward(x, sd, "head.cca.", 1))


# ----------------------------------------------------------------------------------------------
# RGA, CFPNet EVC
# ----------------------------------------------------------------------------------------------


def rga_state(rng, p, c, n, ci, ni, d, spatial=True, channel=True):
    """RGA_Module state dict, from the published __init__ (conv 1x1 no bias, BN, ReLU)."""
    sd = {}

    def cbr(name, cin, cout):
        sd[f"{p}{name}.0.weight"] = rand(rng, cout, cin, 1, 1)
        sd.update(bn_params(rng, f"{p}{name}.1.", cout))

    for kind, on, (cin, cout) in (("spatial", spatial, (c, ci)), ("channel", channel, (n, ni))):
        if on:
            cbr(f"theta_{kind}", cin, cout)
            cbr(f"phi_{kind}", cin, cout)
            cbr(f"gx_{kind}", cin, cout)
    if spatial:
        cbr("gg_spatial", 2 * n, ni)
    if channel:
        cbr("gg_channel", 2 * c, ci)
    for kind, on, width in (("spatial", spatial, 1 + ni), ("channel", channel, 1 + ci)):
        if on:
            cbr(f"W_{kind}", width, width // d)
            sd[f"{p}W_{kind}.3.weight"] = rand(rng, 1, width // d, 1, 1)
            sd.update(bn_params(rng, f"{p}W_{kind}.4.", 1))
    return sd


def test_rga_ratios_inferred_spatial_size_required(tmp_path):
    rng = np.random.default_rng(19)
    sd = {**rga_state(rng, "rga_att1.", c=8, n=16, ci=2, ni=4, d=2), "layer1.0.conv1.weight": rand(rng, 4, 4, 1, 1)}
    path = str(save_pt(tmp_path / "rga.pth", {"state_dict": sd}))
    with pytest.raises(ConfigError, match=r"spatial_size=\(H, W\) is not stored.*H\*W = 16"):
        from_checkpoint(path, "rga")
    with pytest.raises(ConfigError, match=r"spatial_size=\(4, 5\) contradicts"):
        from_checkpoint(path, "rga", spatial_size=(4, 5))
    ckpt = from_checkpoint(path, "rga", spatial_size=(2, 8))
    cfg = ckpt.config
    assert ckpt.block == "RelationAwareAttention"
    assert (cfg["in_channels"], tuple(cfg["spatial_size"]), cfg["use_spatial"], cfg["use_channel"]) == (
        8,
        (2, 8),
        True,
        True,
    )
    assert (cfg["cha_ratio"], cfg["spa_ratio"], cfg["down_ratio"]) == (4, 4, 2)
    assert ckpt.mapped == {k: f"rga_att1.{k}" for k in ckpt.weights}
    for k in ckpt.weights:
        np.testing.assert_array_equal(ckpt.weights[k], sd[f"rga_att1.{k}"])
    assert len(ckpt.dropped) == len([k for k in sd if k.endswith("num_batches_tracked")])
    x = np.random.default_rng(20).normal(size=(2, 8, 2, 8))
    check_reference(ckpt, x, rga_forward(x, sd, "rga_att1."))
    sd_s = rga_state(rng, "", 8, 16, 1, 2, 1, channel=False)
    spatial_only = from_checkpoint(sd_s, "rga", spatial_size=(4, 4))
    assert (
        spatial_only.config["use_channel"],
        spatial_only.config["cha_ratio"],
        spatial_only.config["spa_ratio"],
        spatial_only.config["down_ratio"],
    ) == (False, 8, 8, 1)
    x = np.random.default_rng(21).normal(size=(1, 8, 4, 4))
    check_reference(spatial_only, x, rga_forward(x, sd_s, "", channel=False))
    sd_c = rga_state(rng, "", 8, 16, 4, 4, 5, spatial=False)  # RGA-C: 1 + 4 // 5 channels in W_channel
    channel_only = from_checkpoint(sd_c, "rga", spatial_size=(4, 4))
    assert (
        channel_only.config["use_spatial"],
        channel_only.config["cha_ratio"],
        channel_only.config["spa_ratio"],
        channel_only.config["down_ratio"],
    ) == (False, 2, 4, 5)
    check_reference(channel_only, x, rga_forward(x, sd_c, "", spatial=False))


def test_cfpnet_evc_drops_unused_linear(tmp_path):
    rng = np.random.default_rng(21)
    spec = make_config("ExplicitVisualCenter", in_channels=8, num_codes=5, mlp_ratio=2)
    block = {k: v.astype(np.float32) for k, v in random_weights(spec.schema(), rng).items()}
    p = "backbone.evc."
    sd = {
        **{p + k: v for k, v in block.items()},
        p + "l_MLP.linear.weight": rand(rng, 8, 8),
        p + "l_MLP.linear.bias": rand(rng, 8),
        p + "bn1.num_batches_tracked": np.array(5),
        "head.cls.weight": rand(rng, 3, 8),
    }
    ckpt = from_checkpoint(str(save_pt(tmp_path / "cfp.pth", {"model": sd})), "cfpnet")
    assert ckpt.block == "ExplicitVisualCenter"
    assert (ckpt.config["in_channels"], ckpt.config["num_codes"], ckpt.config["mlp_ratio"]) == (8, 5, 2)
    assert set(ckpt.dropped) == {p + "l_MLP.linear.weight", p + "l_MLP.linear.bias", p + "bn1.num_batches_tracked"}
    assert "never used" in ckpt.dropped[p + "l_MLP.linear.weight"]
    assert list(ckpt.weights) == list(block)  # schema order
    for k, v in block.items():
        np.testing.assert_array_equal(ckpt.weights[k], v)
    with pytest.raises(ConfigError, match="num_codes=64 contradicts"):
        from_checkpoint(sd, "cfpnet", num_codes=64)
    # CFPNet (YOLOX init_yolo): every BatchNorm2d at eps 1e-3; the encoding's BatchNorm1d keeps 1e-5
    cfg = ckpt.config
    assert (cfg["bn_eps"], cfg["conv_block_bn_eps"], cfg["bn_momentum"]) == (1e-3, 1e-3, 0.03)
    assert cfg.get("encoding_bn_eps", 1e-5) == 1e-5
    assert any("init_yolo" in n for n in ckpt.notes)
    x = np.random.default_rng(22).normal(size=(2, 8, 5, 4))
    check_reference(ckpt, x, evc_forward(x, sd, p, 1e-3, 1e-3, 1e-5))
    # a standalone EVCBlock: eps 1e-5, ConvBlock 1e-6; the eps matter
    plain = from_checkpoint(sd, "cfpnet", yolox_bn=False)
    assert (plain.config["bn_eps"], plain.config["conv_block_bn_eps"], plain.config["bn_momentum"]) == (1e-5, 1e-6, 0.1)
    expected = evc_forward(x, sd, p, 1e-5, 1e-6, 1e-5)
    check_reference(plain, x, expected)
    assert np.max(np.abs(run(ckpt.block, x, ckpt.weights, ckpt.config) - expected)) > 1e-6


def test_truncated_pt_checkpoint(tmp_path):
    path = save_pt(tmp_path / "cut.pth", alexhex7_state(np.random.default_rng(0), 2, 4, 2))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightFileError, match="cut.pth"):
        from_checkpoint(str(path), "alexhex7")


# ----------------------------------------------------------------------------------------------
# OpenMMLab: mmcv modules and mmsegmentation decode heads
# ----------------------------------------------------------------------------------------------


def mmcv_nonlocal_forward(x, sd, p, mode="embedded_gaussian", use_scale=True, temperature=None):
    """mmcv _NonLocalNd.forward (and mmseg DisentangledNonLocal2d.forward with ``temperature``)."""
    b, nd = x.shape[0], x.ndim - 2
    sub = p + "g.0.conv.weight" in sd
    pool = (lambda t: max_pool(t, (1, 2, 2) if nd == 3 else (2,) * nd)) if sub else (lambda t: t)
    k = "0.conv" if sub else "conv"

    def conv(name, t):
        return conv1x1(t, sd[f"{p}{name}.weight"], sd.get(f"{p}{name}.bias"))

    g = pool(conv(f"g.{k}", x))
    g = g.reshape(b, g.shape[1], -1)
    if mode == "gaussian":
        theta, phi = x.reshape(b, x.shape[1], -1), pool(x).reshape(b, x.shape[1], -1)
    else:
        theta = conv("theta.conv", x).reshape(b, g.shape[1], -1)
        phi = pool(conv(f"phi.{k}", x)).reshape(b, g.shape[1], -1)
    if temperature is not None:  # whitened: means over positions removed
        theta = theta - theta.mean(-1, keepdims=True)
        phi = phi - phi.mean(-1, keepdims=True)
    m = phi.shape[-1]
    if mode == "concatenation":
        w = f64(sd[p + "concat_project.conv.weight"]).reshape(-1)
        ci = theta.shape[1]
        f = np.maximum(
            np.einsum("c,bcn->bn", w[:ci], theta)[:, :, None] + np.einsum("c,bcm->bm", w[ci:], phi)[:, None], 0
        )
        f = f / m
    elif mode == "dot_product":
        f = np.einsum("bcn,bcm->bnm", theta, phi) / m
    else:
        f = np.einsum("bcn,bcm->bnm", theta, phi)
        if use_scale and mode == "embedded_gaussian":
            f = f / theta.shape[1] ** 0.5
        f = softmax(f / (temperature or 1.0))
    y = np.einsum("bnm,bcm->bcn", f, g).reshape(b, -1, *x.shape[2:])

    def conv_out(t):
        t = conv("conv_out.conv", t)
        return batch_norm(t, sd, p + "conv_out.bn.", 1e-5) if p + "conv_out.bn.weight" in sd else t

    out = x + conv_out(y)
    if temperature is not None:  # the unary term, through the same conv_out
        mask = softmax(conv1x1(x, sd[p + "conv_mask.weight"], sd[p + "conv_mask.bias"]).reshape(b, 1, -1))
        u = np.einsum("bm,bcm->bc", mask[:, 0], g).reshape(b, -1, *(1,) * nd)
        out = out + conv_out(u)
    return out


def context_forward(x, sd, p, timm=False):
    """mmcv ContextBlock.forward / timm GlobalContext.forward (ReLU, sigmoid gate)."""
    b, c, h, w = x.shape
    mask, add, mul = (
        ("conv_attn", "mlp_add", "mlp_scale") if timm else ("conv_mask", "channel_add_conv", "channel_mul_conv")
    )
    fc1, norm, fc2 = ("fc1", "norm", "fc2") if timm else ("0", "1", "3")
    eps = 1e-6 if timm else 1e-5
    if p + mask + ".weight" in sd:
        a = softmax(conv1x1(x, sd[f"{p}{mask}.weight"], sd[f"{p}{mask}.bias"]).reshape(b, h * w))
        context = np.einsum("bcn,bn->bc", x.reshape(b, c, -1), a).reshape(b, c, 1, 1)
    else:
        context = x.mean(axis=(2, 3), keepdims=True)

    def transform(branch):
        t = conv1x1(context, sd[f"{p}{branch}.{fc1}.weight"], sd[f"{p}{branch}.{fc1}.bias"])
        mu, var = t.mean(axis=(1, 2, 3), keepdims=True), t.var(axis=(1, 2, 3), keepdims=True)
        t = (t - mu) / np.sqrt(var + eps)
        t = t * f64(sd[f"{p}{branch}.{norm}.weight"]).reshape(1, -1, 1, 1) + f64(
            sd[f"{p}{branch}.{norm}.bias"]
        ).reshape(1, -1, 1, 1)
        return conv1x1(np.maximum(t, 0), sd[f"{p}{branch}.{fc2}.weight"], sd[f"{p}{branch}.{fc2}.bias"])

    out = x
    if p + mul + f".{fc1}.weight" in sd:
        out = out * (1 / (1 + np.exp(-transform(mul))))
    if p + add + f".{fc1}.weight" in sd:
        out = out + transform(add)
    return out


def mmseg_pam_forward(x, sd, p):
    """mmseg DAHead PAM: SelfAttentionBlock(query_feats=x, key_feats=x), no matmul_norm, gamma."""
    b, c, h, w = x.shape
    q = conv1x1(x, sd[p + "query_project.weight"], sd[p + "query_project.bias"]).reshape(b, -1, h * w)
    k = conv1x1(x, sd[p + "key_project.weight"], sd[p + "key_project.bias"]).reshape(b, -1, h * w)
    v = conv1x1(x, sd[p + "value_project.weight"], sd[p + "value_project.bias"]).reshape(b, c, h * w)
    sim = softmax(np.einsum("bcn,bcm->bnm", q, k))
    return f64(sd[p + "gamma.scale"]) * np.einsum("bnm,bcm->bcn", sim, v).reshape(x.shape) + x


def conv_module(rng, sd, key, cin, cout, nd=2, bias=True):
    sd[f"{key}.weight"] = rand(rng, cout, cin, *(1,) * nd)
    if bias:
        sd[f"{key}.bias"] = rand(rng, cout)


def mmcv_nonlocal_state(rng, p, nd, c, ci, mode="embedded_gaussian", sub=False, norm=True, mask=False):
    """mmcv NonLocalNd: ConvModules g/theta/phi (bias), conv_out (no bias under a norm: bias='auto')."""
    sd, k = {}, "0.conv" if sub else "conv"
    conv_module(rng, sd, f"{p}g.{k}", c, ci, nd)
    if mode != "gaussian":
        conv_module(rng, sd, f"{p}theta.conv", c, ci, nd)
        conv_module(rng, sd, f"{p}phi.{k}", c, ci, nd)
    if mode == "concatenation":
        conv_module(rng, sd, f"{p}concat_project.conv", 2 * ci, 1, 2, bias=False)
    conv_module(rng, sd, f"{p}conv_out.conv", ci, c, nd, bias=not norm)
    if norm:
        sd.update(bn_params(rng, f"{p}conv_out.bn.", c))
    if mask:
        conv_module(rng, sd, f"{p}conv_mask", c, 1, nd)
    return sd


def context_state(rng, p, c, ci, att=True, add=True, mul=False, timm=False):
    sd = {}
    mask, branches = (
        ("conv_attn", ("mlp_add", "mlp_scale")) if timm else ("conv_mask", ("channel_add_conv", "channel_mul_conv"))
    )
    if att:
        conv_module(rng, sd, p + mask, c, 1)
    for on, branch in zip((add, mul), branches):
        if on:
            conv_module(rng, sd, f"{p}{branch}.{'fc1' if timm else 0}", c, ci)
            shape = (ci,) if timm else (ci, 1, 1)  # timm LayerNorm2d, mmcv LayerNorm([C', 1, 1])
            sd[f"{p}{branch}.{'norm' if timm else 1}.weight"] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
            sd[f"{p}{branch}.{'norm' if timm else 1}.bias"] = rand(rng, *shape)
            conv_module(rng, sd, f"{p}{branch}.{'fc2' if timm else 3}", ci, c)
    return sd


@pytest.mark.parametrize(
    "nd, mode, sub, norm, kw",
    [
        (2, "embedded_gaussian", False, True, {}),
        (3, "embedded_gaussian", True, False, {"use_scale": False}),
        (1, "dot_product", True, True, {"mode": "dot_product"}),
        (2, "gaussian", True, True, {}),
        (2, "concatenation", False, False, {}),
    ],
)
def test_mmcv_nonlocal(nd, mode, sub, norm, kw):
    rng = np.random.default_rng(31 + nd)
    p = "backbone.layer3.1.nonlocal_block."
    sd = {**mmcv_nonlocal_state(rng, p, nd, 6, 3, mode, sub, norm), "backbone.conv1.weight": rand(rng, 6, 3, 3, 3)}
    ckpt = from_checkpoint(sd, "mmcv", **kw)
    cfg = ckpt.config
    assert ckpt.block == f"NonLocalBlock{nd}D"
    assert (cfg["in_channels"], cfg["inter_channels"], cfg["mode"], cfg["sub_sample"], cfg["bn_layer"]) == (
        6,
        3,
        mode,
        sub,
        norm,
    )
    use_scale = kw.get("use_scale", True)
    assert cfg["scale"] == (3**-0.5 if use_scale and mode == "embedded_gaussian" else None)
    k = "0.conv" if sub else "conv"
    assert ckpt.mapped["g.weight"] == f"{p}g.{k}.weight" and ckpt.mapped["W.weight"] == f"{p}conv_out.conv.weight"
    if norm:  # ConvModule(bias='auto') has no conv bias under a norm
        assert ckpt.mapped["bn.running_var"] == f"{p}conv_out.bn.running_var" and np.all(ckpt.weights["W.bias"] == 0)
        assert ckpt.dropped == {f"{p}conv_out.bn.num_batches_tracked": "BatchNorm step counter (not a weight)"}
    x = np.random.default_rng(5).normal(size=(2, 6) + {1: (7,), 2: (5, 4), 3: (2, 5, 4)}[nd])
    check_reference(ckpt, x, mmcv_nonlocal_forward(x, sd, p, mode, use_scale))


def test_mmcv_context_block_and_criss_cross():
    rng = np.random.default_rng(41)
    sd = {
        **context_state(rng, "backbone.layer2.0.context_block.", 8, 2, mul=True),
        **context_state(rng, "backbone.layer3.0.context_block.", 8, 4, att=False, add=False, mul=True),
        **qkv_state(rng, "neck.cca.", 16, 2),
    }
    sd["neck.cca.gamma.scale"] = sd.pop("neck.cca.gamma").reshape(())  # mmcv Scale: a 0-d parameter
    with pytest.raises(WeightError) as e:
        from_checkpoint(sd, "mmcv")
    assert (
        "3 blocks found; choose one with prefix=: 'backbone.layer2.0.context_block.' (GlobalContext), "
        "'backbone.layer3.0.context_block.' (GlobalContext), 'neck.cca.' (CrissCrossAttention)" in str(e.value)
    )
    x = np.random.default_rng(42).normal(size=(2, 8, 3, 5))
    for p, flags in (
        ("backbone.layer2.0.context_block.", ("att", True, True)),
        ("backbone.layer3.0.context_block.", ("avg", False, True)),
    ):
        gc = from_checkpoint(sd, "mmcv", prefix=p)
        cfg = gc.config
        assert gc.block == "GlobalContext" and (cfg["pooling_type"], cfg["channel_add"], cfg["channel_mul"]) == flags
        assert (
            gc.weights[next(n for n in gc.weights if n.endswith(".1.weight"))].ndim == 1
        )  # LayerNorm (C', 1, 1) flattened
        check_reference(gc, x, context_forward(x, sd, p))
    cca = from_checkpoint(sd, "mmcv", prefix="neck.cca")
    assert cca.block == "CrissCrossAttention" and cca.config["recurrence"] == 1 and cca.config["qk_ratio"] == 8
    assert cca.weights["gamma"].shape == (1,) and cca.mapped["gamma"] == "neck.cca.gamma.scale"
    x = np.random.default_rng(43).normal(size=(1, 16, 3, 4))
    check_reference(cca, x, ccnet_forward(x, sd, "neck.cca.", 1, gamma="gamma.scale"))
    with pytest.raises(ConfigError, match="in_channels=4 contradicts"):
        from_checkpoint(sd, "mmcv", prefix="neck.cca.", in_channels=4)
    with pytest.raises(ConfigError, match="channel_add=True contradicts"):
        from_checkpoint(sd, "mmcv", prefix="backbone.layer3.0.context_block.", channel_add=True)


def mmseg_segmentor(rng):
    """One decode head of each attention kind, with the segmentor's other modules around them."""
    h = "decode_head."
    sd = {
        "backbone.stem.0.weight": rand(rng, 4, 3, 3, 3),
        **bn_params(rng, "backbone.stem.1.", 4),
        h + "convs.0.conv.weight": rand(rng, 8, 16, 3, 3),
        h + "conv_seg.weight": rand(rng, 19, 8, 1, 1),
        "auxiliary_head.convs.0.conv.weight": rand(rng, 8, 8, 3, 3),
        **mmcv_nonlocal_state(rng, h + "nl_block.", 2, 8, 4),
        **mmcv_nonlocal_state(rng, h + "dnl_block.", 2, 8, 4, mask=True),
        **context_state(rng, h + "gc_block.", 8, 2),
        **qkv_state(rng, h + "cca.", 8, 1),
        h + "pam_in_conv.conv.weight": rand(rng, 8, 16, 3, 3),
        h + "cam.gamma.scale": rand(rng, 1).reshape(()),
    }
    sd[h + "cca.gamma.scale"] = sd.pop(h + "cca.gamma").reshape(())
    for name, o in {"query_project": 2, "key_project": 2, "value_project": 8}.items():
        conv_module(rng, sd, f"{h}pam.{name}", 8, o)
    sd[h + "pam.gamma.scale"] = rand(rng, 1).reshape(())
    return sd


def test_mmseg_segmentor_heads(tmp_path):
    rng = np.random.default_rng(51)
    sd = mmseg_segmentor(rng)
    path = str(save_pt(tmp_path / "segmentor.pth", {"meta": {"mmseg_version": "0.30.0"}, "state_dict": sd}))
    with pytest.raises(WeightError) as e:
        from_checkpoint(path, "mmseg")
    assert (
        "6 blocks found; choose one with prefix=: 'decode_head.cam.' (ChannelAttention), 'decode_head.cca.' "
        "(CrissCrossAttention), 'decode_head.dnl_block.' (DisentangledNonLocal), 'decode_head.gc_block.' "
        "(GlobalContext), 'decode_head.nl_block.' (NonLocalBlock), 'decode_head.pam.' (PositionAttention)"
    ) in str(e.value)
    with pytest.raises(
        WeightError, match=r"no mmseg head block at prefix 'decode_head\.psa'.*found: 'decode_head\.cam\.'"
    ):
        from_checkpoint(path, "mmseg", prefix="decode_head.psa")
    x = np.random.default_rng(52).normal(size=(2, 8, 4, 5))
    h = "decode_head."
    nl = from_checkpoint(path, "mmseg", prefix=h + "nl_block")
    assert nl.block == "NonLocalBlock2D" and nl.config["scale"] == 4**-0.5 and nl.config["sub_sample"] is False
    check_reference(nl, x, mmcv_nonlocal_forward(x, sd, h + "nl_block."))
    dnl = from_checkpoint(path, "mmseg", prefix=h + "dnl_block")
    assert dnl.block == "DisentangledNonLocal2D" and dnl.config["temperature"] == 0.05 and dnl.config["use_scale"]
    assert dnl.mapped["conv_mask.weight"] == h + "dnl_block.conv_mask.weight"
    check_reference(dnl, x, mmcv_nonlocal_forward(x, sd, h + "dnl_block.", temperature=0.05))
    cold = from_checkpoint(path, "mmseg", prefix=h + "dnl_block", temperature=0.5, use_scale=False)
    check_reference(cold, x, mmcv_nonlocal_forward(x, sd, h + "dnl_block.", use_scale=False, temperature=0.5))
    gc = from_checkpoint(path, "mmseg", prefix=h + "gc_block")
    assert gc.block == "GlobalContext" and gc.config["inter_channels"] == 2
    check_reference(gc, x, context_forward(x, sd, h + "gc_block."))
    cca = from_checkpoint(path, "mmseg", prefix=h + "cca")
    assert cca.config["recurrence"] == 2 and any("CCHead" in n for n in cca.notes)  # CCHead's default
    check_reference(cca, x[:1], ccnet_forward(x[:1], sd, h + "cca.", 2, gamma="gamma.scale"))
    pam = from_checkpoint(path, "mmseg", prefix=h + "pam")
    assert pam.block == "PositionAttention" and pam.config == {"in_channels": 8, "qk_ratio": 4}
    assert pam.mapped == {
        "query_conv.weight": h + "pam.query_project.weight",
        "query_conv.bias": h + "pam.query_project.bias",
        "key_conv.weight": h + "pam.key_project.weight",
        "key_conv.bias": h + "pam.key_project.bias",
        "value_conv.weight": h + "pam.value_project.weight",
        "value_conv.bias": h + "pam.value_project.bias",
        "gamma": h + "pam.gamma.scale",
    }
    check_reference(pam, x, mmseg_pam_forward(x, sd, h + "pam."))
    cam = from_checkpoint(path, "mmseg", prefix=h + "cam")
    assert cam.block == "ChannelAttention" and cam.weights["gamma"].shape == (1,)
    check_reference(cam, x, cam_forward(x, sd[h + "cam.gamma.scale"]))


def test_mmseg_refusals():
    rng = np.random.default_rng(53)
    sd = mmseg_segmentor(rng)
    h = "decode_head."
    with pytest.raises(ConfigError, match="qk_ratio=8 contradicts"):
        from_checkpoint(sd, "mmseg", prefix=h + "pam", qk_ratio=8)
    with pytest.raises(ConfigError, match="mode='gaussian' contradicts"):
        from_checkpoint(sd, "mmseg", prefix=h + "nl_block", mode="gaussian")
    gn = {k.replace("conv_out.bn.", "conv_out.gn."): v for k, v in sd.items() if ".nl_block." in k}
    with pytest.raises(WeightError, match="conv_out.gn: only a BatchNorm"):
        from_checkpoint(gn, "mmseg")
    extra = {**sd, h + "pam.out_project.weight": rand(rng, 8, 8, 1, 1)}
    with pytest.raises(WeightError, match=r"cannot map 'decode_head\.pam\.out_project\.weight'"):
        from_checkpoint(extra, "mmseg", prefix=h + "pam")


def test_timm_global_context(tmp_path):
    rng = np.random.default_rng(61)
    sd = {
        **context_state(rng, "stages.1.blocks.0.attn.", 16, 2, timm=True, add=False, mul=True),
        **context_state(rng, "stages.2.blocks.0.attn.", 16, 4, att=False, add=True, mul=True, timm=True),
        **timm_state(rng, "stages.3.blocks.0.attn.", 8, 3),
    }
    with pytest.raises(WeightError) as e:
        from_checkpoint(sd, "timm")
    assert (
        "'stages.1.blocks.0.attn.' (GlobalContext), 'stages.2.blocks.0.attn.' (GlobalContext), "
        "'stages.3.blocks.0.attn.' (NonLocalAttn)"
    ) in str(e.value)
    x = np.random.default_rng(62).normal(size=(2, 16, 3, 5))
    for p in ("stages.1.blocks.0.attn.", "stages.2.blocks.0.attn."):
        gc = from_checkpoint(sd, "timm", prefix=p)
        assert gc.block == "GlobalContext" and gc.config["ln_eps"] == 1e-6 and gc.config["rounding"] == "timm"
        assert gc.mapped["channel_mul_conv.3.weight"] == p + "mlp_scale.fc2.weight"
        check_reference(gc, x, context_forward(x, sd, p, timm=True))
    assert from_checkpoint(sd, "timm", prefix="stages.3.blocks.0.attn.").block == "NonLocalBlock2D"


def test_convert_reads_mmseg(tmp_path, capsys):
    sd = mmseg_segmentor(np.random.default_rng(71))
    src = save_pt(tmp_path / "dnl.pth", {"state_dict": sd})
    dst = tmp_path / "cca.safetensors"
    assert main(["convert", str(src), str(dst), "--source", "mmseg", "--prefix", "decode_head.cca"]) == 0
    assert "decode_head.cca.gamma.scale -> gamma" in capsys.readouterr().out
    ckpt = load_file(dst)
    assert ckpt.block == "CrissCrossAttention" and ckpt.config["recurrence"] == 2
    assert main(["convert", str(src), str(tmp_path / "x.safetensors"), "--source", "mmseg"]) == 1
    assert "6 blocks found" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# weight normalisation: both torch layouts, kept (weight_norm=True) or folded exactly
# ----------------------------------------------------------------------------------------------


def weight_normed_convs(layout, names=("g", "theta", "phi", "W"), seed=0):
    """AlexHex7 non-local convs (no sub-sampling, no BN) in float64 torch, those in ``names``
    weight-normalised in ``layout``; returns (their state dict, the plain one torch computes)."""
    torch.manual_seed(seed)
    convs = {n: torch.nn.Conv2d(*((3, 6) if n == "W" else (6, 3)), 1).double() for n in ("g", "theta", "phi", "W")}
    for n in names:
        if layout == "legacy":
            convs[n] = torch.nn.utils.weight_norm(convs[n])
            g = convs[n].weight_g
        else:
            convs[n] = torch.nn.utils.parametrizations.weight_norm(convs[n])
            g = convs[n].parametrizations.weight.original0
        with torch.no_grad():
            g.uniform_(0.5, 1.5)  # the kernel is no longer v
        convs[n](torch.zeros(1, convs[n].in_channels, 1, 1, dtype=torch.float64))  # legacy: recompute weight
    state = {f"{n}.{k}": v.detach().numpy().copy() for n, m in convs.items() for k, v in m.state_dict().items()}
    plain = {f"{n}.{k}": getattr(m, k).detach().numpy().copy() for n, m in convs.items() for k in ("weight", "bias")}
    return state, plain


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
@pytest.mark.parametrize("layout", ["parametrizations", "legacy"])
def test_weight_norm_kept_or_folded_exactly(layout):
    state, plain = weight_normed_convs(layout)
    x = np.random.default_rng(81).normal(size=(2, 6, 5, 4))
    expected = alexhex7_forward(x, plain, "embedded_gaussian")
    kept = from_checkpoint(state, "alexhex7")
    assert kept.config["weight_norm"] is True and kept.config["sub_sample"] is False
    g_src = "W.weight_g" if layout == "legacy" else f"W.{WEIGHT_NORM_G}"
    assert kept.mapped[f"W.{WEIGHT_NORM_G}"] == g_src
    np.testing.assert_array_equal(kept.weights[f"W.{WEIGHT_NORM_G}"], state[g_src])
    check_reference(kept, x, expected)
    folded = from_checkpoint(state, "alexhex7", weight_norm=False)
    assert folded.config["weight_norm"] is False and folded.weights["W.weight"].dtype == np.float64
    assert any("folded" in n for n in folded.notes)
    # exact: the folded kernels are the ones the normalised convs compute
    np.testing.assert_array_equal(
        run(folded.block, x, folded.weights, folded.config), run(kept.block, x, kept.weights, kept.config)
    )
    check_reference(folded, x, expected)


def test_weight_norm_partial_contradictions_and_bad_layouts():
    state, plain = weight_normed_convs("parametrizations", names=("W",), seed=1)
    x = np.random.default_rng(82).normal(size=(1, 6, 4, 4))
    partial = from_checkpoint(state, "alexhex7")  # only W: the block cannot hold it, so it is folded
    assert partial.config["weight_norm"] is False and partial.mapped["W.weight"] == f"W.{WEIGHT_NORM_V}"
    check_reference(partial, x, alexhex7_forward(x, plain, "embedded_gaussian"))
    with pytest.raises(ConfigError, match=r"weight_norm=True contradicts.*only \['W'\] are weight-normalised"):
        from_checkpoint(state, "alexhex7", weight_norm=True)
    with pytest.raises(ConfigError, match="no conv is weight-normalised"):
        from_checkpoint(plain, "alexhex7", weight_norm=True)
    with pytest.raises(WeightError, match="weight norm over dim 0"):
        from_checkpoint({**state, f"W.{WEIGHT_NORM_G}": np.ones((1, 3, 1, 1))}, "alexhex7")
    with pytest.raises(WeightError, match="both given"):
        from_checkpoint({**state, "W.weight": plain["W.weight"]}, "alexhex7")
    sagan = qkv_state(np.random.default_rng(83), "attn1.", 8, 1)  # a block without the option: folded
    v = sagan.pop("attn1.value_conv.weight")
    sagan["attn1.value_conv.weight_v"], sagan["attn1.value_conv.weight_g"] = v, np.full((8, 1, 1, 1), 2.0, np.float32)
    ckpt = from_checkpoint(sagan, "sagan")
    norm = np.sqrt(np.sum(f64(v) ** 2, axis=(1, 2, 3), keepdims=True))
    np.testing.assert_allclose(ckpt.weights["value_conv.weight"], 2.0 * f64(v) / norm, rtol=1e-15)


def test_weight_norm_init_in_every_framework(fw):
    spec = make_config("NonLocalBlock2D", in_channels=4, bn_layer=False, share_query_key=True, weight_norm=True)
    w = fw.module.export_weights(fw.make(spec.block, spec.to_dict()))
    assert list(w) == list(tensors(spec.schema()))
    g, v = (lambda conv, part=part: w[f"{conv}.{part}"] for part in (WEIGHT_NORM_G, WEIGHT_NORM_V))
    # the last conv starts at zero through g (and its bias), with v a direction: the identity
    assert np.all(g("W") == 0) and np.all(w["W.bias"] == 0) and np.all(np.any(v("W") != 0, axis=(1, 2, 3)))
    for conv in ("g", "theta"):  # the others start as their plain init: g = ‖v‖
        norm = np.sqrt(np.sum(v(conv).astype(np.float64) ** 2, axis=(1, 2, 3), keepdims=True))
        np.testing.assert_allclose(g(conv), norm, rtol=1e-6)
