"""Explicit visual center (CFPNet): stem, LVC codebook branch and LightMLP branch, fused by 1×1 conv."""

from __future__ import annotations

import math

import keras
from keras import ops

from ._base import Block, flat, num_positions


@keras.saving.register_keras_serializable(package="nlattn")
class ExplicitVisualCenter(Block):
    """EVC on (B, H, W, C) / (B, C, H, W) -> same shape.

    Keywords: in_channels (optional, inferred; >= 4), num_codes=64, mlp_ratio=4, bn_eps=1e-5,
    conv_block_bn_eps=1e-6, gn_eps=1e-5, bn_momentum=0.1 (torch convention), layer_scale_init=1e-5,
    data_format=None. Attention: the soft assignment of positions to codewords (B, N, K).
    """
    block = "ExplicitVisualCenter"

    def initializers(self, layer):
        name = getattr(layer, "name", None)
        if name == "lvc.LVC.3.codewords":     # as the anchor: U(-1/sqrt(K C), 1/sqrt(K C))
            std = 1.0 / math.sqrt(self.spec.num_codes * self.spec.in_channels)
            return {"initializer": keras.initializers.RandomUniform(-std, std)}
        if name == "lvc.LVC.3.scale":          # negative smoothing factors, U(-1, 0)
            return {"initializer": keras.initializers.RandomUniform(-1.0, 0.0)}
        return {}

    def forward(self, x, training, return_attention):
        def cb(conv, bn, t):
            return self.apply(bn, self.apply(conv, t), training)

        stem = ops.max_pool(ops.relu(cb("conv1", "bn1", x)), 3, strides=1, padding="same",
                            data_format="channels_last")

        # LVC: bottleneck ConvBlock with a projected residual
        p = "lvc.conv_1"
        t = ops.relu(cb(f"{p}.conv1", f"{p}.bn1", stem))
        t = ops.relu(cb(f"{p}.conv2", f"{p}.bn2", t))
        local = ops.relu(cb(f"{p}.conv3", f"{p}.bn3", t) + cb(f"{p}.residual_conv", f"{p}.residual_bn", stem))
        # encoding layer: soft-assign every position to K codewords d_k by s_k‖x − d_k‖²
        feat = ops.relu(cb("lvc.LVC.0", "lvc.LVC.1", local))
        n, c, k = num_positions(feat), int(feat.shape[-1]), self.spec.num_codes
        resid = flat(feat, n, c)[:, :, None, :] - self.params["lvc.LVC.3.codewords"][None, None]  # (B, N, K, C)
        assign = ops.softmax(self.params["lvc.LVC.3.scale"] * ops.sum(resid * resid, axis=-1), axis=-1)
        encoded = ops.einsum("bnk,bnkc->bkc", assign, resid)                                    # (B, K, C)
        # BN1d over the K codes: as channels-last (B, 1, C, K)
        encoded = ops.transpose(encoded, (0, 2, 1))[:, None]
        encoded = ops.mean(ops.relu(self.apply("lvc.LVC.4", encoded, training))[:, 0], axis=-1)  # (B, C)
        channel_gate = ops.sigmoid(self.apply("lvc.fc.0", encoded))[:, None, None, :]
        lvc = ops.relu(local + local * channel_gate)

        # LightMLP: depthwise/pointwise 1×1 (BN + SiLU) and a 1×1-conv MLP, each with a layer scale
        dw = ops.silu(cb("l_MLP.dw.dconv.conv", "l_MLP.dw.dconv.bn", self.apply("l_MLP.norm1", stem)))
        dw = ops.silu(cb("l_MLP.dw.pconv.conv", "l_MLP.dw.pconv.bn", dw))
        mlp = stem + self.params["l_MLP.layer_scale_1"] * dw
        hidden = ops.gelu(self.apply("l_MLP.mlp.fc1", self.apply("l_MLP.norm2", mlp)), approximate=False)
        mlp = mlp + self.params["l_MLP.layer_scale_2"] * self.apply("l_MLP.mlp.fc2", hidden)

        out = self.apply("cnv1", ops.concatenate([lvc, mlp], axis=-1))
        return (out, assign) if return_attention else out
