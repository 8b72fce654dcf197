"""Non-local block (Wang et al. 2018), AlexHex7 defaults, in all four modes; 1D, 2D and 3D."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..specs import NonLocalBlock1DConfig, NonLocalBlock2DConfig, NonLocalBlock3DConfig
from ._base import Block, check_chunk_size, chunked_softmax_attention, max_pool, zeros_init


def concatenation_attention(a: jax.Array, b: jax.Array, g: jax.Array, m: int) -> jax.Array:
    """yᵢ = (1/M) Σⱼ ReLU(aᵢ + bⱼ) gⱼ without the (N, M) matrix, by sorting the key terms.

    a (B, N) query terms, b (B, M) key terms, g (B, M, cv) -> (B, N, cv). The keys with
    bⱼ > −aᵢ (exactly those with aᵢ + bⱼ > 0) are a prefix of b sorted in descending order, so
    yᵢ = (aᵢ·Sg[kᵢ] + Sbg[kᵢ]) / M with Sg, Sbg the prefix sums of g and b·g in that order and
    kᵢ the count found by binary search: O((N + M) log M) time, O((N + M)·cv) memory.
    """
    order = jnp.argsort(-b, axis=-1)                                     # descending key terms
    b_sorted = jnp.take_along_axis(b, order, -1)
    g_sorted = jnp.take_along_axis(g, order[..., None], 1)
    zero = jnp.zeros_like(g_sorted[:, :1])
    s_g = jnp.concatenate([zero, jnp.cumsum(g_sorted, 1)], 1)             # (B, M + 1, cv)
    s_bg = jnp.concatenate([zero, jnp.cumsum(b_sorted[..., None] * g_sorted, 1)], 1)
    # #{j: bⱼ > −aᵢ} = M − #{j: bⱼ ≤ −aᵢ}, searched in the ascending order
    below = jax.vmap(lambda s, t: jnp.searchsorted(s, t, side="right"))(b_sorted[:, ::-1], -a)
    count = (m - below)[..., None]                                        # (B, N, 1)
    return (a[..., None] * jnp.take_along_axis(s_g, count, 1) + jnp.take_along_axis(s_bg, count, 1)) / m


class _NonLocal(Block):
    """Non-local block on channels-last x (B, *S, C) -> (B, *S, C): x + BN(W(A g)).

    Keywords: in_channels, inter_channels=None (C // 2), mode="embedded_gaussian" | "gaussian" |
    "dot_product" | "concatenation", sub_sample=True (2×2 max pool of φ and g; (1, 2, 2) in 3D),
    bn_layer=True, pool_first=False (pool x before the φ/g convs, as the Caffe2 code), scale=None
    (energy scaling), num_heads=1, share_query_key=False, value_channels=None, bn_eps=1e-5,
    bn_momentum=0.1 (PyTorch convention; Flax's BatchNorm gets 0.9); implementation="auto" |
    "naive"; query_chunk_size=1024.

    Fast paths (``implementation="auto"`` without ``return_attention``), none of which forms the
    (N, M) relation matrix: softmax modes attend ``query_chunk_size`` queries at a time
    (memory O(chunk · M)); dot_product re-associates θ (φᵀ g) / M; concatenation sorts the key
    terms of ReLU(w_θ·θᵢ + w_φ·φⱼ) (see ``concatenation_attention``).

    ``return_attention=True`` also returns A: (B, N, M), or (B, heads, N, M) with num_heads > 1;
    N query positions and M key positions (after sub-sampling), flattened row-major.
    The block starts as the identity (BN γ = β = 0, or W = 0 without BN).
    """
    has_fast_path = True

    def __init__(self, *args, query_chunk_size: int = 1024, **kwargs):
        self.query_chunk_size = check_chunk_size(self.config_class.block, query_chunk_size)
        super().__init__(*args, **kwargs)

    def overrides(self):
        if self.spec.bn_layer:
            return {"bn": {"scale_init": zeros_init, "bias_init": zeros_init}}
        return {"W": {"kernel_init": zeros_init, "bias_init": zeros_init}}

    def __call__(self, x, return_attention: bool = False):
        x = self.check_input(x)
        cfg = self.spec
        b, *spatial, c = x.shape
        pool = (lambda t: max_pool(t, cfg.pool_window)) if cfg.sub_sample else (lambda t: t)

        def embed(conv):   # conv then pool (AlexHex7), or pool then conv (Caffe2)
            return conv(pool(x)) if cfg.pool_first else pool(conv(x))

        if cfg.mode == "gaussian":
            theta, phi = x, pool(x)
        else:
            theta = self.theta(x)
            phi = embed(self.theta if cfg.share_query_key else self.phi)
        g = embed(self.g)

        h = cfg.num_heads
        theta = theta.reshape(b, -1, h, theta.shape[-1] // h)     # (B, N, h, Ck/h)
        phi = phi.reshape(b, -1, h, theta.shape[-1])              # (B, M, h, Ck/h)
        g = g.reshape(b, -1, h, g.shape[-1] // h)                 # (B, M, h, Cv/h)
        m = phi.shape[1]
        naive = return_attention or self.implementation == "naive"

        attn = None
        if cfg.mode == "concatenation":
            # ReLU(w·[θᵢ; φⱼ]) = ReLU(w_θ·θᵢ + w_φ·φⱼ): a per-query plus a per-key term (h = 1)
            w = self.concat_project.kernel[...].reshape(-1)
            n, ci = theta.shape[1], theta.shape[-1]
            if naive:              # the published formulation, pair by pair: [θᵢ; φⱼ] (B, N, M, 2Ci)
                pairs = jnp.concatenate([jnp.broadcast_to(theta[:, :, None, 0], (b, n, m, ci)),
                                         jnp.broadcast_to(phi[:, None, :, 0], (b, n, m, ci))], -1)
                attn = jax.nn.relu(jnp.einsum("bnmc,c->bnm", pairs, w))[:, None] / m
            else:
                q = jnp.einsum("bnhc,c->bhn", theta, w[:ci])
                k = jnp.einsum("bmhc,c->bhm", phi, w[ci:])
                y = concatenation_attention(q[:, 0], k[:, 0], g[:, :, 0], m)[:, :, None]
        elif cfg.mode == "dot_product":
            if naive:
                f = jnp.einsum("bnhc,bmhc->bhnm", theta, phi)
                attn = (f * cfg.scale if cfg.scale is not None else f) / m
            else:                  # θ (φᵀ g) / M: (Ck/h × Cv/h) per head instead of N × M
                y = jnp.einsum("bnhc,bhcd->bnhd", theta, jnp.einsum("bmhc,bmhd->bhcd", phi, g))
                y = (y * cfg.scale if cfg.scale is not None else y) / m
        elif naive:                # embedded_gaussian, gaussian
            f = jnp.einsum("bnhc,bmhc->bhnm", theta, phi)
            attn = jax.nn.softmax(f * cfg.scale if cfg.scale is not None else f, -1)
        else:
            y = chunked_softmax_attention(theta, phi, g, self.query_chunk_size, cfg.scale)

        if attn is not None:
            y = jnp.einsum("bhnm,bmhc->bnhc", attn, g)
        z = self.W(y.reshape(b, *spatial, -1))
        if cfg.bn_layer:
            z = self.bn(z)
        out = z + x
        if return_attention:
            return out, (attn[:, 0] if h == 1 else attn)
        return out


class NonLocalBlock1D(_NonLocal):
    __doc__ = "Non-local block on (B, L, C).\n\n" + _NonLocal.__doc__
    config_class = NonLocalBlock1DConfig


class NonLocalBlock2D(_NonLocal):
    __doc__ = "Non-local block on (B, H, W, C).\n\n" + _NonLocal.__doc__
    config_class = NonLocalBlock2DConfig


class NonLocalBlock3D(_NonLocal):
    __doc__ = "Non-local block on (B, T, H, W, C); sub-sampling pools (1, 2, 2).\n\n" + _NonLocal.__doc__
    config_class = NonLocalBlock3DConfig
