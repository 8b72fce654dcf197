"""Importers: published checkpoints -> canonical ``Checkpoint`` (names, layouts, config).

Each source maps its published parameter names to the canonical ones (docs/design.md §3), reads what it
can of the config from key names and tensor shapes, takes the rest from keyword arguments (a
keyword that contradicts the checkpoint is a ``ConfigError``), and records what it dropped and
which conventions it applied. ``prefix=`` picks one block in a bigger state dict; without it, a
file holding several blocks is an error that lists their prefixes.

Sources (published code they follow):

=========  =====================================================================================
alexhex7   AlexHex7/Non-local_pytorch: ``g[.0]``, ``theta``, ``phi[.0]`` (``.0`` with sub_sample),
           ``W`` or ``W.0`` + BN ``W.1``, ``concat_project.0``; pools after the conv, no scale.
caffe2     facebookresearch/video-nonlocal-net blobs (pickled dict, maybe under ``'blobs'``):
           ``<p>_theta_w/_b``, ``_phi_*``, ``_g_*``, ``_out_*``, ``_bn_s/_b/_rm/_riv`` (``_riv`` is
           the running variance); pools x before the φ/g convs; softmax scale Ci^-1/2; SpatialBN
           epsilon 1.0000001e-5 and momentum 0.9 in Caffe2's convention (= 0.1 in PyTorch's).
timm       timm ``NonLocalAttn``: ``t``, ``p``, ``g``, ``z`` convs with bias, ``norm`` BN; scale
           in_channels^-1/2 (``use_scale=True``), no sub-sampling.
danet      DANet ``PAM_Module`` (``query_conv``, ``key_conv``, ``value_conv``, ``gamma``) and
           ``CAM_Module`` (``gamma``), e.g. under ``head.sa.`` / ``head.sc.``.
sagan      Self-Attention-GAN ``Self_Attn`` (same names), e.g. under ``attn1.`` / ``attn2.``.
ccnet      CCNet ``CrissCrossAttention`` (same names), e.g. under ``head.cca.``; the recurrence
           is not stored in the weights: keyword ``recurrence`` (default 1; RCCA heads use 2).
rga        RGA ``RGA_Module`` (canonical names), e.g. under ``rga_att1.``; ``spatial_size`` is needed.
cfpnet     CFPNet ``EVCBlock`` (canonical names); ``l_MLP.linear.*`` is unused in forward: dropped.
           CFPNet models are built by YOLOX's ``get_model``, whose ``init_yolo`` sets every
           BatchNorm2d to eps 1e-3, momentum 0.03: applied by default (``yolox_bn=False``: off).
=========  =====================================================================================
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from ..errors import ConfigError, WeightError
from ..specs import check_weights, make_config, tensors
from .files import Checkpoint, read_state_dict, unwrap_state_dict

BN_COUNTER = "BatchNorm step counter (not a weight)"


@dataclass
class _Import:
    """What a source importer found: block, config keywords, canonical weights and the report."""

    block: str
    config: dict
    weights: dict = field(default_factory=dict)
    mapped: dict = field(default_factory=dict)
    dropped: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)


class _Ctx:
    """One import: the state dict, the user's keywords, and error helpers naming the source."""

    def __init__(self, source: str, state: dict, kw: dict, origin: str):
        self.source, self.state, self.kw, self.origin = source, state, kw, origin
        self.where = f"from_checkpoint({origin}, source={source!r})"

    def fail(self, problems: list[str]):
        raise WeightError(self.where, problems)

    def fact(self, block: str, name: str, value):
        """A config value read from the checkpoint; a contradicting keyword is an error."""
        given = self.kw.get(name)
        if given is not None and _norm(given) != _norm(value):
            raise ConfigError(
                f"{block}: keyword {name}={given!r} contradicts the checkpoint "
                f"({self.where}), which has {name}={value!r}"
            )
        return value

    def ratio(self, block: str, name: str, constraints: list[tuple[int, int]], default: int = 8) -> int:
        """A ratio r with total // r == width for every (total, width); the keyword if given."""
        given = self.kw.get(name)
        if given is not None:
            bad = [(t, w) for t, w in constraints if t // given != w]
            if bad:
                t, w = bad[0]
                raise ConfigError(
                    f"{block}: keyword {name}={given!r} contradicts the checkpoint "
                    f"({self.where}): {t} // {given} = {t // given}, the weights have {w}"
                )
            return given
        top = max(t for t, _ in constraints)
        fits = [r for r in range(1, top + 1) if all(t // r == w for t, w in constraints)]
        if not fits:
            self.fail([f"no {name} gives the widths {[w for _, w in constraints]} from {[t for t, _ in constraints]}"])
        t, w = constraints[0]  # prefer the default, then the exact quotient (as the anchor wrote it)
        return next(r for r in (default, t // max(w, 1), fits[0]) if r in fits)

    def array(self, key: str) -> np.ndarray:
        return np.asarray(self.state[key])


def _norm(v):
    return tuple(_norm(x) for x in v) if isinstance(v, (list, tuple)) else v


# ----------------------------------------------------------------------------------------------
# prefixes and key mapping
# ----------------------------------------------------------------------------------------------


def _prefixes(
    state, anchor: str, siblings: tuple[str, ...] = (), sep: str = ".", accept: Callable[[str], bool] | None = None
) -> list[str]:
    """Prefixes p (``''`` or ending with ``sep``) with ``p + anchor`` and every ``p + sibling`` in state."""
    found = set()
    for k in state:
        if k == anchor:
            p = ""
        elif k.endswith(sep + anchor):
            p = k[: len(k) - len(anchor)]
        else:
            continue
        if all(p + s in state for s in siblings) and (accept is None or accept(p)):
            found.add(p)
    return sorted(found)


def _choose(
    ctx: _Ctx, found: list[str], prefix: str | None, what: str, sep: str = ".", labels: dict[str, str] | None = None
) -> str:
    labels = labels or {}
    what, _, hint = what.partition(" (")  # "name (keys ...)"
    hint = f" (looking for {hint}" if hint else ""
    listing = ", ".join(repr(p) + (f" ({labels[p]})" if p in labels else "") for p in found)
    if prefix is not None:
        p = prefix if prefix == "" or prefix.endswith(sep) else prefix + sep
        if p not in found:
            ctx.fail([f"no {what} at prefix {prefix!r}{hint}; found: {listing or 'none'}"])
        return p
    if not found:
        ctx.fail([f"no {what} found in the checkpoint{hint}; it has {len(ctx.state)} keys"])
    if len(found) > 1:
        ctx.fail([f"{len(found)} blocks found; choose one with prefix=: {listing}"])
    return found[0]


def _map(
    ctx: _Ctx,
    res: _Import,
    keys: dict[str, str],
    rename: Callable[[str], str | None],
    drop: Callable[[str], str | None] = lambda rest: None,
) -> None:
    """Map block keys ({rest: full key}) to canonical names; anything unmappable is an error."""
    unmapped = []
    for rest, key in keys.items():
        why = BN_COUNTER if rest.endswith("num_batches_tracked") else drop(rest)
        if why:
            res.dropped[key] = why
            continue
        name = rename(rest)
        if name is None:
            unmapped.append(key)
            continue
        if name in res.weights:
            ctx.fail([f"{key!r} and {res.mapped[name]!r} both map to {name!r}"])
        res.weights[name] = np.array(ctx.state[key])  # a copy: never alias the caller's arrays
        res.mapped[name] = key
    if unmapped:
        ctx.fail([f"cannot map {k!r}: not a parameter of a {res.block} in {ctx.source} naming" for k in unmapped])


def _under(state, prefix: str, modules: set[str], sep: str = ".") -> dict[str, str]:
    """{rest: key} for keys ``prefix + rest`` whose first component is one of ``modules``."""
    out = {}
    for k in state:
        if k.startswith(prefix):
            rest = k[len(prefix) :]
            if rest.split(sep)[0] in modules:
                out[rest] = k
    return out


def _dims(ctx: _Ctx, key: str) -> int:
    nd = ctx.array(key).ndim - 2
    if nd not in (1, 2, 3):
        ctx.fail([f"{key!r} has shape {ctx.array(key).shape}: expected a 1D/2D/3D conv kernel (out, in, *k)"])
    return nd


# ----------------------------------------------------------------------------------------------
# non-local sources
# ----------------------------------------------------------------------------------------------


def _alexhex7(ctx: _Ctx, prefix):
    s = ctx.state
    found = sorted(
        set(_prefixes(s, "g.0.weight") + _prefixes(s, "g.weight"))
        & set(_prefixes(s, "W.0.weight") + _prefixes(s, "W.weight"))
    )
    p = _choose(ctx, found, prefix, "AlexHex7 non-local block (keys g[.0].weight and W[.0].weight)")
    sub = p + "g.0.weight" in s
    if (p + "phi.0.weight" in s and not sub) or (p + "phi.weight" in s and sub):
        ctx.fail(
            [f"g and phi disagree on sub-sampling (g{'.0' if sub else ''}.weight with phi{'' if sub else '.0'}.weight)"]
        )
    bn = p + "W.0.weight" in s
    g_key = p + ("g.0.weight" if sub else "g.weight")
    block = f"NonLocalBlock{_dims(ctx, g_key)}D"
    has_theta, has_concat = p + "theta.weight" in s, p + "concat_project.0.weight" in s
    if has_concat:
        mode = ctx.fact(block, "mode", "concatenation")
    elif not has_theta:
        mode = ctx.fact(block, "mode", "gaussian")
    else:
        mode = ctx.kw.get("mode", "embedded_gaussian")
        if mode not in ("embedded_gaussian", "dot_product"):
            raise ConfigError(
                f"{block}: keyword mode={mode!r} contradicts the checkpoint ({ctx.where}): "
                "it has theta/phi convs and no concat_project, so the mode is "
                "'embedded_gaussian' or 'dot_product'"
            )
    g = ctx.array(g_key)
    cfg = {
        "in_channels": ctx.fact(block, "in_channels", int(g.shape[1])),
        "inter_channels": ctx.fact(block, "inter_channels", int(g.shape[0])),
        "mode": mode,
        "sub_sample": ctx.fact(block, "sub_sample", sub),
        "bn_layer": ctx.fact(block, "bn_layer", bn),
        "pool_first": ctx.fact(block, "pool_first", False),
    }
    res = _Import(block, cfg)
    res.notes.append("AlexHex7 convention: max-pool after the phi/g convs, no softmax scale")
    if has_theta and not has_concat:
        res.notes.append(
            f"mode={mode!r}: embedded_gaussian and dot_product have the same weights, "
            "so the mode is not read from the keys (pass mode= if needed)"
        )

    def rename(rest):
        if "." not in rest:
            return None
        mod, *mid, leaf = rest.split(".")
        if mod in ("g", "phi") and mid == (["0"] if sub else []):
            return f"{mod}.{leaf}"
        if mod == "theta" and not mid:
            return rest
        if mod == "W" and mid == (["0"] if bn else []):
            return f"W.{leaf}"
        if mod == "W" and bn and mid == ["1"]:
            return f"bn.{leaf}"
        if mod == "concat_project" and mid == ["0"]:
            return f"concat_project.{leaf}"
        return None

    _map(ctx, res, _under(s, p, {"g", "theta", "phi", "W", "concat_project"}), rename)
    return res


#: Caffe2 blob suffix -> canonical name
_CAFFE2 = {
    "theta_w": "theta.weight",
    "theta_b": "theta.bias",
    "phi_w": "phi.weight",
    "phi_b": "phi.bias",
    "g_w": "g.weight",
    "g_b": "g.bias",
    "out_w": "W.weight",
    "out_b": "W.bias",
    "bn_s": "bn.weight",
    "bn_b": "bn.bias",
    "bn_rm": "bn.running_mean",
    "bn_riv": "bn.running_var",
}
CAFFE2_BN_EPS = 1.0000001e-5  # cfg.NONLOCAL.BN_EPSILON
CAFFE2_BN_MOMENTUM = 0.9  # cfg.NONLOCAL.BN_MOMENTUM, Caffe2 convention


def _caffe2(ctx: _Ctx, prefix, use_scale: bool = True):
    s = ctx.state
    found = [p.rstrip("_") for p in _prefixes(s, "theta_w", ("out_w",), sep="_")]
    p = _choose(
        ctx,
        found,
        None if prefix is None else prefix.rstrip("_"),
        "video-nonlocal-net block (blobs <prefix>_theta_w and <prefix>_out_w)",
        sep="",
    )
    keys = {k[len(p) + 1 :]: k for k in s if k.startswith(p + "_")}
    theta = ctx.array(p + "_theta_w")
    block = f"NonLocalBlock{_dims(ctx, p + '_theta_w')}D"
    ci = int(theta.shape[0])
    mode = ctx.kw.get("mode", "embedded_gaussian")
    if mode not in ("embedded_gaussian", "dot_product"):
        raise ConfigError(
            f"{block}: keyword mode={mode!r} contradicts the checkpoint ({ctx.where}): the "
            "Caffe2 block is 'embedded_gaussian' (USE_SOFTMAX) or 'dot_product'"
        )
    has_bn = p + "_bn_s" in s
    affine = has_bn and p + "_bn_rm" not in s and p + "_bn_riv" not in s
    cfg = {
        "in_channels": ctx.fact(block, "in_channels", int(theta.shape[1])),
        "inter_channels": ctx.fact(block, "inter_channels", ci),
        "pool_first": ctx.fact(block, "pool_first", True),
        "bn_layer": ctx.fact(block, "bn_layer", has_bn and not affine),
        "sub_sample": True,
        "mode": mode,
        "scale": ci**-0.5 if use_scale and mode == "embedded_gaussian" else None,
        "bn_eps": CAFFE2_BN_EPS,
        "bn_momentum": round(1.0 - CAFFE2_BN_MOMENTUM, 12),
    }
    res = _Import(block, cfg)
    res.notes += [
        "Caffe2 convention: x is max-pooled before the phi/g convs (pool_first=True)",
        f"softmax scale Ci^-1/2 = {ci}^-0.5 (USE_SCALE; pass use_scale=False or scale= to change)"
        if cfg["scale"] is not None
        else "no softmax scale",
        f"SpatialBN epsilon {CAFFE2_BN_EPS}, momentum {CAFFE2_BN_MOMENTUM} (Caffe2) = "
        f"{cfg['bn_momentum']} (PyTorch convention); '_riv' holds the running variance",
    ]

    def drop(rest):
        if rest.endswith("_momentum"):
            return "optimizer momentum (training state, not a weight)"
        return None

    _map(ctx, res, keys, _CAFFE2.get, drop)
    w = res.weights
    biases = ("theta.bias", "phi.bias", "g.bias", "W.bias")
    if not any(b in w for b in biases):  # NONLOCAL.NO_BIAS: the convs have no bias
        for b in biases:
            kernel = w.get(b[: -len("bias")] + "weight")
            if kernel is not None:
                w[b] = np.zeros(kernel.shape[0], kernel.dtype)
        res.notes.append("no conv biases in the blobs (NONLOCAL.NO_BIAS): zero biases filled in")
    if affine and {"W.weight", "W.bias", "bn.weight", "bn.bias"} <= set(w):
        # NONLOCAL.USE_AFFINE: a frozen per-channel affine y = s * out + b, folded into the out conv
        sc, sh = w.pop("bn.weight"), w.pop("bn.bias")
        del res.mapped["bn.weight"], res.mapped["bn.bias"]
        kernel = w["W.weight"]
        w["W.weight"] = (kernel * sc.reshape(-1, *([1] * (kernel.ndim - 1)))).astype(kernel.dtype)
        w["W.bias"] = (w["W.bias"] * sc + sh).astype(kernel.dtype)
        res.notes.append(
            f"affine-only {p}_bn_s/_bn_b (NONLOCAL.USE_AFFINE) folded into the out conv: "
            "W.weight = s * out_w, W.bias = s * out_b + b; bn_layer=False"
        )
    return res


def _timm(ctx: _Ctx, prefix, use_scale: bool = True):
    s = ctx.state
    p = _choose(
        ctx,
        _prefixes(s, "t.weight", ("p.weight", "g.weight", "z.weight")),
        prefix,
        "timm NonLocalAttn (keys t/p/g/z.weight)",
    )
    t = ctx.array(p + "t.weight")
    if t.ndim != 4:
        ctx.fail([f"{p}t.weight has shape {t.shape}: timm NonLocalAttn is 2D (4-D kernels)"])
    block = "NonLocalBlock2D"
    c = int(t.shape[1])
    cfg = {
        "in_channels": ctx.fact(block, "in_channels", c),
        "inter_channels": ctx.fact(block, "inter_channels", int(t.shape[0])),
        "sub_sample": ctx.fact(block, "sub_sample", False),
        "bn_layer": ctx.fact(block, "bn_layer", p + "norm.weight" in s),
        "mode": ctx.fact(block, "mode", "embedded_gaussian"),
        "scale": c**-0.5 if use_scale else None,
    }
    res = _Import(block, cfg)
    res.notes.append(
        f"timm convention: softmax scale in_channels^-1/2 = {c}^-0.5 (use_scale=True), no sub-sampling"
        if use_scale
        else "timm with use_scale=False: no softmax scale"
    )
    names = {"t": "theta", "p": "phi", "g": "g", "z": "W", "norm": "bn"}

    def rename(rest):
        mod, _, leaf = rest.partition(".")
        return f"{names[mod]}.{leaf}" if "." not in leaf else None

    _map(ctx, res, _under(s, p, set(names)), rename)
    return res


# ----------------------------------------------------------------------------------------------
# SAGAN / DANet / CCNet
# ----------------------------------------------------------------------------------------------

_QKV = {"query_conv", "key_conv", "value_conv", "gamma"}


def _qkv(ctx: _Ctx, p: str, block: str) -> _Import:
    q = ctx.array(p + "query_conv.weight")
    c, cq = int(q.shape[1]), int(q.shape[0])
    cfg = {"in_channels": ctx.fact(block, "in_channels", c), "qk_ratio": ctx.ratio(block, "qk_ratio", [(c, cq)])}
    res = _Import(block, cfg)
    _map(ctx, res, _under(ctx.state, p, _QKV), lambda rest: rest)
    return res


def _qkv_prefixes(s):
    return _prefixes(s, "query_conv.weight", ("key_conv.weight", "value_conv.weight"))


def _sagan(ctx: _Ctx, prefix):
    p = _choose(ctx, _qkv_prefixes(ctx.state), prefix, "SAGAN Self_Attn (keys query_conv/key_conv/value_conv)")
    return _qkv(ctx, p, "SelfAttention")


def _ccnet(ctx: _Ctx, prefix):
    p = _choose(
        ctx, _qkv_prefixes(ctx.state), prefix, "CCNet CrissCrossAttention (keys query_conv/key_conv/value_conv)"
    )
    res = _qkv(ctx, p, "CrissCrossAttention")
    if "recurrence" not in ctx.kw:
        res.notes.append(
            "recurrence is not stored in the weights: using recurrence=1 "
            "(CCNet's RCCA head runs the block twice: pass recurrence=2 for it)"
        )
    return res


def _danet(ctx: _Ctx, prefix):
    s = ctx.state
    pam = _qkv_prefixes(s)
    cam = [p for p in _prefixes(s, "gamma") if p not in pam and np.shape(s[p + "gamma"]) == (1,)]
    labels = {**{p: "PositionAttention" for p in pam}, **{p: "ChannelAttention" for p in cam}}
    p = _choose(ctx, sorted(labels), prefix, "DANet PAM_Module or CAM_Module", labels=labels)
    if labels[p] == "PositionAttention":
        return _qkv(ctx, p, "PositionAttention")
    res = _Import("ChannelAttention", {})
    _map(ctx, res, _under(s, p, {"gamma"}), lambda rest: rest)
    return res


# ----------------------------------------------------------------------------------------------
# RGA and EVC (canonical names under a prefix)
# ----------------------------------------------------------------------------------------------

_RGA = {f"{m}_{b}" for m in ("theta", "phi", "gx", "gg", "W") for b in ("spatial", "channel")}


def _rga(ctx: _Ctx, prefix):
    s = ctx.state
    found = sorted(set(_prefixes(s, "gx_spatial.0.weight")) | set(_prefixes(s, "gx_channel.0.weight")))
    p = _choose(ctx, found, prefix, "RGA_Module (keys gx_spatial/gx_channel)")
    block = "RelationAwareAttention"
    spatial, channel = p + "theta_spatial.0.weight" in s, p + "theta_channel.0.weight" in s
    if not (spatial or channel):
        ctx.fail([f"{p}: neither theta_spatial nor theta_channel weights"])

    def shape(name):
        key = p + name
        if key not in s:
            ctx.fail([f"missing {key!r}"])
        return tuple(int(d) for d in np.shape(s[key]))

    if spatial:
        ci, c = shape("theta_spatial.0.weight")[:2]
    else:
        ci, c2 = shape("gg_channel.0.weight")[:2]
        c = c2 // 2
    if channel:
        ni, n = shape("theta_channel.0.weight")[:2]
    else:
        ni, n2 = shape("gg_spatial.0.weight")[:2]
        n = n2 // 2
    size = ctx.kw.get("spatial_size")
    if size is None:
        raise ConfigError(
            f"{block}: spatial_size=(H, W) is not stored in the weights; pass it "
            f"({ctx.where}: the block was built for H*W = {n})"
        )
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and int(size[0]) * int(size[1]) == n):
        raise ConfigError(
            f"{block}: keyword spatial_size={size!r} contradicts the checkpoint ({ctx.where}), "
            f"whose convs mix H*W = {n} positions"
        )
    down = []
    if spatial:
        down.append((1 + ni, shape("W_spatial.0.weight")[0]))
    if channel:
        down.append((1 + ci, shape("W_channel.0.weight")[0]))
    cfg = {
        "in_channels": ctx.fact(block, "in_channels", c),
        "spatial_size": tuple(size),
        "use_spatial": ctx.fact(block, "use_spatial", spatial),
        "use_channel": ctx.fact(block, "use_channel", channel),
        "cha_ratio": ctx.ratio(block, "cha_ratio", [(c, ci)]),
        "spa_ratio": ctx.ratio(block, "spa_ratio", [(n, ni)]),
        "down_ratio": ctx.ratio(block, "down_ratio", down),
    }
    res = _Import(block, cfg)
    _map(ctx, res, _under(s, p, _RGA), lambda rest: rest)
    return res


_EVC = {"conv1", "bn1", "lvc", "l_MLP", "cnv1"}


#: CFPNet trains through YOLOX's Exp.get_model, whose init_yolo sets every nn.BatchNorm2d to
#: eps=1e-3, momentum=0.03 (cfp/exp/yolox_base.py); the encoding's BatchNorm1d keeps 1e-5 / 0.1
YOLOX_BN = {"bn_eps": 1e-3, "conv_block_bn_eps": 1e-3, "bn_momentum": 0.03}


def _cfpnet(ctx: _Ctx, prefix, yolox_bn: bool = True):
    s = ctx.state
    p = _choose(
        ctx,
        _prefixes(s, "lvc.LVC.3.codewords", ("cnv1.weight",)),
        prefix,
        "CFPNet EVCBlock (keys lvc.LVC.3.codewords and cnv1.weight)",
    )
    block = "ExplicitVisualCenter"
    c = int(np.shape(s[p + "cnv1.weight"])[0])
    fc1 = p + "l_MLP.mlp.fc1.weight"
    hidden = int(np.shape(s[fc1])[0]) if fc1 in s else 4 * c
    if hidden % c:
        ctx.fail([f"{fc1!r} has {hidden} outputs, not a multiple of in_channels={c}"])
    cfg = {
        "in_channels": ctx.fact(block, "in_channels", c),
        "num_codes": ctx.fact(block, "num_codes", int(np.shape(s[p + "lvc.LVC.3.codewords"])[0])),
        "mlp_ratio": ctx.fact(block, "mlp_ratio", hidden // c),
    }
    if yolox_bn:
        cfg.update(YOLOX_BN)
    res = _Import(block, cfg)
    if yolox_bn:
        res.notes.append(
            "BatchNorm conventions of a CFPNet (YOLOX) model, not stored in the weights: init_yolo "
            "sets every BatchNorm2d to eps=1e-3, momentum=0.03, so bn_eps=conv_block_bn_eps=1e-3, "
            "bn_momentum=0.03; the encoding's BatchNorm1d (lvc.LVC.4) keeps torch's eps=1e-5, "
            "momentum=0.1 (encoding_bn_eps, encoding_bn_momentum). Pass "
            "yolox_bn=False for a standalone EVCBlock (eps 1e-5, ConvBlock 1e-6)"
        )

    def drop(rest):
        if rest.startswith("l_MLP.linear."):
            return "LightMLPBlock.linear is defined but never used in EVCBlock.forward"
        return None

    _map(ctx, res, _under(s, p, _EVC), lambda rest: rest, drop)
    if any(k.startswith(p + "l_MLP.linear.") for k in res.dropped):
        res.notes.append("dropped l_MLP.linear.* (unused in the published forward)")
    return res


SOURCES: dict[str, Callable] = {
    "alexhex7": _alexhex7,
    "caffe2": _caffe2,
    "timm": _timm,
    "danet": _danet,
    "sagan": _sagan,
    "ccnet": _ccnet,
    "rga": _rga,
    "cfpnet": _cfpnet,
}
#: importer options that are not block config fields
_OPTIONS = {"caffe2": ("use_scale",), "timm": ("use_scale",), "cfpnet": ("yolox_bn",)}


def from_checkpoint(state_dict_or_path, source: str, *, prefix: str | None = None, **config) -> Checkpoint:
    """Import a published checkpoint as a canonical ``Checkpoint`` (block, config, weights).

    ``state_dict_or_path``: a dict of arrays/tensors (wrappers ``state_dict``/``model``/``blobs``
    are unwrapped) or a file (.safetensors, .pt/.pth, .pkl, .npz: all read safely).
    ``source``: one of ``SOURCES`` (see the module docstring for each one's conventions).
    ``prefix``: the block's key prefix inside a bigger state dict (e.g. ``'head.sa.'``).
    ``config``: constructor keywords the checkpoint cannot tell (e.g. ``mode``, ``recurrence``,
    ``spatial_size``) and the importer options ``use_scale`` (caffe2, timm: the softmax scale of
    the published code, default True) and ``yolox_bn`` (cfpnet: YOLOX BatchNorm eps/momentum,
    default True).
    """
    key = str(source).lower()
    if key not in SOURCES:
        raise ValueError(f"unknown checkpoint source {source!r}; known: {sorted(SOURCES)}")
    if isinstance(state_dict_or_path, (str, os.PathLike)):
        origin = repr(os.fspath(state_dict_or_path))
        state = read_state_dict(state_dict_or_path)
    elif isinstance(state_dict_or_path, Mapping):
        origin = "state dict"
        state = unwrap_state_dict(state_dict_or_path, "state dict")
    else:
        raise TypeError(f"from_checkpoint: expected a dict or a path, got {type(state_dict_or_path).__name__}")
    kw = dict(config)
    options = {k: kw.pop(k) for k in _OPTIONS.get(key, ()) if k in kw}
    ctx = _Ctx(key, state, kw, origin)
    res = SOURCES[key](ctx, prefix, **options)
    merged = {**res.config, **kw}
    if merged.get("spatial_size") is not None:
        merged["spatial_size"] = tuple(merged["spatial_size"])
    cfg = make_config(res.block, **merged)
    try:
        check_weights(cfg.block, cfg.schema(), res.weights)
    except WeightError as e:
        raise WeightError(f"{cfg.block} ({ctx.where})", [_annotate(msg, res.mapped) for msg in e.problems]) from None
    weights = {n: res.weights[n] for n in tensors(cfg.schema())}  # schema order
    return Checkpoint(
        cfg.block, cfg.to_dict(), weights, source=key, mapped=res.mapped, dropped=res.dropped, notes=res.notes
    )


def _annotate(message: str, mapped: dict) -> str:
    for name, src in mapped.items():
        if repr(name) in message and src != name:
            return message.replace(repr(name), f"{name!r} (from {src!r})", 1)
    return message
