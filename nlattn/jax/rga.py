"""Relation-aware global attention (Zhang et al. 2020): spatial (RGA-S) then channel (RGA-C)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..specs import RelationAwareAttentionConfig
from ._base import Block


def _relations_as_channels(rel):
    """(B, P, P) relations r -> (B, P, 2P): at position i, r(i, ·) then r(·, i)."""
    return jnp.concatenate([rel, rel.transpose(0, 2, 1)], -1)


class RelationAwareAttention(Block):
    """RGA on (B, H, W, C): sigmoid gates from pairwise relations, y = gate ⊙ x (no residual).

    Keywords: in_channels, spatial_size=(H, W) (fixed: the spatial branch's convs mix H*W
    positions), use_spatial=True, use_channel=True, cha_ratio=8, spa_ratio=8, down_ratio=8,
    bn_eps=1e-5, bn_momentum=0.1. Sub-modules follow the published names: ``theta_spatial[0]`` is
    the conv and ``[1]`` the BN of an ``nn.Sequential(conv, BN, ReLU)``; ``W_spatial[3]``/``[4]``
    the gate's second conv and BN (index 2, the ReLU, is None).
    ``return_attention=True`` also returns the first branch's relations: spatial (B, N, N) with
    use_spatial, else channel (B, C, C).
    """
    config_class = RelationAwareAttentionConfig

    @staticmethod
    def _cbr(seq, t):            # conv -> BN -> ReLU
        return jax.nn.relu(seq[1](seq[0](t)))

    def _gate(self, seq, t):     # conv -> BN -> ReLU -> conv -> BN: the attention logit
        return seq[4](seq[3](self._cbr(seq, t)))

    def __call__(self, x, return_attention: bool = False):
        x = self.check_input(x)
        cfg = self.spec
        b, h, w, c = x.shape
        n = h * w
        relations = []
        if cfg.use_spatial:
            theta = self._cbr(self.theta_spatial, x).reshape(b, n, -1)
            phi = self._cbr(self.phi_spatial, x).reshape(b, n, -1)
            rel = jnp.einsum("bnc,bmc->bnm", theta, phi)                     # r(i, j)
            joint = _relations_as_channels(rel).reshape(b, h, w, 2 * n)
            feat = jnp.concatenate([self._cbr(self.gx_spatial, x).mean(-1, keepdims=True),
                                    self._cbr(self.gg_spatial, joint)], -1)
            x = jax.nn.sigmoid(self._gate(self.W_spatial, feat)) * x
            relations.append(rel)
        if cfg.use_channel:
            # positions as channels: a (C, 1) "image" with N channels per batch item
            xc = x.reshape(b, n, c).transpose(0, 2, 1)[:, :, None, :]       # (B, C, 1, N)
            theta = self._cbr(self.theta_channel, xc)[:, :, 0, :]           # (B, C, Ni)
            phi = self._cbr(self.phi_channel, xc)[:, :, 0, :]               # (B, C, Ni)
            rel = jnp.einsum("bcn,bdn->bcd", theta, phi)                     # (B, C, C)
            joint = _relations_as_channels(rel)[:, :, None, :]              # (B, C, 1, 2C)
            feat = jnp.concatenate([self._cbr(self.gx_channel, xc).mean(-1, keepdims=True),
                                    self._cbr(self.gg_channel, joint)], -1)
            gate = self._gate(self.W_channel, feat).reshape(b, 1, 1, c)
            x = jax.nn.sigmoid(gate) * x
            relations.append(rel)
        return (x, relations[0]) if return_attention else x
