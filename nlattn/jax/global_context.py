"""GCNet global context block (Cao et al. 2019) as a Flax NNX module."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..specs import GlobalContextConfig
from . import kernels
from ._base import Block, Sequential, work_dtype


class GlobalContext(Block):
    """Global context on x (B, H, W, C) -> (B, H, W, C): out = x·σ(T_mul(c)) + T_add(c).

    c (B, 1, 1, C) is x pooled over the N = H·W positions by the softmax of ``conv_mask``
    (``pooling_type="att"``) or by the mean ("avg"). The transforms ``channel_add_conv`` /
    ``channel_mul_conv`` are ``Sequential(conv, LayerNorm over (C', 1, 1), ReLU, conv)`` under the
    published indices 0, 1, 3. With ``return_attention=True`` also returns the pooling weights
    (B, N), one row per image. With ``channel_add`` alone and ``zero_init_last`` it starts as the
    identity (mmcv's init).
    """

    config_class = GlobalContextConfig

    def build_layers(self, make):
        cfg, L = self.spec, self.spec.layers()
        if cfg.pooling_type == "att":
            self.conv_mask = make(L["conv_mask"])

        def transform(p):  # conv → LayerNorm → ReLU → conv
            return Sequential(make(L[f"{p}.0"]), make(L[f"{p}.1"]), jax.nn.relu, make(L[f"{p}.3"]))

        # in the published module's __init__ order (so state_dict orders agree)
        if cfg.channel_add:
            self.channel_add_conv = transform("channel_add_conv")
        if cfg.channel_mul:
            self.channel_mul_conv = transform("channel_mul_conv")

    def __call__(self, x, return_attention: bool = False):
        """x (B, H, W, C) -> (B, H, W, C) [, pooling weights (B, N)]."""
        x = self.check_input(x)
        context, attn = self.pool(x)
        out = x
        if self.spec.channel_mul:
            out = out * jax.nn.sigmoid(self.channel_mul_conv(context))
        if self.spec.channel_add:
            out = out + self.channel_add_conv(context)
        return (out, attn) if return_attention else out

    def pool(self, x):
        """The context (B, 1, 1, C) and the pooling weights (B, N); the sum over positions runs
        in float32 (or wider)."""
        b, h, w, c = x.shape
        if self.spec.pooling_type == "avg":
            return x.mean((1, 2), keepdims=True), jnp.full((b, h * w), 1.0 / (h * w), x.dtype)
        a = kernels.softmax(self.conv_mask(x).reshape(b, h * w), -1)
        wide = work_dtype(x.dtype)
        context = jnp.einsum("bnc,bn->bc", x.reshape(b, h * w, c).astype(wide), a.astype(wide))
        return context.astype(x.dtype).reshape(b, 1, 1, c), a
