"""SAGAN self-attention, DANet position (PAM) and channel (CAM) attention, CCNet criss-cross."""

from __future__ import annotations

import keras
from keras import ops

from ..specs import ChannelAttentionConfig, CrissCrossAttentionConfig, PositionAttentionConfig, SelfAttentionConfig
from . import kernels
from ._base import Block, flat, work_dtype


class _QKV(Block):
    """The SAGAN / PAM / CCNet layers: 1×1 ``query_conv``, ``key_conv`` (C -> C // qk_ratio),
    ``value_conv`` (C -> C) and the residual gate ``gamma``, a ``Scale`` layer, 0 at init (the
    identity)."""

    def build_layers(self, make):
        L = self.spec.layers()
        self.query_conv = make(L["query_conv"])
        self.key_conv = make(L["key_conv"])
        self.value_conv = make(L["value_conv"])
        self.gamma = make(L["gamma"])

    def qkv(self, x):
        return self.query_conv(x), self.key_conv(x), self.value_conv(x)


class _SAGAN(_QKV):
    """``implementation="auto"`` runs the attention ``query_chunk_size`` queries at a time, never
    storing the N×N map; ``"naive"`` materialises it."""

    def call_channels_last(self, x, training, return_attention):
        """x (B, H, W, C) -> γ·out + x (B, H, W, C) [, attention (B, N, N), rows are queries]."""
        q, k, v = self.embed(x)  # (B, 1, N, c)
        if self.fast(return_attention):  # the N×N map is never stored
            return self.residual(x, self.aggregate(q, k, v), training)
        attn = self.relation(q, k)  # (B, 1, N, N)
        y = self.residual(x, ops.matmul(attn, v), training)
        return (y, attn[:, 0]) if return_attention else y

    def embed(self, x):
        """Q, K (B, 1, N, C/qk_ratio) and V (B, 1, N, C): one head, positions flattened row-major."""
        return tuple(flat(t)[:, None] for t in self.qkv(x))

    def relation(self, q, k):
        """softmax over the keys of Q Kᵀ (B, 1, N, N), materialised (energies and softmax in
        float32 for half-precision inputs)."""
        return ops.cast(ops.softmax(kernels.energies(q, k)), q.dtype)

    def aggregate(self, q, k, v):
        """softmax(Q Kᵀ) V (B, 1, N, C) without the N×N map, ``query_chunk_size`` queries a step."""
        return kernels.softmax_attention(q, k, v, query_chunk_size=self.query_chunk_size)

    def residual(self, x, y, training=False):
        """γ·y + x, y (B, 1, N, C) laid out as x (B, H, W, C) (``training`` as the non-local
        block's residual takes it; no layer here depends on it)."""
        return self.gamma(ops.reshape(y[:, 0], ops.shape(x))) + x


@keras.saving.register_keras_serializable(package="nlattn")
class SelfAttention(_SAGAN):
    __doc__ = (
        "SAGAN self-attention (Zhang et al. 2019): y = γ·softmax(QKᵀ)V + x on (B, H, W, C) "
        "(channels_last) or (B, C, H, W).\n\n    " + str(_QKV.__doc__) + "\n    " + str(_SAGAN.__doc__)
    )
    config_class = SelfAttentionConfig


@keras.saving.register_keras_serializable(package="nlattn")
class PositionAttention(_SAGAN):
    __doc__ = (
        "DANet position attention module (PAM): the SAGAN computation.\n\n    "
        + str(_QKV.__doc__)
        + "\n    "
        + str(_SAGAN.__doc__)
    )
    config_class = PositionAttentionConfig


@keras.saving.register_keras_serializable(package="nlattn")
class ChannelAttention(Block):
    """DANet channel attention module (CAM), no convs: E = X Xᵀ (B, C, C) over X = x as (B, C, N),
    A = softmax(max_k E − E), y = γ·A X + x with the ``Scale`` gate γ = 0 at init.

    x (B, H, W, C) -> (B, H, W, C) [, attention (B, C, C)]. ``in_channels`` is optional.
    """

    config_class = ChannelAttentionConfig

    def build_layers(self, make):
        self.gamma = make(self.spec.layers()["gamma"])

    def call_channels_last(self, x, training, return_attention):
        xf = ops.swapaxes(flat(x), 1, 2)  # (B, C, N)
        # the C×C energies feed a softmax: float32 (or wider), no half-precision rounding
        energy = kernels.energies(xf, xf)  # (B, C, C)
        attn = ops.cast(ops.softmax(ops.max(energy, axis=-1, keepdims=True) - energy), x.dtype)
        y = self.gamma(ops.reshape(ops.swapaxes(ops.matmul(attn, xf), 1, 2), ops.shape(x))) + x
        return (y, attn) if return_attention else y


def criss_cross(x, gamma, q, k, v):
    """One criss-cross pass: x, v (B, H, W, C), q, k (B, H, W, c), ``gamma`` the block's γ (a
    ``Scale`` layer) -> (x + γ·out (B, H, W, C), attention (B, H, W, H + W), column (itself masked)
    then row). Energies and softmax in float32 (or wider) for half inputs. The same function as
    ``nlattn.torch.attention.criss_cross``."""
    h = ops.shape(x)[1]
    rows = ops.arange(h)
    itself = (rows[:, None] == rows[None, :])[:, None, :]  # (h, 1, h'): column self-mask
    wide = work_dtype(q.dtype)
    qw, kw = ops.cast(q, wide), ops.cast(k, wide)
    e_col = ops.einsum("bhwc,bgwc->bhwg", qw, kw)
    e_col = ops.where(itself, ops.cast(float("-inf"), wide), e_col)
    e_row = ops.einsum("bhwc,bhvc->bhwv", qw, kw)
    attn = ops.cast(ops.softmax(ops.concatenate([e_col, e_row], axis=-1)), v.dtype)
    out = ops.einsum("bhwg,bgwc->bhwc", attn[..., :h], v) + ops.einsum("bhwv,bhvc->bhwc", attn[..., h:], v)
    return gamma(out) + x, attn


@keras.saving.register_keras_serializable(package="nlattn")
class CrissCrossAttention(_QKV):
    """CCNet criss-cross attention, ``recurrence`` passes with shared weights.

    Pixel (i, j) attends to its column (itself masked out) and its row (itself included) with one
    softmax over the H + W energies; y = γ·out + x, γ = 0 at init. x (B, H, W, C) ->
    (B, H, W, C) [, attention of the last pass (B, H, W, H + W), column (H) then row (W)].
    """

    config_class = CrissCrossAttentionConfig

    def call_channels_last(self, x, training, return_attention):
        for _ in range(self.spec.recurrence):
            q, k, v = self.qkv(x)
            x, attn = criss_cross(x, self.gamma, q, k, v)
        return (x, attn) if return_attention else x
