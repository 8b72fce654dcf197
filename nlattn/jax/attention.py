"""SAGAN self-attention, DANet position (PAM) and channel (CAM) attention, CCNet criss-cross."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..specs import ChannelAttentionConfig, CrissCrossAttentionConfig, PositionAttentionConfig, SelfAttentionConfig
from . import kernels
from ._base import Block


class _QKV(Block):
    """The SAGAN / PAM / CCNet layers: 1×1 ``query_conv``, ``key_conv`` (C -> C // qk_ratio),
    ``value_conv`` (C -> C) and the residual gate ``gamma`` (1,), 0 at init (the identity)."""

    def build_layers(self, make):
        L = self.spec.layers()
        self.query_conv = make(L["query_conv"])
        self.key_conv = make(L["key_conv"])
        self.value_conv = make(L["value_conv"])
        self.gamma = make(L["gamma"])

    def qkv(self, x):
        return self.query_conv(x), self.key_conv(x), self.value_conv(x)


class _SAGAN(_QKV):
    """``implementation="auto"`` attends ``query_chunk_size`` queries at a time, never storing the
    N×N map (memory O(chunk · N)); ``"naive"`` materialises it."""

    def __call__(self, x, return_attention: bool = False):
        """x (B, H, W, C) -> γ·out + x (B, H, W, C) [, attention (B, N, N), rows are queries]."""
        x = self.check_input(x)
        q, k, v = (t.reshape(t.shape[0], 1, -1, t.shape[-1]) for t in self.qkv(x))  # (B, 1, N, c)
        if self.fast(return_attention):
            attn, out = None, kernels.softmax_attention(q, k, v, query_chunk_size=self.query_chunk_size)
        else:
            attn = kernels.softmax(q @ jnp.swapaxes(k, -1, -2))[:, 0]  # (B, N, N), over keys
            out = attn[:, None] @ v
        y = self.gamma[...] * out[:, 0].reshape(x.shape) + x
        return (y, attn) if return_attention else y


class SelfAttention(_SAGAN):
    __doc__ = (
        "SAGAN self-attention (Zhang et al. 2019): y = γ·V softmax(QᵀK)ᵀ + x.\n\n    "
        + str(_QKV.__doc__)
        + "\n    "
        + str(_SAGAN.__doc__)
    )
    config_class = SelfAttentionConfig


class PositionAttention(_SAGAN):
    __doc__ = (
        "DANet position attention module (PAM): the SAGAN computation.\n\n    "
        + str(_QKV.__doc__)
        + "\n    "
        + str(_SAGAN.__doc__)
    )
    config_class = PositionAttentionConfig


class ChannelAttention(Block):
    """DANet channel attention module (CAM), no convs: E = XᵀX (B, C, C) over X = x as (B, N, C),
    A = softmax(max_k E − E), y = γ·X Aᵀ + x with γ (1,) = 0 at init.

    x (B, H, W, C) -> (B, H, W, C) [, attention (B, C, C)]. ``in_channels`` is optional.
    """

    config_class = ChannelAttentionConfig

    def build_layers(self, make):
        self.gamma = make(self.spec.layers()["gamma"])

    def __call__(self, x, return_attention: bool = False):
        x = self.check_input(x)
        xf = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, N, C)
        energy = jnp.swapaxes(xf, 1, 2) @ xf
        attn = jax.nn.softmax(energy.max(-1, keepdims=True) - energy, -1)
        y = self.gamma[...] * (xf @ jnp.swapaxes(attn, 1, 2)).reshape(x.shape) + x
        return (y, attn) if return_attention else y


class CrissCrossAttention(_QKV):
    """CCNet criss-cross attention, ``recurrence`` passes with shared weights.

    Pixel (i, j) attends to its column (itself masked out) and its row (itself included) with one
    softmax over the H + W energies; y = γ·out + x, γ (1,) = 0 at init. x (B, H, W, C) ->
    (B, H, W, C) [, attention of the last pass (B, H, W, H + W), column (H) then row (W)].
    """

    config_class = CrissCrossAttentionConfig

    def __call__(self, x, return_attention: bool = False):
        x = self.check_input(x)
        h = x.shape[1]
        itself = jnp.eye(h, dtype=bool)[:, None, :]  # (h, 1, h'): column self-mask
        for _ in range(self.spec.recurrence):
            q, k, v = self.qkv(x)
            e_col = jnp.where(itself, -jnp.inf, jnp.einsum("bhwc,bgwc->bhwg", q, k))
            e_row = jnp.einsum("bhwc,bhvc->bhwv", q, k)
            attn = jax.nn.softmax(jnp.concatenate([e_col, e_row], -1), -1)
            out = jnp.einsum("bhwg,bgwc->bhwc", attn[..., :h], v) + jnp.einsum("bhwv,bhvc->bhwc", attn[..., h:], v)
            x = self.gamma[...] * out + x
        return (x, attn) if return_attention else x
