"""Disentangled non-local block (Yin et al. 2020), 1D/2D/3D, as Flax NNX modules.

With ``implementation="auto"`` (the default) and without ``return_attention`` the (B, N, N)
pairwise relation is never materialised: ``aggregate`` runs ``kernels.softmax_attention`` on the
whitened θ and φ, ``query_chunk_size`` queries at a time; ``implementation="naive"`` always forms
it in ``relation``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ..specs import DisentangledNonLocal1DConfig, DisentangledNonLocal2DConfig, DisentangledNonLocal3DConfig
from . import kernels
from ._base import Block, work_dtype


class _DisentangledNonLocal(Block):
    """Disentangled non-local block: out = x + BN(W(A g)) + BN(W(u)).

    A (B, N, N) = softmax_j(s·θ̃ᵢ·φ̃ⱼ) of the whitened θ̃ = θ − mean, φ̃ = φ − mean (means over
    positions), s = (Ci^-½ if ``use_scale``) / ``temperature``; u = Σⱼ mⱼ gⱼ with m the softmax
    over positions of ``conv_mask``. The same ``W`` and ``bn`` serve both terms, as in the
    published code (in training each term gets its own batch statistics and updates the running
    ones in turn). Input (B, *S, C) channels-last; output the same shape. With
    ``return_attention=True`` also returns A (B, N, N). Starts as the identity: BN γ = β = 0
    (W = 0 without BN).
    """

    has_batch_norm = True  # bn (with bn_layer)

    def build_layers(self, make):
        L = self.spec.layers()
        self.g, self.theta, self.phi = make(L["g"]), make(L["theta"]), make(L["phi"])
        self.conv_mask = make(L["conv_mask"])
        self.W = make(L["W"])
        if self.spec.bn_layer:
            self.bn = make(L["bn"])

    def __call__(self, x, return_attention: bool = False):
        """x (B, *S, C) -> (B, *S, C) [, attention (B, N, N)]."""
        x = self.check_input(x)
        theta, phi, g = self.embed(x)  # (B, 1, N, Ci)
        if self.fast(return_attention):  # never the (N, N) relation
            return self.residual(x, self.aggregate(theta, phi, g), self.unary(x, g))
        attn = self.relation(theta, phi).astype(g.dtype)  # (B, 1, N, N)
        out = self.residual(x, attn @ g, self.unary(x, g))
        return (out, attn[:, 0]) if return_attention else out

    def embed(self, x):
        """Whitened θ̃, φ̃ (float32 or wider) and g, each (B, 1, N, Ci): one head, the kernels' layout."""
        theta, phi = (self.whiten(self.project(conv, x)) for conv in (self.theta, self.phi))
        return theta, phi, self.flat(self.g(x))[:, None]

    def project(self, conv, x):
        """conv(x) as (B, 1, N, c) for a 1×1 conv, computed in float32 (or wider): θ and φ feed
        energies that 1/temperature scales up (×20 at 0.05), and their rounding with them (in
        bfloat16 the rounded θ, φ alone were 2.5e-2 off the reference)."""
        wide = work_dtype(x.dtype)
        kernel = conv.kernel[...].reshape(self.spec.in_channels, self.spec.inter).astype(wide)
        return (self.flat(x).astype(wide) @ kernel + conv.bias[...].astype(wide))[:, None]

    @staticmethod
    def flat(t):
        """(B, *S, c) -> (B, N, c); explicit sizes, so that batch 0 reshapes too."""
        return t.reshape(t.shape[0], math.prod(t.shape[1:-1]), t.shape[-1])

    @staticmethod
    def whiten(t):
        """t (B, 1, N, c) minus its mean over the N positions."""
        return t - t.mean(-2, keepdims=True)

    def relation(self, theta, phi):
        """The pairwise relation A (B, 1, N, N), materialised, in θ̃'s (wide) dtype."""
        return jax.nn.softmax(kernels.energies(theta, phi) * self.spec.energy_scale, -1)

    def aggregate(self, theta, phi, g):
        """A g (B, 1, N, Ci) without materialising A, in float32 (or wider) like θ̃ and φ̃."""
        v = g.astype(theta.dtype)
        return kernels.softmax_attention(theta, phi, v, self.spec.energy_scale, self.query_chunk_size).astype(g.dtype)

    def unary(self, x, g):
        """u = Σⱼ mⱼ gⱼ (B, Ci), m = softmax over positions of ``conv_mask``; summed in float32."""
        m = kernels.softmax(self.flat(self.conv_mask(x))[..., 0], -1)  # (B, N)
        wide = work_dtype(g.dtype)
        return jnp.einsum("bn,bnc->bc", m.astype(wide), g[:, 0].astype(wide)).astype(g.dtype)

    def residual(self, x, y, u):
        """x + BN(W(y)) + BN(W(u)) for y (B, 1, N, Ci) and u (B, Ci), u broadcast over positions."""
        b, *spatial, _ = x.shape
        ci = self.spec.inter
        z_pair = self.W(y[:, 0].reshape(b, *spatial, ci))
        z_unary = self.W(u.reshape(b, *([1] * len(spatial)), ci))
        if self.spec.bn_layer:
            z_pair, z_unary = self.bn(z_pair), self.bn(z_unary)
        return x + z_pair + z_unary


class DisentangledNonLocal1D(_DisentangledNonLocal):
    __doc__ = str(_DisentangledNonLocal.__doc__).replace("(B, *S, C)", "(B, L, C)", 1)
    config_class = DisentangledNonLocal1DConfig


class DisentangledNonLocal2D(_DisentangledNonLocal):
    __doc__ = str(_DisentangledNonLocal.__doc__).replace("(B, *S, C)", "(B, H, W, C)", 1)
    config_class = DisentangledNonLocal2DConfig


class DisentangledNonLocal3D(_DisentangledNonLocal):
    __doc__ = str(_DisentangledNonLocal.__doc__).replace("(B, *S, C)", "(B, T, H, W, C)", 1)
    config_class = DisentangledNonLocal3DConfig
