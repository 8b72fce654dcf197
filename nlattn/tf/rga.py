"""Relation-aware global attention (Zhang et al. 2020): spatial (RGA-S) then channel (RGA-C)."""

from __future__ import annotations

import keras
from keras import ops

from ..specs import RelationAwareAttentionConfig
from ._base import Block, dtype_of, keras_name, sequential


@keras.saving.register_keras_serializable(package="nlattn")
class RelationAwareAttention(Block):
    """RGA on x (B, H, W, C) -> (B, H, W, C): sigmoid gates from pairwise relations, y = gate ⊙ x.

    Built for one ``spatial_size`` (H, W) (its channel branch mixes the H·W positions). Layers
    carry the published names: ``theta_spatial`` etc. are lists [conv, BN, ReLU], ``W_spatial`` /
    ``W_channel`` are [conv, BN, ReLU, conv, BN], applied in order like ``nn.Sequential``. With
    ``return_attention=True`` also returns the relations of the first branch: spatial (B, N, N)
    with ``use_spatial``, else channel (B, C, C).
    """

    config_class = RelationAwareAttentionConfig
    has_batch_norm = True

    def build_layers(self, make):
        cfg, L = self.spec, self.spec.layers()

        def cbr(prefix):  # conv → BN → ReLU
            relu = keras.layers.ReLU(name=keras_name(f"{prefix}.2"), dtype=dtype_of(make))
            return [make(L[f"{prefix}.0"]), make(L[f"{prefix}.1"]), relu]

        def gate(prefix):  # cbr → conv → BN(1): the attention logit
            return [*cbr(prefix), make(L[f"{prefix}.3"]), make(L[f"{prefix}.4"])]

        # in the published module's __init__ order (so state_dict orders agree)
        if cfg.use_spatial:
            self.theta_spatial, self.phi_spatial = cbr("theta_spatial"), cbr("phi_spatial")
        if cfg.use_channel:
            self.theta_channel, self.phi_channel = cbr("theta_channel"), cbr("phi_channel")
        if cfg.use_spatial:
            self.gx_spatial = cbr("gx_spatial")
        if cfg.use_channel:
            self.gx_channel = cbr("gx_channel")
        if cfg.use_spatial:
            self.gg_spatial = cbr("gg_spatial")
        if cfg.use_channel:
            self.gg_channel = cbr("gg_channel")
        if cfg.use_spatial:
            self.W_spatial = gate("W_spatial")
        if cfg.use_channel:
            self.W_channel = gate("W_channel")

    def call_channels_last(self, x, training, return_attention):
        cfg = self.spec
        b, (h, w), c = ops.shape(x)[0], cfg.spatial_size, cfg.in_channels  # the sizes it was built for
        n = h * w

        def run(layers, t):
            return sequential(layers, t, training)

        relations = []
        if cfg.use_spatial:
            theta = ops.reshape(run(self.theta_spatial, x), (b, n, cfg.inter_channel))
            phi = ops.reshape(run(self.phi_spatial, x), (b, n, cfg.inter_channel))
            rel = ops.matmul(theta, ops.swapaxes(phi, 1, 2))  # r(i, j), (B, N, N)
            # each position sees its relations to all (r(i, ·)) and from all (r(·, i)), as channels
            joint = ops.reshape(ops.concatenate([rel, ops.swapaxes(rel, 1, 2)], -1), (b, h, w, 2 * n))
            feat = ops.concatenate(
                [ops.mean(run(self.gx_spatial, x), axis=-1, keepdims=True), run(self.gg_spatial, joint)], -1
            )
            x = ops.sigmoid(run(self.W_spatial, feat)) * x
            relations.append(rel)
        if cfg.use_channel:
            xc = ops.swapaxes(ops.reshape(x, (b, n, c)), 1, 2)[:, :, None, :]  # positions as channels
            theta = ops.reshape(run(self.theta_channel, xc), (b, c, cfg.inter_spatial))  # (B, C, Ni)
            phi = ops.swapaxes(ops.reshape(run(self.phi_channel, xc), (b, c, cfg.inter_spatial)), 1, 2)
            rel = ops.matmul(theta, phi)  # (B, C, C)
            joint = ops.concatenate([rel, ops.swapaxes(rel, 1, 2)], -1)[:, :, None, :]  # (B, C, 1, 2C)
            feat = ops.concatenate(
                [ops.mean(run(self.gx_channel, xc), axis=-1, keepdims=True), run(self.gg_channel, joint)], -1
            )
            x = ops.sigmoid(ops.reshape(run(self.W_channel, feat), (b, 1, 1, c))) * x  # gate (B, 1, 1, C)
            relations.append(rel)
        return (x, relations[0]) if return_attention else x
