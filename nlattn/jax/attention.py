"""SAGAN self-attention, DANet position (PAM) and channel (CAM) attention, CCNet criss-cross."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..specs import (ChannelAttentionConfig, CrissCrossAttentionConfig, PositionAttentionConfig,
                     SelfAttentionConfig)
from ._base import Block, check_chunk_size, chunked_softmax_attention


class _SAGAN(Block):
    has_fast_path = True

    def __init__(self, *args, query_chunk_size: int = 1024, **kwargs):
        self.query_chunk_size = check_chunk_size(self.config_class.block, query_chunk_size)
        super().__init__(*args, **kwargs)

    def __call__(self, x, return_attention: bool = False):
        """x (B, H, W, C) -> y (B, H, W, C), and A (B, N, N) with return_attention=True."""
        x = self.check_input(x)
        b, h, w, c = x.shape
        q, k, v = (t.reshape(b, h * w, 1, -1) for t in (self.query_conv(x), self.key_conv(x), self.value_conv(x)))
        if return_attention or self.implementation == "naive":
            attn = jax.nn.softmax(jnp.einsum("bnhc,bmhc->bnm", q, k), -1)     # (B, N, N), over keys
            out = jnp.einsum("bnm,bmhc->bnhc", attn, v)
        else:                                                                # never (N, N)
            attn, out = None, chunked_softmax_attention(q, k, v, self.query_chunk_size)
        y = self.gamma[...] * out.reshape(x.shape) + x
        return (y, attn) if return_attention else y


class SelfAttention(_SAGAN):
    """SAGAN self-attention on (B, H, W, C): y = γ·(A V) + x with A = softmax(Q Kᵀ) (B, N, N).

    Keywords: in_channels, qk_ratio=8 (Q and K have in_channels // qk_ratio channels),
    implementation="auto" | "naive", query_chunk_size=1024 (the fast path attends that many
    queries at a time, memory O(chunk · N) instead of N²). γ starts at 0.
    ``return_attention=True`` (materialising path) also returns A, rows are queries, positions
    flattened row-major.
    """
    config_class = SelfAttentionConfig


class PositionAttention(_SAGAN):
    """DANet position attention module (PAM) on (B, H, W, C); the SAGAN computation.

    Keywords: in_channels, qk_ratio=8, implementation="auto" | "naive", query_chunk_size=1024
    (see ``SelfAttention``). γ starts at 0. ``return_attention=True`` also returns A (B, N, N).
    """
    config_class = PositionAttentionConfig


class ChannelAttention(Block):
    """DANet channel attention module (CAM) on (B, H, W, C); no convs.

    E = XᵀX (B, C, C) with X the (N, C) positions, A = softmax(max_k E − E), y = γ·(X Aᵀ) + x.
    Keywords: in_channels=None (checked when given). γ starts at 0.
    ``return_attention=True`` also returns A (B, C, C).
    """
    config_class = ChannelAttentionConfig

    def __call__(self, x, return_attention: bool = False):
        x = self.check_input(x)
        b, c = x.shape[0], x.shape[-1]
        xf = x.reshape(b, -1, c)                                          # (B, N, C)
        energy = jnp.einsum("bnc,bnd->bcd", xf, xf)
        attn = jax.nn.softmax(energy.max(-1, keepdims=True) - energy, -1)
        y = self.gamma[...] * jnp.einsum("bcd,bnd->bnc", attn, xf).reshape(x.shape) + x
        return (y, attn) if return_attention else y


class CrissCrossAttention(Block):
    """CCNet criss-cross attention on (B, H, W, C), ``recurrence`` passes with shared weights.

    Each pixel attends to its column (itself excluded) and its row (itself included) with one
    softmax over the H + W energies. Keywords: in_channels, qk_ratio=8, recurrence=1. γ starts at 0.
    ``return_attention=True`` also returns the last pass's map (B, H, W, H + W), column first.
    """
    config_class = CrissCrossAttentionConfig

    def __call__(self, x, return_attention: bool = False):
        x = self.check_input(x)
        h = x.shape[1]
        itself = jnp.eye(h, dtype=bool)[:, None, :]                      # (h, 1, h'): column self-mask
        for _ in range(self.spec.recurrence):
            q, k, v = self.query_conv(x), self.key_conv(x), self.value_conv(x)
            e_col = jnp.where(itself, -jnp.inf, jnp.einsum("bhwc,bgwc->bhwg", q, k))
            e_row = jnp.einsum("bhwc,bhvc->bhwv", q, k)
            attn = jax.nn.softmax(jnp.concatenate([e_col, e_row], -1), -1)
            out = (jnp.einsum("bhwg,bgwc->bhwc", attn[..., :h], v)
                   + jnp.einsum("bhwv,bhvc->bhwc", attn[..., h:], v))
            x = self.gamma[...] * out + x
        return (x, attn) if return_attention else x
