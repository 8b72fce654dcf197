"""SAGAN self-attention, DANet position (PAM) and channel (CAM) attention, CCNet criss-cross."""

from __future__ import annotations

import numpy as np

from ..specs import ChannelAttentionConfig, CrissCrossAttentionConfig, PositionAttentionConfig, SelfAttentionConfig
from ._common import defines, prepare
from ._ops import conv, softmax


def _query_key_value(cfg, ctx, x):
    L = cfg.layers()
    return (conv(ctx, x, L["query_conv"]), conv(ctx, x, L["key_conv"]), conv(ctx, x, L["value_conv"]))


def _sagan(config_cls, x, weights, return_attention, config):
    cfg, ctx, x = prepare(config_cls, x, weights, config, False, None)
    b, c, h, w = x.shape
    q, k, v = (t.reshape(b, t.shape[1], h * w) for t in _query_key_value(cfg, ctx, x))
    attn = softmax(np.einsum("bcn,bcm->bnm", q, k), -1)  # (B, N, N), softmax over keys
    out = np.einsum("bnm,bcm->bcn", attn, v).reshape(x.shape)
    y = ctx["gamma"] * out + x
    return (y, attn) if return_attention else y


@defines("SelfAttention")
def self_attention(x, weights, *, return_attention=False, training=False, stats=None, **config):
    """SAGAN self-attention on (B, C, H, W): y = γ·(V Aᵀ) + x, A = softmax(QᵀK) (B, N, N)."""
    return _sagan(SelfAttentionConfig, x, weights, return_attention, config)


@defines("PositionAttention")
def position_attention(x, weights, *, return_attention=False, training=False, stats=None, **config):
    """DANet PAM on (B, C, H, W); the same computation as SAGAN self-attention."""
    return _sagan(PositionAttentionConfig, x, weights, return_attention, config)


@defines("ChannelAttention")
def channel_attention(x, weights, *, return_attention=False, training=False, stats=None, **config):
    """DANet CAM on (B, C, H, W): A = softmax(max_k E − E) with E = X Xᵀ (B, C, C); y = γ·A X + x."""
    cfg, ctx, x = prepare(ChannelAttentionConfig, x, weights, config, False, None)
    b, c = x.shape[:2]
    xf = x.reshape(b, c, -1)
    energy = xf @ xf.transpose(0, 2, 1)
    attn = softmax(energy.max(-1, keepdims=True) - energy, -1)
    y = ctx["gamma"] * (attn @ xf).reshape(x.shape) + x
    return (y, attn) if return_attention else y


@defines("CrissCrossAttention")
def criss_cross_attention(x, weights, *, return_attention=False, training=False, stats=None, **config):
    """CCNet criss-cross attention on (B, C, H, W), ``recurrence`` passes with shared weights.

    Each pixel attends to its column (itself excluded) and its row (itself included) with one
    softmax over the H + W energies; the map returned is (B, H, W, H + W), column first.
    """
    cfg, ctx, x = prepare(CrissCrossAttentionConfig, x, weights, config, False, None)
    h = x.shape[2]
    self_in_column = np.where(np.eye(h, dtype=bool), -np.inf, 0.0)  # (h, h')
    for _ in range(cfg.recurrence):
        q, k, v = _query_key_value(cfg, ctx, x)
        e_col = np.einsum("bchw,bcgw->bhwg", q, k) + self_in_column[:, None, :]
        e_row = np.einsum("bchw,bchv->bhwv", q, k)
        attn = softmax(np.concatenate([e_col, e_row], -1), -1)
        out = np.einsum("bhwg,bcgw->bchw", attn[..., :h], v) + np.einsum("bhwv,bchv->bchw", attn[..., h:], v)
        x = ctx["gamma"] * out + x
    return (x, attn) if return_attention else x
