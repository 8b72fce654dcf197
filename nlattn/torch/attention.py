"""SAGAN self-attention, DANet position (PAM) and channel (CAM) attention, CCNet criss-cross."""

from __future__ import annotations

import torch

from ..specs import ChannelAttentionConfig, CrissCrossAttentionConfig, PositionAttentionConfig, SelfAttentionConfig
from . import kernels
from ._base import Block, without_autocast, work_dtype


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
    """``implementation="auto"`` runs the attention through SDPA's CPU flash kernel (q and k
    zero-padded to C channels), never storing the N×N map; ``"naive"`` materialises it."""

    def forward(self, x, return_attention: bool = False):
        """x (B, C, H, W) -> γ·out + x (B, C, H, W) [, attention (B, N, N), rows are queries]."""
        self.check_input(x)
        q, k, v = self.embed(x)  # (B, 1, N, c)
        if self.fast(return_attention):  # the N×N map is never stored
            return self.residual(x, self.aggregate(q, k, v))
        attn = self.relation(q, k)  # (B, 1, N, N)
        out = self.residual(x, attn @ v)
        return (out, attn[:, 0]) if return_attention else out

    def embed(self, x):
        """Q, K (B, 1, N, C/qk_ratio) and V (B, 1, N, C): one head, positions flattened row-major."""
        return tuple(t.flatten(2).transpose(1, 2)[:, None] for t in self.qkv(x))

    def relation(self, q, k):
        """softmax over the keys of Q Kᵀ (B, 1, N, N), materialised."""
        return torch.softmax(kernels.energies(q, k), dim=-1).to(q.dtype)

    def aggregate(self, q, k, v):
        """softmax(Q Kᵀ) V (B, 1, N, C) without the N×N map."""
        return kernels.softmax_attention(q, k, v)

    def residual(self, x, y):
        """γ·y + x, y (B, 1, N, C) laid out as x (B, C, H, W)."""
        return self.gamma * y[:, 0].transpose(1, 2).reshape(x.shape) + x


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
    """DANet channel attention module (CAM), no convs: E = X Xᵀ (B, C, C) over X = x as (B, C, N),
    A = softmax(max_k E − E), y = γ·A X + x with γ (1,) = 0 at init.

    x (B, C, H, W) -> (B, C, H, W) [, attention (B, C, C)]. ``in_channels`` is optional.
    """

    config_class = ChannelAttentionConfig

    def build_layers(self, make):
        self.gamma = make(self.spec.layers()["gamma"])

    def forward(self, x, return_attention: bool = False):
        self.check_input(x)
        xf = x.flatten(2)  # (B, C, N)
        with without_autocast(x.device):  # the energies feed a softmax: no half-precision rounding
            wide = xf.to(work_dtype(x.dtype))
            energy = wide @ wide.transpose(1, 2)
            attn = torch.softmax(energy.amax(-1, keepdim=True) - energy, dim=-1).to(x.dtype)
        y = self.gamma * (attn @ xf).reshape(x.shape) + x
        return (y, attn) if return_attention else y


class CrissCrossAttention(_QKV):
    """CCNet criss-cross attention, ``recurrence`` passes with shared weights.

    Pixel (i, j) attends to its column (itself masked out) and its row (itself included) with one
    softmax over the H + W energies; y = γ·out + x, γ (1,) = 0 at init. x (B, C, H, W) ->
    (B, C, H, W) [, attention of the last pass (B, H, W, H + W), column (H) then row (W)].
    """

    config_class = CrissCrossAttentionConfig

    def forward(self, x, return_attention: bool = False):
        self.check_input(x)
        h = x.shape[2]
        itself = torch.eye(h, dtype=torch.bool, device=x.device)[:, None, :]  # (h, 1, h'): column self-mask
        for _ in range(self.spec.recurrence):
            q, k, v = self.qkv(x)
            with without_autocast(x.device):
                qw, kw = q.to(work_dtype(q.dtype)), k.to(work_dtype(k.dtype))
                e_col = torch.einsum("bchw,bcgw->bhwg", qw, kw).masked_fill(itself, float("-inf"))
                e_row = torch.einsum("bchw,bchv->bhwv", qw, kw)
                attn = torch.softmax(torch.cat([e_col, e_row], -1), dim=-1).to(v.dtype)
            out = torch.einsum("bhwg,bcgw->bchw", attn[..., :h], v) + torch.einsum("bhwv,bchv->bchw", attn[..., h:], v)
            x = self.gamma * out + x
        return (x, attn) if return_attention else x
