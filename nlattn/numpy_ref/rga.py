"""Relation-aware global attention (Zhang et al. 2020): spatial (RGA-S) then channel (RGA-C)."""

from __future__ import annotations

import numpy as np

from ..specs import RelationAwareAttentionConfig
from ._common import defines, prepare
from ._ops import batch_norm, conv, relu, sigmoid


@defines("RelationAwareAttention")
def relation_aware_attention(x, weights, *, return_attention=False, training=False, stats=None, **config):
    """RGA on (B, C, H, W): sigmoid gates from relations, y = gate ⊙ x (no residual, no softmax).

    The attention returned is the relation matrix of the first branch used: the spatial
    relations (B, N, N) with use_spatial, else the channel relations (B, C, C).
    """
    cfg, ctx, x = prepare(RelationAwareAttentionConfig, x, weights, config, training, stats)
    L = cfg.layers()
    b, c, h, w = x.shape
    n = h * w

    def cbr(prefix, t):  # conv → BN → ReLU, as the module's nn.Sequential
        return relu(batch_norm(ctx, conv(ctx, t, L[f"{prefix}.0"]), L[f"{prefix}.1"]))

    def gate(prefix, t):  # cbr → conv → BN(1): the attention logit
        return batch_norm(ctx, conv(ctx, cbr(prefix, t), L[f"{prefix}.3"]), L[f"{prefix}.4"])

    relations = []
    if cfg.use_spatial:
        theta = cbr("theta_spatial", x).reshape(b, -1, n)
        phi = cbr("phi_spatial", x).reshape(b, -1, n)
        rel = np.einsum("bcn,bcm->bnm", theta, phi)  # r(i, j)
        # each position sees its relations to all (r(i, ·)) and from all (r(·, i)), as channels
        joint = np.concatenate([rel.transpose(0, 2, 1).reshape(b, n, h, w), rel.reshape(b, n, h, w)], 1)
        feat = np.concatenate([cbr("gx_spatial", x).mean(1, keepdims=True), cbr("gg_spatial", joint)], 1)
        x = sigmoid(gate("W_spatial", feat)) * x
        relations.append(rel)
    if cfg.use_channel:
        xc = x.reshape(b, c, n).transpose(0, 2, 1)[..., None]  # positions as channels (B, N, C, 1)
        theta = cbr("theta_channel", xc)[..., 0].transpose(0, 2, 1)
        phi = cbr("phi_channel", xc)[..., 0]
        rel = theta @ phi  # (B, C, C)
        joint = np.concatenate([rel.transpose(0, 2, 1)[..., None], rel[..., None]], 1)
        feat = np.concatenate([cbr("gx_channel", xc).mean(1, keepdims=True), cbr("gg_channel", joint)], 1)
        x = sigmoid(gate("W_channel", feat).transpose(0, 2, 1, 3)) * x
        relations.append(rel)
    return (x, relations[0]) if return_attention else x
