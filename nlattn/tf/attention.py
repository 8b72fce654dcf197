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
    ``nlattn.torch.attention.criss_cross``; the readable path that materialises the attention
    (``"naive"``, ``return_attention``), where ``fast_criss_cross`` gives the output alone."""
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


def _cols(t):
    """(B, H, W, X) <-> (B, W, H, X): each pixel column a matrix, the layout of the column matmuls."""
    return ops.swapaxes(t, 1, 2)


def _attention_parts(q, k):
    """The criss-cross attention in the matmul layouts, float32 or wider: column part (B, W, H, H)
    (pixel (i, j) at [j, i], its column g last; itself masked) and row part (B, H, W, W). One
    softmax over each pixel's H + W energies, taken in the two parts without concatenating them;
    the self-mask enters as an addend (−inf + e = −inf)."""
    wide = work_dtype(q.dtype)
    q, k = ops.cast(q, wide), ops.cast(k, wide)
    rows = ops.arange(ops.shape(q)[1])
    itself = ops.cast(ops.where(rows[:, None] == rows[None, :], float("-inf"), 0.0), wide)
    e_col = ops.einsum("bwhc,bwgc->bwhg", _cols(q), _cols(k)) + itself
    e_row = ops.einsum("bhwc,bhvc->bhwv", q, k)
    m = ops.expand_dims(ops.maximum(_cols(ops.max(e_col, -1)), ops.max(e_row, -1)), -1)  # (B, H, W, 1)
    p_col, p_row = ops.exp(e_col - _cols(m)), ops.exp(e_row - m)
    r = 1 / ops.expand_dims(_cols(ops.sum(p_col, -1)) + ops.sum(p_row, -1), -1)
    return p_col * _cols(r), p_row * r


def _aggregate(a_col, a_row, v):
    """Per pixel, its column and row of v (B, H, W, X) weighted by the attention parts -> (B, H, W, X)."""
    a_col, a_row = ops.cast(a_col, v.dtype), ops.cast(a_row, v.dtype)
    return _cols(ops.einsum("bwhg,bwgc->bwhc", a_col, _cols(v))) + ops.einsum("bhwv,bhvc->bhwc", a_row, v)


def _spread(a_col, a_row, g):
    """The adjoint of ``_aggregate``: each pixel's g (B, H, W, X) spread back over its column and
    row by the attention parts -> (B, H, W, X)."""
    a_col, a_row = ops.cast(a_col, g.dtype), ops.cast(a_row, g.dtype)
    return _cols(ops.einsum("bwhg,bwhc->bwgc", a_col, _cols(g))) + ops.einsum("bhwv,bhwc->bhvc", a_row, g)


def fast_criss_cross(x, gamma, q, k, v):
    """One criss-cross pass, x + γ·out (B, H, W, C), without the attention map: the same output
    as ``criss_cross`` (same arguments). Rows are batched matmuls over (B, H) and columns over
    (B, W), on column copies of q, k, v (the only transposes, of q, k, v and the column output,
    never of an energy tensor). Its gradient (``keras.ops.custom_gradient``, every backend) keeps
    q, k, v and the attention parts, as the autodiff of ``criss_cross`` keeps the attention."""

    @ops.custom_gradient
    def attend(x, gamma, q, k, v):
        a_col, a_row = _attention_parts(q, k)

        def grad(*args, upstream=None):  # tensorflow and jax pass the upstream positionally, torch by name
            g = args[0] if upstream is None else upstream
            return _fast_criss_cross_grad(g, gamma, q, k, v, a_col, a_row)

        return gamma * _aggregate(a_col, a_row, v) + x, grad

    return attend(x, ops.cast(gamma.gamma, x.dtype), q, k, v)


def _fast_criss_cross_grad(g, gamma, q, k, v, a_col, a_row):
    """∂L/∂A = γ g·vᵀ over each column and row; softmax backward ∂L/∂E = A ⊙ (∂L/∂A − Σ A ⊙ ∂L/∂A),
    the sum over both parts; γ's gradient Σ g·out = Σ A ⊙ (g·vᵀ) comes from the same products.
    The sums of products are contractions: XLA's CPU backend runs a fused multiply-and-reduce
    some 20× slower than the same sum as a dot."""
    wide = work_dtype(v.dtype)
    g_v = ops.cast(g, v.dtype)
    s_col = ops.cast(ops.einsum("bwhc,bwgc->bwhg", _cols(g_v), _cols(v)), wide)
    s_row = ops.cast(ops.einsum("bhwc,bhvc->bhwv", g_v, v), wide)
    s = _cols(ops.einsum("bwhg,bwhg->bwh", s_col, a_col)) + ops.einsum("bhwv,bhwv->bhw", s_row, a_row)
    s = ops.expand_dims(s, -1)  # (B, H, W, 1)
    gamma_w = ops.cast(gamma, wide)
    de_col, de_row = gamma_w * a_col * (s_col - _cols(s)), gamma_w * a_row * (s_row - s)
    grad_q = _aggregate(de_col, de_row, ops.cast(k, wide))
    grad_k = _spread(de_col, de_row, ops.cast(q, wide))
    grad_v = ops.cast(gamma, v.dtype) * _spread(a_col, a_row, g_v)
    grad_gamma = ops.cast(ops.reshape(ops.sum(s), ops.shape(gamma)), gamma.dtype)
    return g, grad_gamma, ops.cast(grad_q, q.dtype), ops.cast(grad_k, k.dtype), grad_v


@keras.saving.register_keras_serializable(package="nlattn")
class CrissCrossAttention(_QKV):
    """CCNet criss-cross attention, ``recurrence`` passes with shared weights.

    Pixel (i, j) attends to its column (itself masked out) and its row (itself included) with one
    softmax over the H + W energies; y = γ·out + x, γ = 0 at init. x (B, H, W, C) ->
    (B, H, W, C) [, attention of the last pass (B, H, W, H + W), column (H) then row (W)].
    ``implementation="auto"`` runs ``fast_criss_cross`` (the map of the last pass from
    ``criss_cross`` when asked for); ``"naive"`` runs ``criss_cross`` throughout.
    """

    config_class = CrissCrossAttentionConfig

    def call_channels_last(self, x, training, return_attention):
        attn = None
        for step in range(self.spec.recurrence):
            q, k, v = self.qkv(x)
            if self.fast(return_attention and step == self.spec.recurrence - 1):
                x = fast_criss_cross(x, self.gamma, q, k, v)
            else:
                x, attn = criss_cross(x, self.gamma, q, k, v)
        return (x, attn) if return_attention else x
