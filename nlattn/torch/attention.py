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
    """``implementation="auto"`` runs the attention a query chunk at a time at its exact widths
    (C/qk_ratio for Q, K; C for V) with a recomputing backward (``kernels.softmax_attention``),
    never storing the N×N map, forward or backward; ``"naive"`` materialises it."""

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


def _rows(t):
    """(B, H, W, X) -> (B·H, W, X): each pixel row a matrix (a view)."""
    return t.flatten(0, 1)


def _cols(t):
    """(B, H, W, X) -> (B·W, H, X): each pixel column a matrix. A view at batch 1 (strided matrices
    at a uniform batch stride, which CPU bmm takes as they are), a copy otherwise."""
    return t.transpose(1, 2).flatten(0, 1)


def _energies(q, k, itself=None):
    """Per pixel, its column (H) then its row (W) of q·k: q, k (B, H, W, c) -> (B, H, W, H + W).
    ``itself`` (H, H), −inf on the diagonal, enters the column matmul as its addend (−inf + e = −inf):
    no masking pass."""
    h, w = q.shape[1], q.shape[2]
    qc, kc = _cols(q), _cols(k)
    e_col = qc @ kc.transpose(1, 2) if itself is None else torch.baddbmm(itself, qc, kc.transpose(1, 2))
    e_row = _rows(q) @ _rows(k).transpose(1, 2)
    return torch.cat([e_col.unflatten(0, (-1, w)).transpose(1, 2), e_row.unflatten(0, (-1, h))], -1)


def _aggregate(a, v, adjoint: bool = False):
    """Per pixel, a (B, H, W, H + W) over its column and row of v (B, H, W, X) -> (B, H, W, X);
    ``adjoint``: each pixel's v spread back over its column and row by aᵀ instead (the backward)."""
    h, w = v.shape[1], v.shape[2]
    a_col, a_row = _cols(a[..., :h]), _rows(a[..., h:])  # strided views, no copies (at batch 1)
    if adjoint:
        a_col, a_row = a_col.transpose(1, 2), a_row.transpose(1, 2)
    out = (a_row @ _rows(v)).unflatten(0, (-1, h))
    return out.add_((a_col @ _cols(v)).unflatten(0, (-1, w)).transpose(1, 2))


def _self_mask(q):
    """(H, H): −inf on the diagonal (a pixel is not its own column neighbour), 0 elsewhere."""
    rows = torch.arange(q.shape[1], device=q.device)
    return torch.zeros(q.shape[1], q.shape[1], dtype=q.dtype, device=q.device).masked_fill(
        rows[:, None] == rows, float("-inf")
    )


def _criss_cross_forward(x, gamma, q, k, v):
    """x + γ·out and the float32-or-wider attention (B, H, W, H + W); see ``criss_cross``."""
    with without_autocast(v.device):
        q, k = q.to(work_dtype(q.dtype)), k.to(work_dtype(k.dtype))
        attn = torch.softmax(_energies(q, k, _self_mask(q)), dim=-1)
        out = _aggregate(attn.to(v.dtype), v)
    return torch.addcmul(x, gamma, out), attn  # γ·out + x in one pass


class _CrissCross(torch.autograd.Function):
    """The criss-cross pass with its own backward: it keeps q, k, v and the attention (the old
    einsum code kept those too) and nothing else, neither column copies nor ``out``. γ's gradient
    Σ g·out = Σ A ⊙ (g vᵀ) comes from g vᵀ, which the softmax backward needs anyway."""

    @staticmethod
    def forward(ctx, x, gamma, q, k, v):
        y, attn = _criss_cross_forward(x, gamma, q, k, v)
        ctx.save_for_backward(gamma, q, k, v, attn)
        ctx.set_materialize_grads(False)  # the attention's gradient is mostly absent: no zeros for it
        return y, attn.to(v.dtype)

    @staticmethod
    def backward(ctx, g, grad_attn):
        gamma, q, k, v, attn = ctx.saved_tensors
        if g is None:
            g = torch.zeros(v.shape, dtype=v.dtype, device=v.device)
        with without_autocast(v.device):
            wide = work_dtype(v.dtype)
            gv_ = g.to(v.dtype)
            scores = _energies(gv_, v).to(wide)  # ∂L/∂attn before γ: g·v over each column and row
            grad_v = gamma.to(v.dtype) * _aggregate(attn.to(v.dtype), gv_, adjoint=True)
            del gv_
            s = (scores * attn).sum(-1, keepdim=True)
            grad_gamma = s.sum().reshape(gamma.shape).to(gamma.dtype)
            # softmax backward, in place on G: ∂L/∂e = A ⊙ (T − Σ A ⊙ T), T = γ·G (+ ∂L/∂attn)
            if grad_attn is None:
                grad_e = scores.sub_(s).mul_(attn).mul_(gamma.to(wide))
            else:
                scores.mul_(gamma.to(wide)).add_(grad_attn)
                grad_e = scores.sub_((scores * attn).sum(-1, keepdim=True)).mul_(attn)
            del scores, s
            qw, kw = q.to(wide), k.to(wide)
            grad_q = _aggregate(grad_e, kw).to(q.dtype)
            grad_k = _aggregate(grad_e, qw, adjoint=True).to(k.dtype)
        return g, grad_gamma, grad_q, grad_k, grad_v


def criss_cross(x, gamma, q, k, v):
    """One criss-cross pass on channels-last features: x, v (B, H, W, C), q, k (B, H, W, c), γ (1,)
    -> (x + γ·out (B, H, W, C), attention (B, H, W, H + W), column (itself masked) then row).

    Rows are batched matmuls over (B·H, W, ·) views, columns over (B·W, H, ·) ones (views at
    batch 1). Energies and softmax in float32 for half inputs. Under autograd a custom Function
    recomputes the layouts in its backward instead of keeping them; without it (inference, the
    ONNX tracer) the same code runs plain. Sizes are only passed on, never multiplied: the ONNX
    tracer keeps them dynamic that way.
    """
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, gamma, q, k, v)):
        return _CrissCross.apply(x, gamma, q, k, v)
    y, attn = _criss_cross_forward(x, gamma, q, k, v)
    return y, attn.to(v.dtype)


class CrissCrossAttention(_QKV):
    """CCNet criss-cross attention, ``recurrence`` passes with shared weights.

    Pixel (i, j) attends to its column (itself masked out) and its row (itself included) with one
    softmax over the H + W energies; y = γ·out + x, γ (1,) = 0 at init. x (B, C, H, W) ->
    (B, C, H, W) [, attention of the last pass (B, H, W, H + W), column (H) then row (W)].

    The passes run channels-last: x is laid out once in channels_last memory format, on which the
    1×1 convs (the modules themselves: their hooks run) give channels-last q, k, v, and y comes
    back in channels_last memory format.
    """

    config_class = CrissCrossAttentionConfig

    def forward(self, x, return_attention: bool = False):
        self.check_input(x)
        x = x.permute(0, 2, 3, 1).contiguous()  # (B, H, W, C)
        for _ in range(self.spec.recurrence):
            q, k, v = self.qkv(x)
            x, attn = criss_cross(x, self.gamma, q, k, v)
            del q, k, v
        x = x.permute(0, 3, 1, 2)  # (B, C, H, W) in channels_last memory format: no copy back
        return (x, attn) if return_attention else x

    def qkv(self, x):
        """The 1×1 convs on channels-last x (B, H, W, C): (B, H, W, c) each, contiguous."""
        xf = x.permute(0, 3, 1, 2)  # (B, C, H, W) in channels_last memory format
        return tuple(
            conv(xf).permute(0, 2, 3, 1).contiguous() for conv in (self.query_conv, self.key_conv, self.value_conv)
        )
