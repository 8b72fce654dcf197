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
    (or wider) for half inputs. The same function as ``nlattn.torch.attention.criss_cross``; the
    readable path that materialises the attention (``"naive"``, ``return_attention``), where
    ``fast_criss_cross`` gives the output alone."""
    h = x.shape[1]
    itself = jnp.eye(h, dtype=bool)[:, None, :]  # (h, 1, h'): column self-mask
    qw, kw = q.astype(work_dtype(q.dtype)), k.astype(work_dtype(k.dtype))
    e_col = jnp.where(itself, -jnp.inf, jnp.einsum("bhwc,bgwc->bhwg", qw, kw))
    e_row = jnp.einsum("bhwc,bhvc->bhwv", qw, kw)
    attn = jax.nn.softmax(jnp.concatenate([e_col, e_row], -1), -1).astype(v.dtype)
    out = jnp.einsum("bhwg,bgwc->bhwc", attn[..., :h], v) + jnp.einsum("bhwv,bhvc->bhwc", attn[..., h:], v)
    return gamma * out + x, attn


def _cols(t):
    """(B, H, W, X) <-> (B, W, H, X): each pixel column a matrix, the layout of the column matmuls."""
    return jnp.swapaxes(t, 1, 2)


def _exponentials(q, k):
    """The criss-cross energies' exponentials in the matmul layouts, float32 or wider: column part
    (B, W, H, H) (pixel (i, j) at [j, i], its column g last; itself masked) and row part
    (B, H, W, W), both less each pixel's largest energy, and 1 / their sum (B, H, W, 1): one
    softmax over each pixel's H + W energies, taken in the two parts without concatenating them.
    The self-mask enters as an addend (−inf + e = −inf)."""
    wide = work_dtype(q.dtype)
    q, k = q.astype(wide), k.astype(wide)
    itself = jnp.where(jnp.eye(q.shape[1], dtype=bool), -jnp.inf, 0).astype(wide)
    e_col = jnp.einsum("bwhc,bwgc->bwhg", _cols(q), _cols(k)) + itself
    e_row = jnp.einsum("bhwc,bhvc->bhwv", q, k)
    m = jnp.maximum(_cols(e_col.max(-1)), e_row.max(-1))[..., None]  # (B, H, W, 1)
    p_col, p_row = jnp.exp(e_col - _cols(m)), jnp.exp(e_row - m)
    return p_col, p_row, 1 / (_cols(p_col.sum(-1)) + p_row.sum(-1))[..., None]


def _attention_parts(q, k):
    """The attention's column part (B, W, H, H) and row part (B, H, W, W); see ``_exponentials``."""
    p_col, p_row, r = _exponentials(q, k)
    return p_col * _cols(r), p_row * r


def _aggregate(a_col, a_row, v):
    """Per pixel, its column and row of v (B, H, W, X) weighted by the attention parts -> (B, H, W, X)."""
    a_col, a_row = a_col.astype(v.dtype), a_row.astype(v.dtype)
    return _cols(jnp.einsum("bwhg,bwgc->bwhc", a_col, _cols(v))) + jnp.einsum("bhwv,bhvc->bhwc", a_row, v)


def _spread(a_col, a_row, g):
    """The adjoint of ``_aggregate``: each pixel's g (B, H, W, X) spread back over its column and
    row by the attention parts -> (B, H, W, X)."""
    a_col, a_row = a_col.astype(g.dtype), a_row.astype(g.dtype)
    return _cols(jnp.einsum("bwhg,bwhc->bwgc", a_col, _cols(g))) + jnp.einsum("bhwv,bhwc->bhvc", a_row, g)


@jax.custom_vjp
def fast_criss_cross(x, gamma, q, k, v):
    """One criss-cross pass, x + γ·out (B, H, W, C), without the attention map: the same output
    as ``criss_cross``. Rows are batched matmuls over (B, H) and columns over (B, W), on column
    copies of q, k, v (the only transposes, of q, k, v and the column output, never of an energy
    tensor). Its gradient (``jax.custom_vjp``, reverse mode only) keeps q, k, v and the attention
    parts, as the autodiff of ``criss_cross`` keeps the attention. Without gradients the products
    take the exponentials as they are and the output (C wide, not H + W) is divided by their sum,
    which holds neither attention part (float16 excepted: a sum of up to H + W values could
    exceed its range)."""
    if v.dtype == jnp.float16:
        return _fast_criss_cross_fwd(x, gamma, q, k, v)[0]
    p_col, p_row, r = _exponentials(q, k)
    return (gamma * r).astype(v.dtype) * _aggregate(p_col, p_row, v) + x


def _fast_criss_cross_fwd(x, gamma, q, k, v):
    a_col, a_row = _attention_parts(q, k)
    return gamma * _aggregate(a_col, a_row, v) + x, (gamma, q, k, v, a_col, a_row)


def _fast_criss_cross_bwd(res, g):
    """∂L/∂A = γ g·vᵀ over each column and row; softmax backward ∂L/∂E = A ⊙ (∂L/∂A − Σ A ⊙ ∂L/∂A),
    the sum over both parts; γ's gradient Σ g·out = Σ A ⊙ (g·vᵀ) comes from the same products.
    The sums of products are contractions: XLA's CPU backend runs a fused multiply-and-reduce
    some 20× slower than the same sum as a dot."""
    gamma, q, k, v, a_col, a_row = res
    wide = a_col.dtype
    g_v = g.astype(v.dtype)
    s_col = jnp.einsum("bwhc,bwgc->bwhg", _cols(g_v), _cols(v)).astype(wide)
    s_row = jnp.einsum("bhwc,bhvc->bhwv", g_v, v).astype(wide)
    s = _cols(jnp.einsum("bwhg,bwhg->bwh", s_col, a_col)) + jnp.einsum("bhwv,bhwv->bhw", s_row, a_row)
    s = s[..., None]  # (B, H, W, 1)
    gamma_w = gamma.astype(wide)
    de_col, de_row = gamma_w * a_col * (s_col - _cols(s)), gamma_w * a_row * (s_row - s)
    grad_q = _aggregate(de_col, de_row, k.astype(wide))
    grad_k = _spread(de_col, de_row, q.astype(wide))
    grad_v = gamma.astype(v.dtype) * _spread(a_col, a_row, g_v)
    grad_gamma = s.sum().reshape(gamma.shape).astype(gamma.dtype)
    return g, grad_gamma, grad_q.astype(q.dtype), grad_k.astype(k.dtype), grad_v


fast_criss_cross.defvjp(_fast_criss_cross_fwd, _fast_criss_cross_bwd)


class CrissCrossAttention(_QKV):
    """CCNet criss-cross attention, ``recurrence`` passes with shared weights.

    Pixel (i, j) attends to its column (itself masked out) and its row (itself included) with one
    softmax over the H + W energies; y = γ·out + x, γ (1,) = 0 at init. x (B, H, W, C) ->
    (B, H, W, C) [, attention of the last pass (B, H, W, H + W), column (H) then row (W)].
    ``implementation="auto"`` runs ``fast_criss_cross`` (the map of the last pass from
    ``criss_cross`` when asked for); ``"naive"`` runs ``criss_cross`` throughout.
    """

    config_class = CrissCrossAttentionConfig

    def __call__(self, x, return_attention: bool = False):
        x = self.check_input(x)
        gamma, attn = self.param(self.gamma), None
        for step in range(self.spec.recurrence):
            q, k, v = self.qkv(x)
            if self.fast(return_attention and step == self.spec.recurrence - 1):
                x = fast_criss_cross(x, gamma, q, k, v)
            else:
                x, attn = criss_cross(x, gamma, q, k, v)
        return (x, attn) if return_attention else x
