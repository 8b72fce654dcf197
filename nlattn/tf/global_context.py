"""GCNet global context block (Cao et al. 2019) as a Keras layer."""

from __future__ import annotations

import keras
from keras import ops

from ..specs import GlobalContextConfig
from . import kernels
from ._base import Block, dtype_of, flat, keras_name, num_positions, sequential, work_dtype


@keras.saving.register_keras_serializable(package="nlattn")
class GlobalContext(Block):
    """Global context on x (B, H, W, C) -> (B, H, W, C): out = x·σ(T_mul(c)) + T_add(c).

    c (B, 1, 1, C) is x pooled over the N = H·W positions by the softmax of ``conv_mask``
    (``pooling_type="att"``) or by the mean ("avg"). The transforms ``channel_add_conv`` /
    ``channel_mul_conv`` are lists [conv, LayerNorm over (C', 1, 1), ReLU, conv] applied in order,
    under the published indices 0, 1, 3. With ``return_attention=True`` also returns the pooling
    weights (B, N), one row per image. With ``channel_add`` alone and ``zero_init_last`` it starts
    as the identity (mmcv's init).
    """

    config_class = GlobalContextConfig

    def build_layers(self, make):
        cfg, L = self.spec, self.spec.layers()
        if cfg.pooling_type == "att":
            self.conv_mask = make(L["conv_mask"])

        def transform(p):  # conv → LayerNorm → ReLU → conv
            relu = keras.layers.ReLU(name=keras_name(f"{p}.2"), dtype=dtype_of(make))
            return [make(L[f"{p}.0"]), make(L[f"{p}.1"]), relu, make(L[f"{p}.3"])]

        # in the published module's __init__ order (so state_dict orders agree)
        if cfg.channel_add:
            self.channel_add_conv = transform("channel_add_conv")
        if cfg.channel_mul:
            self.channel_mul_conv = transform("channel_mul_conv")

    def call_channels_last(self, x, training, return_attention):
        """x (B, H, W, C) -> (B, H, W, C) [, pooling weights (B, N)]."""
        context, attn = self.pool(x)
        out = x
        if self.spec.channel_mul:
            out = out * ops.sigmoid(sequential(self.channel_mul_conv, context, training))
        if self.spec.channel_add:
            out = out + sequential(self.channel_add_conv, context, training)
        return (out, attn) if return_attention else out

    def pool(self, x):
        """The context (B, 1, 1, C) and the pooling weights (B, N); the sum over positions runs
        in float32 (or wider)."""
        b, c, n = ops.shape(x)[0], ops.shape(x)[-1], num_positions(x)
        if self.spec.pooling_type == "avg":
            a = ops.ones((b, n), x.dtype) / ops.cast(n, x.dtype)
            return ops.mean(x, axis=(1, 2), keepdims=True), a
        a = kernels.softmax(ops.reshape(self.conv_mask(x), (b, n)))
        wide = work_dtype(x.dtype)
        context = ops.einsum("bnc,bn->bc", ops.cast(flat(x), wide), ops.cast(a, wide))
        return ops.reshape(ops.cast(context, x.dtype), (b, 1, 1, c)), a
