"""Disentangled non-local block (Yin et al. 2020), 1D/2D/3D, as Keras layers.

With ``implementation="auto"`` (the default) and without ``return_attention`` the (B, N, N)
pairwise relation is never materialised: ``aggregate`` runs ``kernels.softmax_attention`` on the
whitened θ and φ, ``query_chunk_size`` queries at a time; ``implementation="naive"`` always forms
it in ``relation``.
"""

from __future__ import annotations

import keras
from keras import ops

from ..specs import DisentangledNonLocal1DConfig, DisentangledNonLocal2DConfig, DisentangledNonLocal3DConfig
from . import kernels
from ._base import Block, flat, work_dtype


class _DisentangledNonLocal(Block):
    """Disentangled non-local block: out = x + BN(W(A g)) + BN(W(u)).

    A (B, N, N) = softmax_j(s·θ̃ᵢ·φ̃ⱼ) of the whitened θ̃ = θ − mean, φ̃ = φ − mean (means over
    positions), s = (Ci^-½ if ``use_scale``) / ``temperature``; u = Σⱼ mⱼ gⱼ with m the softmax
    over positions of ``conv_mask``. The same ``W`` and ``bn`` serve both terms, as in the
    published code (in training each term gets its own batch statistics and updates the running
    ones in turn). Input (B, *S, C) (channels_last) or (B, C, *S) (channels_first); output the
    same shape. With ``return_attention=True`` also returns A (B, N, N). Starts as the identity:
    BN γ = β = 0 (W = 0 without BN).
    """

    has_batch_norm = True  # bn (with bn_layer)

    def build_layers(self, make):
        L = self.spec.layers()
        self.g, self.theta, self.phi = make(L["g"]), make(L["theta"]), make(L["phi"])
        self.conv_mask = make(L["conv_mask"])
        self.W = make(L["W"])
        if self.spec.bn_layer:
            self.bn = make(L["bn"])

    def call_channels_last(self, x, training, return_attention):
        """x (B, *S, C) -> (B, *S, C) [, attention (B, N, N)]."""
        theta, phi, g = self.embed(x)  # (B, 1, N, Ci)
        if self.fast(return_attention):  # never the (N, N) relation
            return self.residual(x, self.aggregate(theta, phi, g), self.unary(x, g), training)
        attn = ops.cast(self.relation(theta, phi), g.dtype)  # (B, 1, N, N)
        out = self.residual(x, ops.matmul(attn, g), self.unary(x, g), training)
        return (out, attn[:, 0]) if return_attention else out

    def embed(self, x):
        """Whitened θ̃, φ̃ (float32 or wider) and g, each (B, 1, N, Ci): one head, the kernels' layout."""
        theta, phi = (self.whiten(self.project(conv, x)) for conv in (self.theta, self.phi))
        return theta, phi, flat(self.g(x))[:, None]

    def project(self, conv, x):
        """conv(x) as (B, 1, N, c) for a 1×1 conv, computed in float32 (or wider): θ and φ feed
        energies that 1/temperature scales up (×20 at 0.05), and their rounding with them (in
        bfloat16 the rounded θ, φ alone were 2.5e-2 off the reference)."""
        wide = work_dtype(x.dtype)
        kernel = ops.reshape(ops.cast(conv.kernel, wide), (self.spec.in_channels, self.spec.inter))
        return (ops.matmul(ops.cast(flat(x), wide), kernel) + ops.cast(conv.bias, wide))[:, None]

    @staticmethod
    def whiten(t):
        """t (B, 1, N, c) minus its mean over the N positions."""
        return t - ops.mean(t, axis=-2, keepdims=True)

    def relation(self, theta, phi):
        """The pairwise relation A (B, 1, N, N), materialised, in θ̃'s (wide) dtype."""
        return ops.softmax(kernels.energies(theta, phi) * self.spec.energy_scale)

    def aggregate(self, theta, phi, g):
        """A g (B, 1, N, Ci) without materialising A, in float32 (or wider) like θ̃ and φ̃."""
        v = ops.cast(g, theta.dtype)
        return ops.cast(
            kernels.softmax_attention(theta, phi, v, self.spec.energy_scale, self.query_chunk_size), g.dtype
        )

    def unary(self, x, g):
        """u = Σⱼ mⱼ gⱼ (B, Ci), m = softmax over positions of ``conv_mask``; summed in float32."""
        m = kernels.softmax(flat(self.conv_mask(x))[..., 0])  # (B, N)
        wide = work_dtype(g.dtype)
        u = ops.einsum("bn,bnc->bc", ops.cast(m, wide), ops.cast(g[:, 0], wide))
        return ops.cast(u, g.dtype)

    def residual(self, x, y, u, training):
        """x + BN(W(y)) + BN(W(u)) for y (B, 1, N, Ci) and u (B, Ci), u broadcast over positions."""
        b, *spatial, _ = ops.shape(x)
        ci = self.spec.inter
        z_pair = self.W(ops.reshape(y[:, 0], (b, *spatial, ci)))
        z_unary = self.W(ops.reshape(u, (b, *([1] * len(spatial)), ci)))
        if self.spec.bn_layer:
            z_pair = self.bn(z_pair, training=training)
            z_unary = self.bn(z_unary, training=training)
        return x + z_pair + z_unary


def _doc(last: str, first: str) -> str:
    return str(_DisentangledNonLocal.__doc__).replace("(B, *S, C)", last, 1).replace("(B, C, *S)", first, 1)


@keras.saving.register_keras_serializable(package="nlattn")
class DisentangledNonLocal1D(_DisentangledNonLocal):
    __doc__ = _doc("(B, L, C)", "(B, C, L)")
    config_class = DisentangledNonLocal1DConfig


@keras.saving.register_keras_serializable(package="nlattn")
class DisentangledNonLocal2D(_DisentangledNonLocal):
    __doc__ = _doc("(B, H, W, C)", "(B, C, H, W)")
    config_class = DisentangledNonLocal2DConfig


@keras.saving.register_keras_serializable(package="nlattn")
class DisentangledNonLocal3D(_DisentangledNonLocal):
    __doc__ = _doc("(B, T, H, W, C)", "(B, C, T, H, W)")
    config_class = DisentangledNonLocal3DConfig
