"""GCNet global context block (Cao et al. 2019): one query-independent context per image."""

from __future__ import annotations

import numpy as np

from ..specs import GlobalContextConfig
from ._common import defines, prepare
from ._ops import conv, group_norm, relu, sigmoid, softmax


@defines("GlobalContext")
def global_context(x, weights, *, return_attention=False, training=False, stats=None, **config):
    """Global context block on x (B, C, H, W); returns x·σ(T_mul(c)) + T_add(c).

    c (B, C, 1, 1) is x pooled over the N = H·W positions: by a = softmax over positions of
    ``conv_mask`` (attention pooling), or by the mean (average pooling). Each transform T is
    conv → LayerNorm over (C', 1, 1) → ReLU → conv. The attention map is a (B, N), one row of
    pooling weights per image (1/N everywhere for average pooling). No batch statistics:
    ``training`` changes nothing.
    """
    cfg, ctx, x = prepare(GlobalContextConfig, x, weights, config, training, stats)
    L = cfg.layers()
    b, c, h, w = x.shape
    if cfg.pooling_type == "att":
        a = softmax(conv(ctx, x, L["conv_mask"]).reshape(b, h * w), -1)  # (B, N)
        context = np.einsum("bcn,bn->bc", x.reshape(b, c, h * w), a)
    else:
        a = np.full((b, h * w), 1.0 / (h * w))
        context = x.mean(axis=(2, 3))
    context = context.reshape(b, c, 1, 1)

    def transform(prefix):  # conv C→C', LayerNorm over (C', 1, 1), ReLU, conv C'→C
        t = group_norm(ctx, conv(ctx, context, L[f"{prefix}.0"]), L[f"{prefix}.1"])
        return conv(ctx, relu(t), L[f"{prefix}.3"])

    out = x
    if cfg.channel_mul:
        out = out * sigmoid(transform("channel_mul_conv"))
    if cfg.channel_add:
        out = out + transform("channel_add_conv")
    return (out, a) if return_attention else out
