"""Non-local block (Wang et al. 2018), all four modes, 1D/2D/3D, as Keras layers."""

from __future__ import annotations

import keras
from keras import ops

from ._base import Block, num_positions
from ._fast import concat_attention, softmax_attention


class _NonLocal(Block):
    """x + BN(W(A g)) on (B, *S, C) (channels_last) or (B, C, *S) (channels_first).

    Keywords: in_channels (optional, inferred), inter_channels=None, mode="embedded_gaussian"
    (or "gaussian", "dot_product", "concatenation"), sub_sample=True, bn_layer=True,
    pool_first=False, scale=None, num_heads=1, share_query_key=False, value_channels=None,
    bn_eps=1e-5, bn_momentum=0.1 (torch convention), data_format=None,
    implementation="auto" (fast paths: query-chunked softmax attention, θ(φᵀg)/M for dot_product,
    sorted keys for concatenation; "naive" materialises the (N, M) map), query_chunk_size=1024.
    With ``return_attention=True`` also returns A: (B, N, M), or (B, heads, N, M) with heads > 1.
    Starts as the identity (BN gamma = beta = 0, or W = 0 without BN).
    """
    chunked = True

    @property
    def norm_rank(self):
        return self.spec.spatial_dims + 2

    def initializers(self, layer):
        if self.spec.bn_layer and getattr(layer, "prefix", None) == "bn":
            return {"gamma_initializer": "zeros", "beta_initializer": "zeros"}
        if not self.spec.bn_layer and getattr(layer, "prefix", None) == "W":
            return {"kernel_initializer": "zeros", "bias_initializer": "zeros"}
        return {}

    def forward(self, x, training, return_attention):
        cfg = self.spec
        spatial = tuple(int(s) for s in x.shape[1:-1])
        n, heads = num_positions(x), cfg.num_heads

        def pool(t):
            if not cfg.sub_sample:
                return t
            return ops.max_pool(t, cfg.pool_window, strides=cfg.pool_window, padding="valid",
                                data_format="channels_last")

        def embed(prefix):   # conv then pool (AlexHex7), or pool then conv (Caffe2)
            return self.apply(prefix, pool(x)) if cfg.pool_first else pool(self.apply(prefix, x))

        if cfg.mode == "gaussian":
            theta, phi = x, pool(x)
        else:
            theta = self.apply("theta", x)
            phi = embed("theta" if cfg.share_query_key else "phi")
        g = embed("g")
        m = num_positions(phi)

        def split(t, positions):   # (B, *S, C) -> (B, heads, positions, C / heads)
            c = int(t.shape[-1])
            return ops.transpose(ops.reshape(t, (-1, positions, heads, c // heads)), (0, 2, 1, 3))

        theta, phi, g = split(theta, n), split(phi, m), split(g, m)
        fast = self.fast(return_attention)
        attn = None
        if cfg.mode == "concatenation":
            w = ops.reshape(self.sub["concat_project"].kernel, (-1,))
            ci = int(theta.shape[-1])
            if fast:   # ReLU(w·[θᵢ; φⱼ]) = ReLU(w_θ·θᵢ + w_φ·φⱼ): sorted keys and prefix sums
                a = ops.matmul(theta, w[:ci])          # (B, 1, N)
                k = ops.matmul(phi, w[ci:])            # (B, 1, M)
                y = concat_attention(a[:, 0], k[:, 0], g[:, 0])[:, None] / m
            else:      # the published formulation, pair by pair: [θᵢ; φⱼ] (B, 1, N, M, 2Ci)
                pairs = ops.concatenate([ops.repeat(theta[:, :, :, None], m, axis=3),
                                         ops.repeat(phi[:, :, None], n, axis=2)], -1)
                attn = ops.relu(ops.matmul(pairs, w)) / m
                y = ops.matmul(attn, g)
        elif cfg.mode == "dot_product" and fast:
            # θ(φᵀg)/M: exact re-association, linear in N, no (N, M) matrix
            y = ops.matmul(theta, ops.matmul(ops.transpose(phi, (0, 1, 3, 2)), g)) / m
        elif fast:                                 # softmax modes: query-chunked attention
            y = softmax_attention(theta, phi, g, self.query_chunk_size, cfg.scale)
        else:
            f = ops.matmul(theta, ops.transpose(phi, (0, 1, 3, 2)))    # (B, heads, N, M)
            if cfg.scale is not None:
                f = f * cfg.scale
            attn = ops.softmax(f, axis=-1) if cfg.mode in ("embedded_gaussian", "gaussian") else f / m
            y = ops.matmul(attn, g)
        y = ops.reshape(ops.transpose(y, (0, 2, 1, 3)), (-1, *spatial, int(g.shape[1] * g.shape[3])))
        z = self.apply("W", y)
        if cfg.bn_layer:
            z = self.apply("bn", z, training)
        out = z + x
        if return_attention:
            return out, (attn[:, 0] if heads == 1 else attn)
        return out


@keras.saving.register_keras_serializable(package="nlattn")
class NonLocalBlock1D(_NonLocal):
    __doc__ = "Non-local block on (B, L, C) / (B, C, L)." + _NonLocal.__doc__[_NonLocal.__doc__.index("\n"):]
    block = "NonLocalBlock1D"


@keras.saving.register_keras_serializable(package="nlattn")
class NonLocalBlock2D(_NonLocal):
    __doc__ = "Non-local block on (B, H, W, C) / (B, C, H, W)." + _NonLocal.__doc__[_NonLocal.__doc__.index("\n"):]
    block = "NonLocalBlock2D"


@keras.saving.register_keras_serializable(package="nlattn")
class NonLocalBlock3D(_NonLocal):
    __doc__ = ("Non-local block on (B, T, H, W, C) / (B, C, T, H, W); sub-sampling pools (1, 2, 2)."
               + _NonLocal.__doc__[_NonLocal.__doc__.index("\n"):])
    block = "NonLocalBlock3D"
