"""Relation-aware global attention (Zhang et al. 2020): spatial (RGA-S) then channel (RGA-C)."""

from __future__ import annotations

import torch
from torch import nn

from ..specs import RelationAwareAttentionConfig
from ._base import Block


class RelationAwareAttention(Block):
    """RGA on x (B, C, H, W) -> (B, C, H, W): sigmoid gates from pairwise relations, y = gate ⊙ x.

    Built for one ``spatial_size`` (H, W) (its channel branch mixes the H·W positions). Submodules
    carry the published names: ``theta_spatial`` etc. are ``Sequential(conv, BN, ReLU)``,
    ``W_spatial`` / ``W_channel`` are ``Sequential(conv, BN, ReLU, conv, BN)``. With
    ``return_attention=True`` also returns the relations of the first branch: spatial (B, N, N)
    with ``use_spatial``, else channel (B, C, C).
    """

    config_class = RelationAwareAttentionConfig

    def build_layers(self, make):
        cfg, L = self.spec, self.spec.layers()

        def cbr(prefix):  # conv → BN → ReLU
            return nn.Sequential(make(L[f"{prefix}.0"]), make(L[f"{prefix}.1"]), nn.ReLU())

        def gate(prefix):  # cbr → conv → BN(1): the attention logit
            return nn.Sequential(*cbr(prefix), make(L[f"{prefix}.3"]), make(L[f"{prefix}.4"]))

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

    def forward(self, x, return_attention: bool = False):
        self.check_input(x)
        cfg = self.spec
        b, c, h, w = x.shape
        n = h * w
        relations = []
        if cfg.use_spatial:
            theta = self.theta_spatial(x).flatten(2)  # (B, Ci, N)
            phi = self.phi_spatial(x).flatten(2)
            rel = torch.einsum("bcn,bcm->bnm", theta, phi)  # r(i, j), (B, N, N)
            # each position sees its relations to all (r(i, ·)) and from all (r(·, i)), as channels
            joint = torch.cat([rel.transpose(1, 2).reshape(b, n, h, w), rel.reshape(b, n, h, w)], 1)
            feat = torch.cat([self.gx_spatial(x).mean(1, keepdim=True), self.gg_spatial(joint)], 1)
            x = torch.sigmoid(self.W_spatial(feat)) * x
            relations.append(rel)
        if cfg.use_channel:
            xc = x.reshape(b, c, n).transpose(1, 2)[..., None]  # positions as channels (B, N, C, 1)
            theta = self.theta_channel(xc)[..., 0].transpose(1, 2)  # (B, C, Ni)
            phi = self.phi_channel(xc)[..., 0]  # (B, Ni, C)
            rel = theta @ phi  # (B, C, C)
            joint = torch.cat([rel.transpose(1, 2)[..., None], rel[..., None]], 1)  # (B, 2C, C, 1)
            feat = torch.cat([self.gx_channel(xc).mean(1, keepdim=True), self.gg_channel(joint)], 1)
            x = torch.sigmoid(self.W_channel(feat).transpose(1, 2)) * x  # gate (B, C, 1, 1)
            relations.append(rel)
        return (x, relations[0]) if return_attention else x
