"""SAGAN self-attention, DANet position (PAM) and channel (CAM) attention, CCNet criss-cross."""

from __future__ import annotations

import torch

from ..specs import (ChannelAttentionConfig, CrissCrossAttentionConfig, PositionAttentionConfig,
                     SelfAttentionConfig)
from ._common import Block, attend, conv, layers, param, work_dtype


def _softmax(e, dim=-1):
    """Softmax accumulated in float32 (or wider), returned in e's dtype."""
    return torch.softmax(e, dim=dim, dtype=work_dtype(e.dtype)).to(e.dtype)


class _QKVBlock(Block):
    """The SAGAN / PAM / CCNet parameters, registered in schema order."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        L = layers(self.spec)
        self.query_conv = conv(L["query_conv"])
        self.key_conv = conv(L["key_conv"])
        self.value_conv = conv(L["value_conv"])
        self.gamma = param(L["gamma"])
        self._finish()


class _QKV(_QKVBlock):
    """Blocks with 1×1 ``query_conv``, ``key_conv`` (C -> C // qk_ratio), ``value_conv`` (C -> C)
    and a residual gate ``gamma`` (shape (1,), 0 at init, so the block starts as the identity).
    ``implementation="auto"`` runs the attention through SDPA's CPU flash kernel (q and k
    zero-padded to C channels), never storing the N×N map; ``"naive"`` materialises it."""

    def forward(self, x, return_attention: bool = False):
        """x (B, C, H, W) -> γ·out + x (B, C, H, W) [, attention (B, N, N), rows are queries]."""
        self.check_input(x)
        b, c, h, w = x.shape
        q = self.query_conv(x).flatten(2)       # (B, Cq, N)
        k = self.key_conv(x).flatten(2)         # (B, Cq, N)
        v = self.value_conv(x).flatten(2)       # (B, C, N)
        if self.fast(return_attention):         # fused: the N×N map is never stored
            out = attend(q[:, None], k[:, None], v[:, None], 1.0)[:, 0]
        else:
            attn = _softmax(torch.einsum("bcn,bcm->bnm", q, k))
            out = torch.einsum("bnm,bcm->bcn", attn, v)
        y = self.gamma * out.reshape(x.shape) + x
        return (y, attn) if return_attention else y


class SelfAttention(_QKV):
    __doc__ = "SAGAN self-attention (Zhang et al. 2019): y = γ·V softmax(QᵀK)ᵀ + x.\n\n    " + _QKV.__doc__
    config_class = SelfAttentionConfig


class PositionAttention(_QKV):
    __doc__ = "DANet position attention module (PAM): the SAGAN computation.\n\n    " + _QKV.__doc__
    config_class = PositionAttentionConfig


class ChannelAttention(Block):
    """DANet channel attention module (CAM), no convs: E = X Xᵀ (B, C, C) over X = x as (B, C, N),
    A = softmax(max_k E − E), y = γ·A X + x with γ (1,) = 0 at init.

    x (B, C, H, W) -> (B, C, H, W) [, attention (B, C, C)]. ``in_channels`` is optional.
    """
    config_class = ChannelAttentionConfig

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gamma = param(layers(self.spec)["gamma"])
        self._finish()

    def forward(self, x, return_attention: bool = False):
        self.check_input(x)
        b, c = x.shape[:2]
        xf = x.reshape(b, c, -1)
        wide = xf.to(work_dtype(x.dtype))      # the energies feed a softmax: no bf16 rounding
        energy = wide @ wide.transpose(1, 2)
        attn = torch.softmax(energy.amax(-1, keepdim=True) - energy, dim=-1).to(x.dtype)
        y = self.gamma * (attn @ xf).reshape(x.shape) + x
        return (y, attn) if return_attention else y


class CrissCrossAttention(_QKVBlock):
    """CCNet criss-cross attention, ``recurrence`` passes with shared weights.

    Pixel (i, j) attends to its column (itself masked out) and its row (itself included) with one
    softmax over the H + W energies; y = γ·out + x, γ (1,) = 0 at init. x (B, C, H, W) ->
    (B, C, H, W) [, attention of the last pass (B, H, W, H + W), column (H) then row (W)].
    """
    config_class = CrissCrossAttentionConfig

    def forward(self, x, return_attention: bool = False):
        self.check_input(x)
        h = x.shape[2]
        eye = torch.eye(h, dtype=torch.bool, device=x.device)
        self_in_column = torch.zeros(h, 1, h, device=x.device, dtype=work_dtype(x.dtype))
        self_in_column = self_in_column.masked_fill(eye[:, None, :], float("-inf"))   # (h, 1, h')
        for _ in range(self.spec.recurrence):
            q, k, v = self.query_conv(x), self.key_conv(x), self.value_conv(x)
            e_col = torch.einsum("bchw,bcgw->bhwg", q, k) + self_in_column
            e_row = torch.einsum("bchw,bchv->bhwv", q, k).to(e_col.dtype)
            attn = torch.softmax(torch.cat([e_col, e_row], -1), dim=-1).to(x.dtype)
            out = (torch.einsum("bhwg,bcgw->bchw", attn[..., :h], v)
                   + torch.einsum("bhwv,bchv->bchw", attn[..., h:], v))
            x = self.gamma * out + x
        return (x, attn) if return_attention else x
