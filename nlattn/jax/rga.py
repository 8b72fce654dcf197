"""Relation-aware global attention (Zhang et al. 2020): spatial (RGA-S) then channel (RGA-C)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..specs import RelationAwareAttentionConfig
from ._base import Block, Sequential


class RelationAwareAttention(Block):
    """RGA on x (B, H, W, C) -> (B, H, W, C): sigmoid gates from pairwise relations, y = gate ⊙ x.

    Built for one ``spatial_size`` (H, W) (its channel branch mixes the H·W positions). Submodules
    carry the published names: ``theta_spatial`` etc. are ``Sequential(conv, BN, ReLU)``,
    ``W_spatial`` / ``W_channel`` are ``Sequential(conv, BN, ReLU, conv, BN)``. With
    ``return_attention=True`` also returns the relations of the first branch: spatial (B, N, N)
    with ``use_spatial``, else channel (B, C, C).
    """

    config_class = RelationAwareAttentionConfig
    has_batch_norm = True

    def build_layers(self, make):
        cfg, L = self.spec, self.spec.layers()

        def cbr(prefix):  # conv → BN → ReLU
            return Sequential(make(L[f"{prefix}.0"]), make(L[f"{prefix}.1"]), jax.nn.relu)

        def gate(prefix):  # cbr → conv → BN(1): the attention logit
            return Sequential(*cbr(prefix), make(L[f"{prefix}.3"]), make(L[f"{prefix}.4"]))

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

    def __call__(self, x, return_attention: bool = False):
        x = self.check_input(x)
        cfg = self.spec
        b, h, w, c = x.shape
        n = h * w
        relations = []
        if cfg.use_spatial:
            theta, phi = self.theta_spatial(x), self.phi_spatial(x)
            theta, phi = (t.reshape(b, n, t.shape[-1]) for t in (theta, phi))  # (B, N, Ci), sizes: batch 0
            rel = jnp.einsum("bnc,bmc->bnm", theta, phi)  # r(i, j), (B, N, N)
            # each position sees its relations to all (r(i, ·)) and from all (r(·, i)), as channels
            joint = jnp.concatenate([rel, jnp.swapaxes(rel, 1, 2)], -1).reshape(b, h, w, 2 * n)
            feat = jnp.concatenate([self.gx_spatial(x).mean(-1, keepdims=True), self.gg_spatial(joint)], -1)
            x = jax.nn.sigmoid(self.W_spatial(feat)) * x
            relations.append(rel)
        if cfg.use_channel:
            xc = jnp.swapaxes(x.reshape(b, n, c), 1, 2)[:, :, None, :]  # positions as channels (B, C, 1, N)
            theta = self.theta_channel(xc)[:, :, 0, :]  # (B, C, Ni)
            phi = self.phi_channel(xc)[:, :, 0, :]  # (B, C, Ni)
            rel = theta @ jnp.swapaxes(phi, 1, 2)  # (B, C, C)
            joint = jnp.concatenate([rel, jnp.swapaxes(rel, 1, 2)], -1)[:, :, None, :]  # (B, C, 1, 2C)
            feat = jnp.concatenate([self.gx_channel(xc).mean(-1, keepdims=True), self.gg_channel(joint)], -1)
            x = jax.nn.sigmoid(self.W_channel(feat).reshape(b, 1, 1, c)) * x  # gate (B, 1, 1, C)
            relations.append(rel)
        return (x, relations[0]) if return_attention else x
