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
mmcv       OpenMMLab mmcv modules anywhere in a model (e.g. mmdet backbone plugins):
           ``NonLocal1d/2d/3d`` (ConvModules ``g.conv``, ``theta.conv``, ``phi.conv``, ``conv_out.conv``
           + ``conv_out.bn``; with sub_sample ``g.0.conv`` / ``phi.0.conv``, pooled after the conv;
           ``concat_project.conv``), ``use_scale=True`` by default (embedded_gaussian: Ci^-1/2);
           ``ContextBlock`` (``conv_mask``, ``channel_add_conv`` / ``channel_mul_conv`` .0/.1/.3,
           C' = int(C·ratio), LayerNorm (C', 1, 1)); ``CrissCrossAttention`` (``gamma.scale``, a
           0-d ``Scale``); mmseg's ``DisentangledNonLocal2d`` (a NonLocal2d + ``conv_mask``).
           ConvModule's ``bias='auto'`` leaves ``conv_out.conv`` without bias under a norm: zero
           bias filled in.
mmseg      whole mmsegmentation segmentors: the block of a decode head, found by its attribute
           (``nl_block`` NLHead, ``pam`` / ``cam`` DAHead, ``cca`` CCHead, ``gc_block`` GCHead,
           ``dnl_block`` DNLHead), mapped as ``mmcv``; DAHead's PAM has plain 1×1 ``query_project`` /
           ``key_project`` / ``value_project`` (``.conv`` if ConvModules) and ``gamma.scale``;
           CCHead runs its block twice: recurrence=2 unless given; DNLHead's temperature is 0.05.
=========  =====================================================================================

timm also reads ``GlobalContext`` (``conv_attn``, ``mlp_add`` / ``mlp_scale`` ConvMlps ``fc1``,
``norm`` (LayerNorm2d, eps 1e-6), ``fc2``): ``prefix=`` picks one block when a model has several.

Weight normalisation: a conv stored as torch's ``parametrizations.weight_norm`` (``<conv>.
parametrizations.weight.original0`` = g, ``.original1`` = v) or the legacy ``weight_norm``
(``<conv>.weight_g``, ``<conv>.weight_v``), dim=0, is read under any source. A non-local block whose
θ, φ, g and W are all weight-normalised imports as ``weight_norm=True`` (g and v kept, the legacy
names renamed); with ``weight_norm=False``, or for a block without the option, or when only some
of its convs are normalised, each kernel is folded to g·v/‖v‖, computed in float64 and kept in
float64 (the exact kernel the normalised conv computes; a framework rounds it once when loading).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from ..errors import ConfigError, WeightError
from ..specs import (
    WEIGHT_NORM_G,
    WEIGHT_NORM_V,
    Conv,
    check_weights,
    config_class,
    make_config,
    tensors,
    weight_norm_kernel,
)
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


def _non_local_mode(ctx: _Ctx, block: str, has_theta: bool, has_concat: bool) -> str:
    """The non-local mode a checkpoint's modules imply: concat_project means concatenation, no
    θ/φ means gaussian; θ/φ alone is embedded_gaussian or dot_product (the weights cannot tell:
    the ``mode`` keyword picks, default embedded_gaussian)."""
    if has_concat:
        return ctx.fact(block, "mode", "concatenation")
    if not has_theta:
        return ctx.fact(block, "mode", "gaussian")
    mode = ctx.kw.get("mode", "embedded_gaussian")
    if mode not in ("embedded_gaussian", "dot_product"):
        raise ConfigError(
            f"{block}: keyword mode={mode!r} contradicts the checkpoint ({ctx.where}): it has "
            "theta/phi convs and no concat_project, so the mode is 'embedded_gaussian' or 'dot_product'"
        )
    return mode


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
    mode = _non_local_mode(ctx, block, has_theta, has_concat)
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
    labels = dict.fromkeys(_prefixes(s, "t.weight", ("p.weight", "g.weight", "z.weight")), "NonLocalAttn")
    for anchor in ("mlp_add.fc1.weight", "mlp_scale.fc1.weight"):
        labels.update(dict.fromkeys(_prefixes(s, anchor, (anchor.replace("fc1", "fc2"),)), "GlobalContext"))
    p = _choose(
        ctx,
        sorted(labels),
        prefix,
        "timm NonLocalAttn or GlobalContext (keys t/p/g/z or mlp_add/mlp_scale)",
        labels=labels,
    )
    if labels[p] == "GlobalContext":
        return _context_block(ctx, p, "timm")
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


# ----------------------------------------------------------------------------------------------
# OpenMMLab (mmcv modules, mmsegmentation heads) and timm's GlobalContext
# ----------------------------------------------------------------------------------------------

_NL_MODULES = {"g", "theta", "phi", "concat_project", "conv_out", "conv_mask"}


def _gamma(res: _Import) -> None:
    """mmcv's ``Scale`` holds a 0-d ``scale``: the canonical gate has shape (1,)."""
    if np.size(res.weights.get("gamma", ())) == 1:
        res.weights["gamma"] = res.weights["gamma"].reshape(1)


def _mmcv_nonlocal(ctx: _Ctx, p: str, use_scale: bool = True) -> _Import:
    """mmcv ``NonLocal{1,2,3}d`` (and mmseg's ``DisentangledNonLocal2d``, which adds ``conv_mask``)."""
    s = ctx.state
    sub = p + "g.0.conv.weight" in s
    g_key = p + ("g.0.conv.weight" if sub else "g.conv.weight")
    nd = _dims(ctx, g_key)
    disentangled = p + "conv_mask.weight" in s
    has_theta, has_concat = p + "theta.conv.weight" in s, p + "concat_project.conv.weight" in s
    if has_theta and ((p + "phi.0.conv.weight" in s) != sub):
        ctx.fail([f"{p}g and {p}phi disagree on sub-sampling (g{'.0' if sub else ''}.conv with the other phi)"])
    norms = sorted({k[len(p) :].split(".")[1] for k in s if k.startswith(p + "conv_out.")} - {"conv"})
    if norms not in ([], ["bn"]):
        ctx.fail([f"{p}conv_out.{norms[0]}: only a BatchNorm (ConvModule name 'bn') has an nlattn equivalent"])
    bn = norms == ["bn"]
    g = ctx.array(g_key)
    if disentangled:
        block = f"DisentangledNonLocal{nd}D"
        if sub or not has_theta or has_concat:
            ctx.fail([f"{p}: a disentangled non-local block is embedded-Gaussian without sub-sampling"])
        cfg = {
            "in_channels": ctx.fact(block, "in_channels", int(g.shape[1])),
            "inter_channels": ctx.fact(block, "inter_channels", int(g.shape[0])),
            "use_scale": use_scale,
            "bn_layer": ctx.fact(block, "bn_layer", bn),
        }
        res = _Import(block, cfg)
        res.notes.append(
            "mmseg DisentangledNonLocal2d: embedded_gaussian, whitened θ/φ, temperature "
            f"{ctx.kw.get('temperature', 0.05)} (DNLHead's default 0.05: pass temperature= if the head had another), "
            + ("scale Ci^-1/2 (use_scale=True)" if use_scale else "no Ci^-1/2 scale (use_scale=False)")
        )
    else:
        block = f"NonLocalBlock{nd}D"
        mode = _non_local_mode(ctx, block, has_theta, has_concat)
        ci = int(g.shape[0])
        scaled = use_scale and mode == "embedded_gaussian"
        cfg = {
            "in_channels": ctx.fact(block, "in_channels", int(g.shape[1])),
            "inter_channels": ctx.fact(block, "inter_channels", ci),
            "mode": mode,
            "sub_sample": ctx.fact(block, "sub_sample", sub),
            "bn_layer": ctx.fact(block, "bn_layer", bn),
            "pool_first": ctx.fact(block, "pool_first", False),
            "scale": ci**-0.5 if scaled else None,
        }
        res = _Import(block, cfg)
        res.notes.append(
            "mmcv convention: max-pool after the phi/g convs; "
            + (f"softmax scale Ci^-1/2 = {ci}^-0.5 (use_scale=True)" if scaled else "no softmax scale")
        )
        if has_theta and not has_concat:
            res.notes.append(f"mode={mode!r}: not stored in the weights (pass mode='dot_product' if it was)")

    def rename(rest):
        mod, *mid, leaf = rest.split(".")
        if mod in ("g", "phi") and mid == (["0", "conv"] if sub else ["conv"]):
            return f"{mod}.{leaf}"
        if mod in ("theta", "concat_project") and mid == ["conv"]:
            return f"{mod}.{leaf}"
        if mod == "conv_out" and mid == ["conv"]:
            return f"W.{leaf}"
        if mod == "conv_out" and mid == ["bn"]:
            return f"bn.{leaf}"
        if mod == "conv_mask" and not mid:
            return rest
        return None

    _map(ctx, res, _under(s, p, _NL_MODULES), rename)
    if bn and "W.weight" in res.weights and "W.bias" not in res.weights:
        kernel = res.weights["W.weight"]
        res.weights["W.bias"] = np.zeros(kernel.shape[0], kernel.dtype)
        res.notes.append("conv_out.conv has no bias under its norm (ConvModule bias='auto'): zero W.bias filled in")
    return res


def _mmcv_cca(ctx: _Ctx, p: str, recurrence: int = 1, head: str = "mmcv CrissCrossAttention") -> _Import:
    block = "CrissCrossAttention"
    q = ctx.array(p + "query_conv.weight")
    c, cq = int(q.shape[1]), int(q.shape[0])
    cfg = {"in_channels": ctx.fact(block, "in_channels", c), "qk_ratio": ctx.ratio(block, "qk_ratio", [(c, cq)])}
    if "recurrence" not in ctx.kw:
        cfg["recurrence"] = recurrence
        res = _Import(block, cfg)
        res.notes.append(f"recurrence is not stored in the weights: {recurrence} ({head}); pass recurrence= to change")
    else:
        res = _Import(block, cfg)
    _map(ctx, res, _under(ctx.state, p, _QKV), lambda rest: "gamma" if rest == "gamma.scale" else rest)
    _gamma(res)
    return res


_PROJECT = {"query_project": "query_conv", "key_project": "key_conv", "value_project": "value_conv"}


def _mmseg_pam(ctx: _Ctx, p: str) -> _Import:
    """DAHead's PAM: mmseg's SelfAttentionBlock with plain 1×1 projections, no out projection."""
    s = ctx.state
    block = "PositionAttention"
    mid = "" if p + "query_project.weight" in s else "conv."
    q = ctx.array(f"{p}query_project.{mid}weight")
    c, cq = int(q.shape[1]), int(q.shape[0])
    cfg = {"in_channels": ctx.fact(block, "in_channels", c), "qk_ratio": ctx.ratio(block, "qk_ratio", [(c, cq)])}
    res = _Import(block, cfg)
    res.notes.append("mmseg PAM: no matmul_norm (no softmax scale), value_project C -> C, no out_project")

    def rename(rest):
        if rest == "gamma.scale":
            return "gamma"
        mod, _, leaf = rest.partition(".")
        ok = mod in _PROJECT and leaf.startswith(mid) and "." not in leaf[len(mid) :]
        return f"{_PROJECT[mod]}.{leaf[len(mid) :]}" if ok else None

    _map(ctx, res, _under(s, p, {*_PROJECT, "gamma", "out_project"}), rename)
    _gamma(res)
    return res


def _mmseg_cam(ctx: _Ctx, p: str) -> _Import:
    res = _Import("ChannelAttention", {})
    _map(ctx, res, _under(ctx.state, p, {"gamma"}), lambda rest: "gamma" if rest == "gamma.scale" else None)
    _gamma(res)
    return res


def _context_block(ctx: _Ctx, p: str, flavour: str) -> _Import:
    """mmcv ``ContextBlock`` or timm ``GlobalContext`` -> GlobalContext (mmcv's names)."""
    s = ctx.state
    block = "GlobalContext"
    if flavour == "timm":
        names = {"conv_attn": "conv_mask", "mlp_add": "channel_add_conv", "mlp_scale": "channel_mul_conv"}
        layers = {"fc1": "0", "norm": "1", "fc2": "3"}
        mask, add, mul = (p + k for k in ("conv_attn.weight", "mlp_add.fc1.weight", "mlp_scale.fc1.weight"))
    else:
        names = {m: m for m in ("conv_mask", "channel_add_conv", "channel_mul_conv")}
        layers = {i: i for i in ("0", "1", "3")}
        mask, add, mul = (p + k for k in ("conv_mask.weight", "channel_add_conv.0.weight", "channel_mul_conv.0.weight"))
    first = ctx.array(add if add in s else mul)
    if first.ndim != 4:
        ctx.fail([f"{add if add in s else mul} has shape {first.shape}: expected a 2D conv kernel"])
    cfg = {
        "in_channels": ctx.fact(block, "in_channels", int(first.shape[1])),
        "inter_channels": ctx.fact(block, "inter_channels", int(first.shape[0])),
        "pooling_type": ctx.fact(block, "pooling_type", "att" if mask in s else "avg"),
        "channel_add": ctx.fact(block, "channel_add", add in s),
        "channel_mul": ctx.fact(block, "channel_mul", mul in s),
    }
    if flavour == "timm":
        cfg.update(rounding="timm", ln_eps=1e-6, zero_init_last=False)
    res = _Import(block, cfg)
    res.notes.append(
        "timm GlobalContext: LayerNorm2d eps 1e-6, ReLU and sigmoid gate (timm's defaults), mlp_scale = channel_mul"
        if flavour == "timm"
        else "mmcv ContextBlock: LayerNorm([C', 1, 1]) eps 1e-5, its (C', 1, 1) affine weights flattened"
    )

    def rename(rest):
        mod, _, tail = rest.partition(".")
        if mod not in names:
            return None
        if names[mod] == "conv_mask":
            return f"conv_mask.{tail}" if "." not in tail else None
        layer, _, leaf = tail.partition(".")
        return f"{names[mod]}.{layers[layer]}.{leaf}" if layer in layers and "." not in leaf else None

    _map(ctx, res, _under(s, p, set(names)), rename)
    for name, value in res.weights.items():
        if name.endswith(".1.weight") or name.endswith(".1.bias"):
            res.weights[name] = value.reshape(-1) if value.ndim == 3 and value.shape[1:] == (1, 1) else value
    return res


def _openmmlab_blocks(s) -> dict[str, str]:
    """{prefix: kind} of every mmcv / mmseg attention block in a state dict, found by its keys."""
    found: dict[str, str] = {}
    for anchor in ("g.conv.weight", "g.0.conv.weight"):
        for p in _prefixes(s, anchor, ("conv_out.conv.weight",)):
            found[p] = "dnl" if p + "conv_mask.weight" in s else "nonlocal"
    for anchor in ("channel_add_conv.0.weight", "channel_mul_conv.0.weight"):
        found.update(dict.fromkeys(_prefixes(s, anchor), "context"))
    for p in _qkv_prefixes(s):
        if p + "gamma.scale" in s or p + "gamma" in s:
            found[p] = "cca"
    for mid in ("", "conv."):
        for p in _prefixes(s, f"query_project.{mid}weight", (f"key_project.{mid}weight", "gamma.scale")):
            found[p] = "pam"
    for p in _prefixes(s, "gamma.scale"):
        if p not in found and not any(k.startswith(p) and k != p + "gamma.scale" for k in s):
            found[p] = "cam"
    return found


_OPENMMLAB_BLOCK = {
    "nonlocal": "NonLocalBlock",
    "dnl": "DisentangledNonLocal",
    "context": "GlobalContext",
    "cca": "CrissCrossAttention",
    "pam": "PositionAttention",
    "cam": "ChannelAttention",
}


def _openmmlab(ctx: _Ctx, p: str, kind: str, use_scale: bool, head: str | None = None) -> _Import:
    if kind in ("nonlocal", "dnl"):
        return _mmcv_nonlocal(ctx, p, use_scale)
    if kind == "context":
        return _context_block(ctx, p, "mmcv")
    if kind == "cca":
        return _mmcv_cca(ctx, p, *((2, "mmseg CCHead runs it twice") if head == "cca" else (1, "mmcv's forward")))
    return _mmseg_pam(ctx, p) if kind == "pam" else _mmseg_cam(ctx, p)


def _mmcv(ctx: _Ctx, prefix, use_scale: bool = True):
    found = {p: k for p, k in _openmmlab_blocks(ctx.state).items() if k not in ("pam", "cam")}
    labels = {p: _OPENMMLAB_BLOCK[k] for p, k in found.items()}
    p = _choose(ctx, sorted(found), prefix, "mmcv NonLocal, ContextBlock or CrissCrossAttention", labels=labels)
    return _openmmlab(ctx, p, found[p], use_scale)


#: mmseg decode heads: the attribute that holds the attention block
_MMSEG_HEADS = {
    "nl_block": "nonlocal",
    "pam": "pam",
    "cam": "cam",
    "cca": "cca",
    "gc_block": "context",
    "dnl_block": "dnl",
}


def _mmseg(ctx: _Ctx, prefix, use_scale: bool = True):
    found = {
        p: k
        for p, k in _openmmlab_blocks(ctx.state).items()
        if p.rstrip(".").rpartition(".")[2] in _MMSEG_HEADS and _MMSEG_HEADS[p.rstrip(".").rpartition(".")[2]] == k
    }
    labels = {p: _OPENMMLAB_BLOCK[k] for p, k in found.items()}
    p = _choose(
        ctx,
        sorted(found),
        prefix,
        "mmseg head block (decode_head.nl_block, .pam, .cam, .cca, .gc_block or .dnl_block)",
        labels=labels,
    )
    return _openmmlab(ctx, p, found[p], use_scale, head=p.rstrip(".").rpartition(".")[2])


SOURCES: dict[str, Callable] = {
    "alexhex7": _alexhex7,
    "caffe2": _caffe2,
    "timm": _timm,
    "danet": _danet,
    "sagan": _sagan,
    "ccnet": _ccnet,
    "rga": _rga,
    "cfpnet": _cfpnet,
    "mmcv": _mmcv,
    "mmseg": _mmseg,
}
#: importer options that are not block config fields
_OPTIONS = {
    "caffe2": ("use_scale",),
    "timm": ("use_scale",),
    "cfpnet": ("yolox_bn",),
    "mmcv": ("use_scale",),
    "mmseg": ("use_scale",),
}


def from_checkpoint(state_dict_or_path, source: str, *, prefix: str | None = None, **config) -> Checkpoint:
    """Import a published checkpoint as a canonical ``Checkpoint`` (block, config, weights).

    ``state_dict_or_path``: a dict of arrays/tensors (wrappers ``state_dict``/``model``/``blobs``
    are unwrapped) or a file (.safetensors, .pt/.pth, .pkl, .npz: all read safely).
    ``source``: one of ``SOURCES`` (see the module docstring for each one's conventions).
    ``prefix``: the block's key prefix inside a bigger state dict (e.g. ``'head.sa.'``).
    ``config``: constructor keywords the checkpoint cannot tell (e.g. ``mode``, ``recurrence``,
    ``spatial_size``, ``weight_norm``) and the importer options ``use_scale`` (caffe2, timm, mmcv,
    mmseg: the softmax scale of the published code, default True) and ``yolox_bn`` (cfpnet: YOLOX
    BatchNorm eps/momentum, default True).
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
    state, normalised = _weight_norm_view(state, origin, key)
    ctx = _Ctx(key, state, kw, origin)
    res = SOURCES[key](ctx, prefix, **options)
    _weight_norm(ctx, res, normalised)
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


_WN_LAYOUTS = {  # torch's two weight_norm layouts: (g suffix, v suffix)
    "parametrizations.weight_norm": (f".{WEIGHT_NORM_G}", f".{WEIGHT_NORM_V}"),
    "legacy weight_norm": (".weight_g", ".weight_v"),
}


def _weight_norm_view(state: dict, origin: str, source: str) -> tuple[dict, dict]:
    """The state dict with each weight-normalised conv's (g, v) pair shown as ``<conv>.weight`` = v,
    so that every importer finds and maps it as a plain conv; and {that key: (g key, v key, g)}."""
    view, pairs = dict(state), {}
    for gs, vs in _WN_LAYOUTS.values():
        for v_key in [k for k in state if k.endswith(vs)]:
            conv, g_key = v_key[: -len(vs)], v_key[: -len(vs)] + gs
            if g_key not in state:
                continue  # a lone half: left for the importer to report as unmappable
            where = f"from_checkpoint({origin}, source={source!r})"
            v, g = np.shape(state[v_key]), np.shape(state[g_key])
            if len(v) < 2 or int(np.prod(g)) != v[0] or (len(g) > 1 and g[1:] != (1,) * (len(v) - 1)):
                raise WeightError(where, [f"{g_key!r} has shape {g}: weight norm over dim 0 of {v_key!r} {v} expected"])
            if conv + ".weight" in state:
                raise WeightError(where, [f"{conv}.weight and the weight-norm pair {g_key!r}, {v_key!r} both given"])
            del view[v_key], view[g_key]
            view[conv + ".weight"] = state[v_key]
            pairs[conv + ".weight"] = (g_key, v_key, state[g_key])
    return view, pairs


def _weight_norm(ctx: _Ctx, res: _Import, pairs: dict) -> None:
    """Give the block's weight-normalised convs their canonical g and v (``weight_norm=True``), or
    fold them to g·v/‖v‖ (float64) where the block is not, cannot be, or is only partly normalised."""
    normalised = {name[: -len(".weight")]: pairs[src] for name, src in res.mapped.items() if src in pairs}
    fields = set(config_class(res.block).__dataclass_fields__)
    wanted = ctx.kw.get("weight_norm")
    if "weight_norm" in fields:
        wrapped = {
            layer.prefix
            for layer in make_config(res.block, **{**res.config, **ctx.kw, "weight_norm": True}).schema()
            if isinstance(layer, Conv) and layer.weight_norm
        }
        whole = bool(normalised) and set(normalised) == wrapped
        if wanted and not whole:
            have = f"only {sorted(normalised)} are" if normalised else "no conv is"
            raise ConfigError(
                f"{res.block}: keyword weight_norm=True contradicts the checkpoint ({ctx.where}): "
                f"{have} weight-normalised, weight_norm=True normalises {sorted(wrapped)}"
            )
        res.config["weight_norm"] = whole and wanted is not False
    keep = res.config.get("weight_norm", False)
    for conv, (g_key, v_key, g) in normalised.items():
        v = res.weights.pop(f"{conv}.weight")
        del res.mapped[f"{conv}.weight"]
        g = np.array(g)  # a copy: never alias the caller's arrays
        if keep:
            res.weights[f"{conv}.{WEIGHT_NORM_G}"] = g.reshape(v.shape[0], *(1,) * (v.ndim - 1))
            res.weights[f"{conv}.{WEIGHT_NORM_V}"] = v
            res.mapped[f"{conv}.{WEIGHT_NORM_G}"], res.mapped[f"{conv}.{WEIGHT_NORM_V}"] = g_key, v_key
        else:
            res.weights[f"{conv}.weight"] = weight_norm_kernel(g, v)
            res.mapped[f"{conv}.weight"] = v_key
    if normalised:
        res.notes.append(
            f"weight-normalised convs {sorted(normalised)} kept as g and v (weight_norm=True)"
            if keep
            else f"weight-normalised convs {sorted(normalised)} folded to float64 kernels g·v/‖v‖"
        )


def _annotate(message: str, mapped: dict) -> str:
    for name, src in mapped.items():
        if repr(name) in message and src != name:
            return message.replace(repr(name), f"{name!r} (from {src!r})", 1)
    return message
