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
    """softmax_j(scale·qᵢ·kⱼ) v without the (N, M) matrix: ``query_chunk_size`` queries at a time.

    Each query row's softmax is the naive one, so the result is the same computation row by row.
    N is zero-padded to a multiple of the chunk (the padded rows are dropped); each step is
    rematerialised under differentiation (``jax.checkpoint``), so training memory stays
    O(chunk · M) too.
    """

    dtype = v.dtype
    wide = work_dtype(dtype)
    k, v = k.astype(wide), v.astype(wide)

    def rows(qc):  # (B, h, cq, c) -> (B, h, cq, cv), in float32 (or wider)
        e = energies(qc, k)
        if scale is not None:
            e = e * scale
        return jax.nn.softmax(e, -1) @ v

    b, h, n, c = q.shape
    chunk = query_chunk_size
    if n <= chunk:
        return rows(q).astype(dtype)
    steps = -(-n // chunk)
    q = jnp.pad(q, ((0, 0), (0, 0), (0, steps * chunk - n), (0, 0)))
    q = jnp.moveaxis(q.reshape(b, h, steps, chunk, c), 2, 0)  # (steps, B, h, chunk, c)
    out = jax.lax.map(jax.checkpoint(rows), q)  # (steps, B, h, chunk, cv)
    return jnp.moveaxis(out, 0, 2).reshape(b, h, steps * chunk, v.shape[-1])[:, :, :n].astype(dtype)


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
