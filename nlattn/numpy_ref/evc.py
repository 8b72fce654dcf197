"""Explicit visual center (CFPNet): stem, LVC codebook branch and LightMLP branch, fused by 1×1 conv."""

from __future__ import annotations

import numpy as np

from ..specs import ExplicitVisualCenterConfig
from ._common import defines, prepare
from ._ops import batch_norm, conv, dense, gelu, group_norm, max_pool, relu, sigmoid, silu, softmax


@defines("ExplicitVisualCenter")
def explicit_visual_center(x, weights, *, return_attention=False, training=False, stats=None, **config):
    """EVC on (B, C, H, W) -> (B, C, H, W).

    The attention returned is the LVC's soft assignment of positions to codewords (B, N, K).
    """
    cfg, ctx, x = prepare(ExplicitVisualCenterConfig, x, weights, config, training, stats)
    L = cfg.layers()

    def cb(conv_prefix, bn_prefix, t):
        return batch_norm(ctx, conv(ctx, t, L[conv_prefix]), L[bn_prefix])

    stem = max_pool(relu(cb("conv1", "bn1", x)), (3, 3), (1, 1), padding=1)

    # LVC: bottleneck ConvBlock with a projected residual
    p = "lvc.conv_1"
    t = relu(cb(f"{p}.conv1", f"{p}.bn1", stem))
    t = relu(cb(f"{p}.conv2", f"{p}.bn2", t))
    t = cb(f"{p}.conv3", f"{p}.bn3", t) + cb(f"{p}.residual_conv", f"{p}.residual_bn", stem)
    local = relu(t)
    # encoding layer: soft-assign every position to K codewords d_k by s_k‖x − d_k‖²
    feat = relu(cb("lvc.LVC.0", "lvc.LVC.1", local))
    b, c = feat.shape[:2]
    pos = feat.reshape(b, c, -1).transpose(0, 2, 1)  # (B, N, C)
    resid = pos[:, :, None, :] - ctx["lvc.LVC.3.codewords"][None, None]  # (B, N, K, C)
    assign = softmax(ctx["lvc.LVC.3.scale"] * (resid**2).sum(-1), -1)  # (B, N, K)
    encoded = np.einsum("bnk,bnkc->bkc", assign, resid)  # (B, K, C)
    encoded = relu(batch_norm(ctx, encoded, L["lvc.LVC.4"])).mean(1)  # BN1d over K, mean over K
    channel_gate = sigmoid(dense(ctx, encoded, "lvc.fc.0"))[:, :, None, None]
    lvc = relu(local + local * channel_gate)

    # LightMLP: depthwise/pointwise 1×1 (BN + SiLU) and a 1×1-conv MLP, each with a layer scale
    def scaled(name, t):
        return ctx[name][None, :, None, None] * t

    dw = silu(cb("l_MLP.dw.dconv.conv", "l_MLP.dw.dconv.bn", group_norm(ctx, stem, L["l_MLP.norm1"])))
    dw = silu(cb("l_MLP.dw.pconv.conv", "l_MLP.dw.pconv.bn", dw))
    mlp = stem + scaled("l_MLP.layer_scale_1", dw)
    hidden = gelu(conv(ctx, group_norm(ctx, mlp, L["l_MLP.norm2"]), L["l_MLP.mlp.fc1"]))
    mlp = mlp + scaled("l_MLP.layer_scale_2", conv(ctx, hidden, L["l_MLP.mlp.fc2"]))

    out = conv(ctx, np.concatenate([lvc, mlp], 1), L["cnv1"])
    return (out, assign) if return_attention else out
