"""GCNet global context block (Cao et al. 2019) as an ``nn.Module``."""

from __future__ import annotations

import torch
from torch import nn

from ..specs import GlobalContextConfig
from . import kernels
from ._base import Block, without_autocast, work_dtype


class GlobalContext(Block):
    """Global context on x (B, C, H, W) -> (B, C, H, W): out = x·σ(T_mul(c)) + T_add(c).

    c (B, C, 1, 1) is x pooled over the N = H·W positions by the softmax of ``conv_mask``
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
            return nn.Sequential(make(L[f"{p}.0"]), make(L[f"{p}.1"]), nn.ReLU(), make(L[f"{p}.3"]))

        # in the published module's __init__ order (so state_dict orders agree)
        if cfg.channel_add:
            self.channel_add_conv = transform("channel_add_conv")
        if cfg.channel_mul:
            self.channel_mul_conv = transform("channel_mul_conv")

    def forward(self, x, return_attention: bool = False):
        """x (B, C, H, W) -> (B, C, H, W) [, pooling weights (B, N)]."""
        self.check_input(x)
        context, attn = self.pool(x)
        out = x
        if self.spec.channel_mul:
            out = out * torch.sigmoid(self.channel_mul_conv(context))
        if self.spec.channel_add:
            out = out + self.channel_add_conv(context)
        return (out, attn) if return_attention else out

    def pool(self, x):
        """The context (B, C, 1, 1) and the pooling weights (B, N); the sum over positions runs in
        float32 (or wider)."""
        b, c, h, w = x.shape
        if self.spec.pooling_type == "avg":
            return x.mean((2, 3), keepdim=True), x.new_full((b, h * w), 1.0 / (h * w))
        a = kernels.softmax(self.conv_mask(x).reshape(b, h * w), -1)
        wide = work_dtype(x.dtype)
        with without_autocast(x.device):
            context = x.reshape(b, c, h * w).to(wide) @ a.to(wide)[..., None]  # (B, C, 1)
        return context.to(x.dtype).reshape(b, c, 1, 1), a
