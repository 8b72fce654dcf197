"""Non-local block (Wang et al. 2018) in its four modes, 1D/2D/3D, as Keras layers.

With ``implementation="auto"`` (the default) and without ``return_attention`` the (B, N, M)
relation is never materialised: ``aggregate`` runs the kernels of ``kernels.py`` (softmax modes
``query_chunk_size`` queries at a time, ``dot_product`` re-associated, ``concatenation`` by
sorting); ``implementation="naive"`` always forms it in ``relation`` (the readable reference path).
"""

from __future__ import annotations

import keras
from keras import ops

from ..specs import NonLocalBlock1DConfig, NonLocalBlock2DConfig, NonLocalBlock3DConfig
from . import kernels
from ._base import Block, count, max_pool, num_positions


class _NonLocal(Block):
    """Non-local block: out = x + BN(W(y)), y = A g with A the (B, N, M) relation of θ and φ.

    Input (B, *S, C) (channels_last) or (B, C, *S) (channels_first); output the same shape. With
    ``return_attention=True`` also returns A, (B, N, M), or (B, heads, N, M) when ``num_heads > 1``
    (positions flattened row-major). Starts as the identity: BN γ = β = 0 (W = 0 without BN), as
    AlexHex7 initialises it.
    """

    has_batch_norm = True  # bn (with bn_layer)

    def build_layers(self, make):
        cfg, L = self.spec, self.spec.layers()
        self.g = make(L["g"])
        if cfg.mode != "gaussian":
            self.theta = make(L["theta"])
            if not cfg.share_query_key:
                self.phi = make(L["phi"])
        if cfg.mode == "concatenation":
            self.concat_project = make(L["concat_project"])
        self.W = make(L["W"])
        if cfg.bn_layer:
            self.bn = make(L["bn"])

    def call_channels_last(self, x, training, return_attention):
        """x (B, *S, C) -> (B, *S, C) [, attention (B, N, M) or (B, heads, N, M)]."""
        theta, phi, g = self.embed(x)  # (B, h, N | M, c)
        if self.fast(return_attention):  # never the (N, M) relation
            return self.residual(x, self.aggregate(theta, phi, g), training)
        attn = self.relation(theta, phi)  # (B, h, N, M)
        out = self.residual(x, ops.matmul(attn, g), training)
        if return_attention:
            return out, (attn[:, 0] if self.spec.num_heads == 1 else attn)
        return out

    def residual(self, x, y, training):
        """x + BN(W(y)) for y (B, h, N, Cv/h): the heads merged back into (B, *S, Cv) for W."""
        b, *spatial, _ = ops.shape(x)
        _, h, _, cv = ops.shape(y)
        z = self.W(ops.reshape(ops.swapaxes(y, 1, 2), (b, *spatial, h * cv)))
        if self.spec.bn_layer:
            z = self.bn(z, training=training)
        return z + x

    def pool(self, t):
        if not self.spec.sub_sample:
            return t
        return max_pool(t, self.spec.pool_window)  # propagates NaN, as the reference's max

    def embed(self, x):
        """θ (B, h, N, Ck/h), φ (B, h, M, Ck/h), g (B, h, M, Cv/h): φ and g convolved then pooled
        (AlexHex7), or pooled then convolved (``pool_first``, Caffe2); θ is never pooled."""
        cfg = self.spec
        x_pooled = self.pool(x) if cfg.pool_first or cfg.mode == "gaussian" else None

        def pooled(conv):
            return conv(x_pooled) if cfg.pool_first else self.pool(conv(x))

        if cfg.mode == "gaussian":
            theta, phi = x, x_pooled
        elif cfg.share_query_key:
            theta = self.theta(x)
            phi = self.theta(x_pooled) if cfg.pool_first else self.pool(theta)  # one conv: reuse θ
        else:
            theta, phi = self.theta(x), pooled(self.phi)
        return tuple(self.split_heads(t) for t in (theta, phi, pooled(self.g)))

    def split_heads(self, t):
        """(B, *S, C) -> (B, h, positions, C / h)."""
        h, (b, *_, c) = self.spec.num_heads, ops.shape(t)
        return ops.transpose(ops.reshape(t, (b, num_positions(t), h, c // h)), (0, 2, 1, 3))

    def relation(self, theta, phi):
        """The relation A (B, h, N, M) of θ (B, h, N, c) and φ (B, h, M, c), materialised."""
        cfg, (b, h, n, c), m = self.spec, ops.shape(theta), ops.shape(phi)[-2]
        if cfg.mode == "concatenation":
            # the published formulation, pair by pair: [θᵢ; φⱼ] (B, h, N, M, 2c), then the 1×1 conv
            pairs = ops.concatenate(
                [
                    ops.broadcast_to(theta[:, :, :, None], (b, h, n, m, c)),
                    ops.broadcast_to(phi[:, :, None], (b, h, n, m, c)),
                ],
                -1,
            )
            w = ops.reshape(self.concat_project.kernel, (-1,))
            return ops.relu(ops.matmul(pairs, w)) / count(m, theta.dtype)
        f = kernels.energies(theta, phi)  # float32 for half-precision inputs
        if cfg.scale is not None:
            f = f * cfg.scale
        f = f / count(m, f.dtype) if cfg.mode == "dot_product" else ops.softmax(f)
        return ops.cast(f, theta.dtype)

    def aggregate(self, theta, phi, g):
        """y = A g (B, h, N, Cv/h) without materialising A."""
        cfg = self.spec
        if cfg.mode == "dot_product":
            return kernels.dot_product_attention(theta, phi, g, cfg.scale)
        if cfg.mode == "concatenation":
            return kernels.concatenation_attention(*self.concat_terms(theta, phi), g)
        return kernels.softmax_attention(theta, phi, g, cfg.scale, self.query_chunk_size)

    def concat_terms(self, theta, phi):
        """ReLU(w·[θᵢ; φⱼ]) = ReLU(aᵢ + bⱼ): per-query a (B, h, N) and per-key b (B, h, M)."""
        w = ops.reshape(self.concat_project.kernel, (-1,))
        c = ops.shape(theta)[-1]
        return ops.matmul(theta, w[:c]), ops.matmul(phi, w[c:])


def _doc(last: str, first: str) -> str:
    return str(_NonLocal.__doc__).replace("(B, *S, C)", last, 1).replace("(B, C, *S)", first, 1)


@keras.saving.register_keras_serializable(package="nlattn")
class NonLocalBlock1D(_NonLocal):
    __doc__ = _doc("(B, L, C)", "(B, C, L)")
    config_class = NonLocalBlock1DConfig


@keras.saving.register_keras_serializable(package="nlattn")
class NonLocalBlock2D(_NonLocal):
    __doc__ = _doc("(B, H, W, C)", "(B, C, H, W)")
    config_class = NonLocalBlock2DConfig


@keras.saving.register_keras_serializable(package="nlattn")
class NonLocalBlock3D(_NonLocal):
    __doc__ = _doc("(B, T, H, W, C)", "(B, C, T, H, W)") + "    Sub-sampling max-pools (1, 2, 2).\n"
    config_class = NonLocalBlock3DConfig
