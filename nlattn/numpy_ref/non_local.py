"""Non-local block (Wang et al. 2018) in all four modes, 1D/2D/3D."""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..specs import NonLocalBlock1DConfig, NonLocalBlock2DConfig, NonLocalBlock3DConfig
from ._common import defines, prepare
from ._ops import batch_norm, conv, max_pool, relu, softmax

_CONFIGS = {1: NonLocalBlock1DConfig, 2: NonLocalBlock2DConfig, 3: NonLocalBlock3DConfig}


def non_local(x, weights, *, return_attention=False, training=False, stats=None, **config):
    """Non-local block on x (B, C, *S) with 1 to 3 spatial axes; returns x + BN(W(A g)).

    A is (B, N, M) (or (B, heads, N, M)): N query positions, M key positions after sub-sampling.
    """
    nd = np.ndim(x) - 2
    if nd not in _CONFIGS:
        raise InputError(f"NonLocalBlock: expected a rank-3, -4 or -5 input (B, C, *S), got shape {np.shape(x)}")
    cfg, ctx, x = prepare(_CONFIGS[nd], x, weights, config, training, stats)
    L = cfg.layers()
    b, c, *spatial = x.shape
    pool = (lambda t: max_pool(t, cfg.pool_window)) if cfg.sub_sample else (lambda t: t)

    def embed(layer):  # conv then pool (AlexHex7), or pool then conv (Caffe2)
        return conv(ctx, pool(x), layer) if cfg.pool_first else pool(conv(ctx, x, layer))

    if cfg.mode == "gaussian":
        theta, phi = x, pool(x)
    else:
        theta = conv(ctx, x, L["theta"])
        phi = embed(L["theta"] if cfg.share_query_key else L["phi"])
    g = embed(L["g"])

    h = cfg.num_heads
    theta = theta.reshape(b, h, -1, int(np.prod(spatial)))  # (B, h, Ck/h, N)
    phi = phi.reshape(b, h, theta.shape[2], -1)  # (B, h, Ck/h, M)
    g = g.reshape(b, h, -1, phi.shape[-1])  # (B, h, Cv/h, M)
    m = phi.shape[-1]

    if cfg.mode == "concatenation":
        # ReLU(w·[θᵢ; φⱼ]) splits into a per-query and a per-key term
        w = ctx["concat_project.weight"].reshape(-1)
        ci = theta.shape[2]
        a = np.einsum("c,bhcn->bhn", w[:ci], theta)
        k = np.einsum("c,bhcm->bhm", w[ci:], phi)
        attn = relu(a[..., :, None] + k[..., None, :]) / m
    else:
        f = np.einsum("bhcn,bhcm->bhnm", theta, phi)
        if cfg.scale is not None:
            f = f * cfg.scale
        attn = softmax(f, -1) if cfg.mode in ("embedded_gaussian", "gaussian") else f / m

    y = np.einsum("bhnm,bhcm->bhcn", attn, g).reshape(b, -1, *spatial)
    z = conv(ctx, y, L["W"])
    if cfg.bn_layer:
        z = batch_norm(ctx, z, L["bn"])
    out = z + x
    if return_attention:
        return out, (attn[:, 0] if h == 1 else attn)
    return out


@defines("NonLocalBlock1D")
def non_local_1d(x, weights, **kw):
    """Non-local block on (B, C, L)."""
    _expect_rank(x, 3, "NonLocalBlock1D")
    return non_local(x, weights, **kw)


@defines("NonLocalBlock2D")
def non_local_2d(x, weights, **kw):
    """Non-local block on (B, C, H, W)."""
    _expect_rank(x, 4, "NonLocalBlock2D")
    return non_local(x, weights, **kw)


@defines("NonLocalBlock3D")
def non_local_3d(x, weights, **kw):
    """Non-local block on (B, C, T, H, W); sub-sampling pools (1, 2, 2)."""
    _expect_rank(x, 5, "NonLocalBlock3D")
    return non_local(x, weights, **kw)


def _expect_rank(x, rank, block):
    if np.ndim(x) != rank:
        raise InputError(f"{block}: expected a rank-{rank} input, got shape {np.shape(x)}")
