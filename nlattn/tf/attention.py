"""SAGAN self-attention, DANet position (PAM) and channel (CAM) attention, CCNet criss-cross."""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from ._base import Block, flat, num_positions
from ._fast import softmax_attention


class _QKV(Block):
    gates = ("gamma",)

    def qkv(self, x):
        return self.apply("query_conv", x), self.apply("key_conv", x), self.apply("value_conv", x)


class _SAGAN(_QKV):
    chunked = True

    def forward(self, x, training, return_attention):
        n, c = num_positions(x), int(x.shape[-1])
        q, k, v = self.qkv(x)
        q, k, v = flat(q, n, int(q.shape[-1])), flat(k, n, int(k.shape[-1])), flat(v, n, c)
        if self.fast(return_attention):   # query-chunked: never the (N, N) map
            out = softmax_attention(q[:, None], k[:, None], v[:, None], self.query_chunk_size)[:, 0]
        else:
            attn = ops.softmax(ops.matmul(q, ops.transpose(k, (0, 2, 1))), axis=-1)   # (B, N, N)
            out = ops.matmul(attn, v)
        out = ops.reshape(out, ops.shape(x))
        y = self.sub["gamma"](out) + x
        return (y, attn) if return_attention else y


@keras.saving.register_keras_serializable(package="nlattn")
class SelfAttention(_SAGAN):
    """SAGAN self-attention on (B, H, W, C) / (B, C, H, W): y = γ·softmax(QKᵀ)V + x, γ = 0 at init.

    Keywords: in_channels (optional, inferred), qk_ratio=8 (Q, K have in_channels // qk_ratio
    channels), data_format=None, implementation="auto" (query-chunked attention; "naive"
    materialises the (N, N) map), query_chunk_size=1024.
    Attention (``return_attention=True``): (B, N, N), rows are queries.
    """
    block = "SelfAttention"


@keras.saving.register_keras_serializable(package="nlattn")
class PositionAttention(_SAGAN):
    """DANet position attention (PAM) on (B, H, W, C) / (B, C, H, W); the SAGAN computation.

    Keywords: in_channels (optional), qk_ratio=8, data_format=None, implementation="auto",
    query_chunk_size=1024 (as SelfAttention). Attention: (B, N, N).
    """
    block = "PositionAttention"


@keras.saving.register_keras_serializable(package="nlattn")
class ChannelAttention(Block):
    """DANet channel attention (CAM) on (B, H, W, C) / (B, C, H, W): A = softmax(max_k E − E),
    E = X Xᵀ (B, C, C); y = γ·A X + x, γ = 0 at init. No convs: in_channels is optional.
    """
    block = "ChannelAttention"
    gates = ("gamma",)

    def forward(self, x, training, return_attention):
        n, c = num_positions(x), int(x.shape[-1])
        xt = ops.transpose(flat(x, n, c), (0, 2, 1))                      # (B, C, N)
        energy = ops.matmul(xt, ops.transpose(xt, (0, 2, 1)))             # (B, C, C)
        attn = ops.softmax(ops.max(energy, axis=-1, keepdims=True) - energy, axis=-1)
        out = ops.reshape(ops.transpose(ops.matmul(attn, xt), (0, 2, 1)), ops.shape(x))
        y = self.sub["gamma"](out) + x
        return (y, attn) if return_attention else y


@keras.saving.register_keras_serializable(package="nlattn")
class CrissCrossAttention(_QKV):
    """CCNet criss-cross attention on (B, H, W, C) / (B, C, H, W), ``recurrence`` passes, shared weights.

    Each pixel attends to its column (itself excluded) and its row (itself included), one softmax
    over the H + W energies; y = γ·out + x, γ = 0 at init. Keywords: in_channels (optional),
    qk_ratio=8, recurrence=1, data_format=None. Attention: (B, H, W, H + W) of the last pass,
    column first.
    """
    block = "CrissCrossAttention"

    def forward(self, x, training, return_attention):
        h = int(x.shape[1])
        self_in_column = ops.convert_to_tensor(np.eye(h, dtype=bool)[:, None, :])   # (h, 1, h')
        for _ in range(self.spec.recurrence):
            q, k, v = self.qkv(x)
            e_col = ops.einsum("bhwc,bgwc->bhwg", q, k)
            e_col = ops.where(self_in_column, ops.cast(float("-inf"), e_col.dtype), e_col)
            e_row = ops.einsum("bhwc,bhvc->bhwv", q, k)
            attn = ops.softmax(ops.concatenate([e_col, e_row], axis=-1), axis=-1)
            out = (ops.einsum("bhwg,bgwc->bhwc", attn[..., :h], v)
                   + ops.einsum("bhwv,bhvc->bhwc", attn[..., h:], v))
            x = self.sub["gamma"](out) + x
        return (x, attn) if return_attention else x
