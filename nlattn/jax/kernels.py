"""The fast attention kernels: exact re-formulations that never form the (N, M) relation matrix.

The same names, signatures and layout in ``nlattn/torch/kernels.py`` and ``nlattn/tf/kernels.py``:
heads lead, positions next, channels last — q (B, h, N, c), k (B, h, M, c), v (B, h, M, cv) ->
(B, h, N, cv). Each returns A v for the block's relation A, including its 1/M where the relation
has one (dot_product, concatenation), so a block never divides afterwards. ``scale=None`` means
no scaling of the energies.

Half precision (bfloat16, float16): energies, softmax and every sum over keys run in float32
(``work_dtype``) and are divided by M before the result is cast back, so a fast path overflows
only where its result itself would. NaN propagates as in the materialised relation (the reference).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from ..specs import DEFAULT_QUERY_CHUNK_SIZE
from ._base import work_dtype


def softmax(e: jax.Array, axis: int = -1) -> jax.Array:
    """The softmax of the energies e over ``axis`` (the keys), accumulated in float32 (or wider),
    returned in e's dtype."""
    return jax.nn.softmax(e.astype(work_dtype(e.dtype)), axis).astype(e.dtype)


def energies(q: jax.Array, k: jax.Array) -> jax.Array:
    """q kᵀ (B, h, N, M) in float32 (or wider): half-precision energies overflow (|e| > 65504
    in float16) and round coarsely (bfloat16) before the softmax sees them."""
    wide = work_dtype(q.dtype)
    return q.astype(wide) @ jnp.swapaxes(k.astype(wide), -1, -2)


def softmax_attention(
    q, k, v, scale: float | None = None, query_chunk_size: int = DEFAULT_QUERY_CHUNK_SIZE
) -> jax.Array:
    """softmax_j(scale·qᵢ·kⱼ) v without the (N, M) matrix: ``query_chunk_size`` queries at a time,
    forward and backward.

    Each query row's softmax needs all keys but no other query, so a chunk of queries is exact.
    The forward keeps, besides the output, one log-sum-exp Lᵢ = log Σⱼ exp(eᵢⱼ) per query; the
    backward (``jax.custom_vjp``) recomputes each chunk's probabilities P = exp(E − L) from it, so
    neither pass holds more than one (chunk, M) block of the relation: training memory
    O(chunk · M + (N + M)(c + cv)), for one more q kᵀ than the materialised gradient (c wide, the
    cheap product where c < cv). N is zero-padded to a multiple of the chunk, the extra rows dropped.
    """
    return _softmax_attention(q, k, v, scale, query_chunk_size)


def _chunked(t: jax.Array, chunk: int) -> jax.Array:
    """(B, h, N, d) -> (steps, B, h, chunk, d), N zero-padded to steps · chunk."""
    b, h, n, d = t.shape
    steps = -(-n // chunk)
    t = jnp.pad(t, ((0, 0), (0, 0), (0, steps * chunk - n), (0, 0)))
    return jnp.moveaxis(t.reshape(b, h, steps, chunk, d), 2, 0)


def _unchunked(t: jax.Array, n: int) -> jax.Array:
    """(steps, B, h, chunk, d) -> (B, h, N, d), the padding dropped."""
    steps, b, h, chunk, d = t.shape
    return jnp.moveaxis(t, 0, 2).reshape(b, h, steps * chunk, d)[:, :, :n]


def _scaled_energies(q, k, scale):
    e = jnp.einsum("bhnc,bhmc->bhnm", q, k)
    return e if scale is None else e * scale


def _attend(q, k, v, scale, chunk):
    """Output (B, h, N, cv) and log-sum-exp L (B, h, N, 1), both in float32 (or wider)."""
    wide = work_dtype(v.dtype)
    q, k, v = (t.astype(wide) for t in (q, k, v))

    def rows(qc):  # one chunk of queries: the (chunk, M) block lives only in here
        e = _scaled_energies(qc, k, scale)
        top = jax.lax.stop_gradient(e.max(-1, keepdims=True))
        p = jnp.exp(e - top)
        total = p.sum(-1, keepdims=True)
        # normalising the (chunk, cv) product, not the (chunk, M) probabilities: one pass less
        return jnp.einsum("bhnm,bhmc->bhnc", p, v) / total, top + jnp.log(total)

    n = q.shape[-2]
    if n <= chunk:
        return rows(q)
    out, lse = jax.lax.map(rows, _chunked(q, chunk))
    return _unchunked(out, n), _unchunked(lse, n)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _softmax_attention(q, k, v, scale, chunk):
    return _attend(q, k, v, scale, chunk)[0].astype(v.dtype)


def _softmax_attention_fwd(q, k, v, scale, chunk):
    out, lse = _attend(q, k, v, scale, chunk)
    return out.astype(v.dtype), (q, k, v, out, lse)


def _softmax_attention_bwd(scale, chunk, residuals, d_out):
    """dq, dk, dv by query chunks: with P = exp(E − L) recomputed and D = rowsum(dO ∘ O),
    dE = P ∘ (dO vᵀ − D); dv = Pᵀ dO, dq = s·dE k, dk = s·dEᵀ q (s the scale)."""
    q, k, v, out, lse = residuals
    wide = out.dtype
    qw, kw, vw, d_out = (t.astype(wide) for t in (q, k, v, d_out))
    delta = jnp.sum(d_out * out, -1, keepdims=True)  # (B, h, N, 1)

    def rows(dk_dv, chunk_rows):
        qc, doc, lc, dc = chunk_rows
        p = jnp.exp(_scaled_energies(qc, kw, scale) - lc)
        de = p * (jnp.einsum("bhnc,bhmc->bhnm", doc, vw) - dc)
        if scale is not None:
            de = de * scale
        dk, dv = dk_dv
        dk = dk + jnp.einsum("bhnm,bhnc->bhmc", de, qc)
        dv = dv + jnp.einsum("bhnm,bhnc->bhmc", p, doc)
        return (dk, dv), jnp.einsum("bhnm,bhmc->bhnc", de, kw)

    n, zero = q.shape[-2], (jnp.zeros_like(kw), jnp.zeros_like(vw))
    if n <= chunk:
        (dk, dv), dq = rows(zero, (qw, d_out, lse, delta))
    else:
        xs = tuple(_chunked(t, chunk) for t in (qw, d_out, lse, delta))
        (dk, dv), dq = jax.lax.scan(rows, zero, xs)  # zero-padded rows add nothing: their dO is 0
        dq = _unchunked(dq, n)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


def dot_product_attention(q, k, v, scale: float | None = None) -> jax.Array:
    """(scale/M)·(q kᵀ) v as q ((kᵀ v)·scale/M): (c × cv) per head instead of N × M, linear in N.

    The sums over keys run in float32 (or wider) and are divided by M before anything is rounded
    back, so half precision overflows only where the result itself does."""
    dtype, wide = q.dtype, work_dtype(q.dtype)
    factor = (1.0 if scale is None else float(scale)) / k.shape[-2]
    kv = (jnp.swapaxes(k.astype(wide), -1, -2) @ v.astype(wide)) * factor
    return (q.astype(wide) @ kv).astype(dtype)


def concatenation_attention(a, b, v) -> jax.Array:
    """(1/M) Σⱼ ReLU(aᵢ + bⱼ) vⱼ for a (B, h, N), b (B, h, M), v (B, h, M, cv) -> (B, h, N, cv).

    The keys with bⱼ > −aᵢ (exactly those with aᵢ + bⱼ > 0) are a prefix of the keys sorted by b
    descending, of length nᵢ found by binary search, so the sum is aᵢ·G[nᵢ] + BG[nᵢ] with G, BG
    the prefix sums of v and b·v in that order (float32 or wider): O((N + M) log M) time,
    O((N + M)·cv) memory. NaN as in the materialised sum, where ReLU(NaN) is NaN and 0·NaN too:
    output (i, c) is NaN if aᵢ is, if any bⱼ is, or if any vⱼ of channel c is.
    """
    dtype, m = v.dtype, b.shape[-1]
    a, b, v = (t.astype(work_dtype(dtype)) for t in (a, b, v))
    order = jnp.argsort(-b, axis=-1)  # descending key terms
    b_sorted = jnp.take_along_axis(b, order, -1)
    v_sorted = jnp.take_along_axis(v, order[..., None], -2)
    zero = jnp.zeros_like(v_sorted[..., :1, :])
    sum_v = jnp.concatenate([zero, jnp.cumsum(v_sorted, -2)], -2)  # (B, h, M + 1, cv)
    sum_bv = jnp.concatenate([zero, jnp.cumsum(b_sorted[..., None] * v_sorted, -2)], -2)
    # nᵢ = #{j : bⱼ > −aᵢ} = M − #{j : bⱼ ≤ −aᵢ}, searched in the ascending order
    search = jnp.vectorize(lambda s, t: jnp.searchsorted(s, t, side="right"), signature="(m),(n)->(n)")
    count = (m - search(b_sorted[..., ::-1], -a))[..., None]  # (B, h, N, 1)
    y = a[..., None] * jnp.take_along_axis(sum_v, count, -2) + jnp.take_along_axis(sum_bv, count, -2)
    # the prefix sums see only the keys with aᵢ + bⱼ > 0: put back the NaN the others carry
    nan = jnp.isnan(a)[..., None] | jnp.isnan(b).any(-1)[..., None, None] | jnp.isnan(v).any(-2)[..., None, :]
    return jnp.where(nan, jnp.nan, y / m).astype(dtype)
