"""SAGAN self-attention, DANet position (PAM) and channel (CAM) attention, CCNet criss-cross."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..specs import ChannelAttentionConfig, CrissCrossAttentionConfig, PositionAttentionConfig, SelfAttentionConfig
from . import kernels
from ._base import Block, work_dtype


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
        q, k, v = self.embed(x)  # (B, 1, N, c)
        if self.fast(return_attention):  # the N×N map is never stored
            return self.residual(x, self.aggregate(q, k, v))
        attn = self.relation(q, k)  # (B, 1, N, N)
        out = self.residual(x, attn @ v)
        return (out, attn[:, 0]) if return_attention else out

    def embed(self, x):
        """Q, K (B, 1, N, C/qk_ratio) and V (B, 1, N, C): one head, positions flattened row-major
        (explicit sizes, so that batch 0 reshapes too)."""
        b, h, w, _ = x.shape
        return tuple(t.reshape(b, 1, h * w, t.shape[-1]) for t in self.qkv(x))

    def relation(self, q, k):
        """softmax over the keys of Q Kᵀ (B, 1, N, M), materialised."""
        return jax.nn.softmax(kernels.energies(q, k), -1).astype(q.dtype)

    def aggregate(self, q, k, v):
        """softmax(Q Kᵀ) V (B, 1, N, C) without the N×M map, ``query_chunk_size`` queries at a time."""
        return kernels.softmax_attention(q, k, v, query_chunk_size=self.query_chunk_size)

    def residual(self, x, y):
        """γ·y + x, y (B, 1, N, C) laid out as x (B, H, W, C)."""
        return self.param(self.gamma) * y[:, 0].reshape(x.shape) + x


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
        b, h, w, c = x.shape
        xf = x.reshape(b, h * w, c)  # (B, N, C)
        wide = xf.astype(work_dtype(xf.dtype))  # the energies feed a softmax: no half-precision rounding
        energy = jnp.swapaxes(wide, 1, 2) @ wide
        attn = jax.nn.softmax(energy.max(-1, keepdims=True) - energy, -1).astype(x.dtype)
        y = self.param(self.gamma) * (xf @ jnp.swapaxes(attn, 1, 2)).reshape(x.shape) + x
        return (y, attn) if return_attention else y


def criss_cross(x, gamma, q, k, v):
    """One criss-cross pass: x, v (B, H, W, C), q, k (B, H, W, c), γ (1,) -> (x + γ·out (B, H, W, C),
    attention (B, H, W, H + W), column (itself masked) then row). Energies and softmax in float32
    (or wider) for half inputs. The same function as ``nlattn.torch.attention.criss_cross``."""
    h = x.shape[1]
    itself = jnp.eye(h, dtype=bool)[:, None, :]  # (h, 1, h'): column self-mask
    qw, kw = q.astype(work_dtype(q.dtype)), k.astype(work_dtype(k.dtype))
    e_col = jnp.where(itself, -jnp.inf, jnp.einsum("bhwc,bgwc->bhwg", qw, kw))
    e_row = jnp.einsum("bhwc,bhvc->bhwv", qw, kw)
    attn = jax.nn.softmax(jnp.concatenate([e_col, e_row], -1), -1).astype(v.dtype)
    out = jnp.einsum("bhwg,bgwc->bhwc", attn[..., :h], v) + jnp.einsum("bhwv,bhvc->bhwc", attn[..., h:], v)
    return gamma * out + x, attn


class CrissCrossAttention(_QKV):
    """CCNet criss-cross attention, ``recurrence`` passes with shared weights.

    Pixel (i, j) attends to its column (itself masked out) and its row (itself included) with one
    softmax over the H + W energies; y = γ·out + x, γ (1,) = 0 at init. x (B, H, W, C) ->
    (B, H, W, C) [, attention of the last pass (B, H, W, H + W), column (H) then row (W)].
    """

    config_class = CrissCrossAttentionConfig

    def __call__(self, x, return_attention: bool = False):
        x = self.check_input(x)
        for _ in range(self.spec.recurrence):
            q, k, v = self.qkv(x)
            x, attn = criss_cross(x, self.param(self.gamma), q, k, v)
        return (x, attn) if return_attention else x
