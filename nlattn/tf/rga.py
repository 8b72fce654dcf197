"""Relation-aware global attention (Zhang et al. 2020): spatial (RGA-S) then channel (RGA-C)."""

from __future__ import annotations

import keras
from keras import ops

from ._base import Block


@keras.saving.register_keras_serializable(package="nlattn")
class RelationAwareAttention(Block):
    """RGA on (B, H, W, C) / (B, C, H, W): sigmoid gates from relations, y = gate ⊙ x.

    Keywords: in_channels (optional, inferred), spatial_size=(H, W) (required: the convs mix H*W
    positions), use_spatial=True, use_channel=True, cha_ratio=8, spa_ratio=8, down_ratio=8,
    bn_eps=1e-5, bn_momentum=0.1 (torch convention), data_format=None.
    Attention: the first branch's relations, spatial (B, N, N), else channel (B, C, C).
    """
    block = "RelationAwareAttention"

    def forward(self, x, training, return_attention):
        _, h, w, c = (int(s) if s is not None else None for s in x.shape)
        n = h * w

        def cbr(prefix, t):               # conv → BN → ReLU
            return ops.relu(self.apply(f"{prefix}.1", self.apply(f"{prefix}.0", t), training))

        def gate(prefix, t):              # cbr → conv → BN(1): the attention logit
            return self.apply(f"{prefix}.4", self.apply(f"{prefix}.3", cbr(prefix, t)), training)

        relations = []
        if self.spec.use_spatial:
            theta = ops.reshape(cbr("theta_spatial", x), (-1, n, self.spec.inter_channel))
            phi = ops.reshape(cbr("phi_spatial", x), (-1, n, self.spec.inter_channel))
            rel = ops.matmul(theta, ops.transpose(phi, (0, 2, 1)))            # r(i, j) (B, N, N)
            # at position i: its relations to all (r(i, ·)) and from all (r(·, i)), as channels
            joint = ops.reshape(ops.concatenate([rel, ops.transpose(rel, (0, 2, 1))], -1), (-1, h, w, 2 * n))
            feat = ops.concatenate([ops.mean(cbr("gx_spatial", x), axis=-1, keepdims=True),
                                    cbr("gg_spatial", joint)], -1)
            x = ops.sigmoid(gate("W_spatial", feat)) * x
            relations.append(rel)
        if self.spec.use_channel:
            # positions as channels: (B, C, 1, N), channel c is a "pixel"
            xc = ops.transpose(ops.reshape(x, (-1, n, c)), (0, 2, 1))[:, :, None, :]
            ni = self.spec.inter_spatial
            theta = ops.reshape(cbr("theta_channel", xc), (-1, c, ni))
            phi = ops.transpose(ops.reshape(cbr("phi_channel", xc), (-1, c, ni)), (0, 2, 1))
            rel = ops.matmul(theta, phi)                                       # (B, C, C)
            joint = ops.concatenate([rel, ops.transpose(rel, (0, 2, 1))], -1)[:, :, None, :]
            feat = ops.concatenate([ops.mean(cbr("gx_channel", xc), axis=-1, keepdims=True),
                                    cbr("gg_channel", joint)], -1)
            logit = ops.reshape(gate("W_channel", feat), (-1, 1, 1, c))
            x = ops.sigmoid(logit) * x
            relations.append(rel)
        return (x, relations[0]) if return_attention else x
