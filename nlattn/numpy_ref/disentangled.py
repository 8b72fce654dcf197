"""Disentangled non-local block (Yin et al. 2020): a whitened pairwise term and a unary term, 1D/2D/3D."""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..specs import DisentangledNonLocal1DConfig, DisentangledNonLocal2DConfig, DisentangledNonLocal3DConfig
from ._common import defines, prepare
from ._ops import Context, batch_norm, conv, softmax

_CONFIGS = {1: DisentangledNonLocal1DConfig, 2: DisentangledNonLocal2DConfig, 3: DisentangledNonLocal3DConfig}


def disentangled_non_local(x, weights, *, return_attention=False, training=False, stats=None, **config):
    """Disentangled non-local block on x (B, C, *S); returns x + BN(W(A g)) + BN(W(u)).

    A (B, N, N) = softmax_j((θᵢ − θ̄)·(φⱼ − φ̄) / (√Ci if use_scale) / temperature), θ̄, φ̄ the
    means over the N positions; u = Σⱼ mⱼ gⱼ with m = softmax over positions of ``conv_mask``,
    broadcast over positions. W and BN are the same layers for both terms (the published code's
    ``conv_out``): in training each term is normalised by its own batch statistics, and the
    running statistics are updated twice, with A g's, then with u's.
    """
    nd = np.ndim(x) - 2
    if nd not in _CONFIGS:
        raise InputError(f"DisentangledNonLocal: expected a rank-3, -4 or -5 input (B, C, *S), got shape {np.shape(x)}")
    cfg, ctx, x = prepare(_CONFIGS[nd], x, weights, config, training, stats)
    L = cfg.layers()
    b, c, *spatial = x.shape
    n = int(np.prod(spatial))

    def embed(name):  # (B, Ci or 1, N)
        t = conv(ctx, x, L[name])
        return t.reshape(b, t.shape[1], n)

    theta, phi, g = embed("theta"), embed("phi"), embed("g")
    # whitening: subtract the means over positions (the published code: θ -= θ.mean, φ -= φ.mean)
    theta = theta - theta.mean(axis=-1, keepdims=True)
    phi = phi - phi.mean(axis=-1, keepdims=True)
    e = np.einsum("bcn,bcm->bnm", theta, phi)
    if cfg.use_scale:
        e = e / cfg.inter**0.5
    attn = softmax(e / cfg.temperature, -1)  # (B, N, N)
    y = np.einsum("bnm,bcm->bcn", attn, g).reshape(b, cfg.inter, *spatial)

    unary = softmax(embed("conv_mask")[:, 0], -1)  # (B, N)
    u = np.einsum("bn,bcn->bc", unary, g).reshape(b, cfg.inter, *([1] * nd))  # (B, Ci, 1, ...)

    z_pair = conv(ctx, y, L["W"])
    z_unary = conv(ctx, u, L["W"])
    if cfg.bn_layer:
        z_pair = batch_norm(ctx, z_pair, L["bn"])
        if ctx.training and ctx.stats is not None:  # the second call starts from the first's update
            ctx = Context({**ctx.weights, **ctx.stats.updates}, training=True, stats=ctx.stats)
        z_unary = batch_norm(ctx, z_unary, L["bn"])
    out = x + z_pair + z_unary
    return (out, attn) if return_attention else out


@defines("DisentangledNonLocal1D")
def disentangled_non_local_1d(x, weights, **kw):
    """Disentangled non-local block on (B, C, L)."""
    _expect_rank(x, 3, "DisentangledNonLocal1D")
    return disentangled_non_local(x, weights, **kw)


@defines("DisentangledNonLocal2D")
def disentangled_non_local_2d(x, weights, **kw):
    """Disentangled non-local block on (B, C, H, W)."""
    _expect_rank(x, 4, "DisentangledNonLocal2D")
    return disentangled_non_local(x, weights, **kw)


@defines("DisentangledNonLocal3D")
def disentangled_non_local_3d(x, weights, **kw):
    """Disentangled non-local block on (B, C, T, H, W)."""
    _expect_rank(x, 5, "DisentangledNonLocal3D")
    return disentangled_non_local(x, weights, **kw)


def _expect_rank(x, rank, block):
    if np.ndim(x) != rank:
        raise InputError(f"{block}: expected a rank-{rank} input, got shape {np.shape(x)}")
