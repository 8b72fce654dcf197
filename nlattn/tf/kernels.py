"""The fast attention kernels: exact re-formulations that never form the (N, M) relation matrix,
in ``keras.ops`` only, so that they run and compile on every Keras backend.

The same names, signatures and layout in ``nlattn/torch/kernels.py`` and ``nlattn/jax/kernels.py``:
heads lead, positions next, channels last — q (B, h, N, c), k (B, h, M, c), v (B, h, M, cv) ->
(B, h, N, cv). Each returns A v for the block's relation A, including its 1/M where the relation
has one (dot_product, concatenation), so a block never divides afterwards. ``scale=None`` means
no scaling of the energies (not SDPA's 1/√c). See docs/design.md §6.
"""

from __future__ import annotations

from keras import ops

from ..specs import DEFAULT_QUERY_CHUNK_SIZE
from ._base import count, work_dtype


def softmax(e, axis: int = -1):
    """Softmax accumulated in float32 (or wider), returned in e's dtype."""
    wide = work_dtype(e.dtype)
    return ops.cast(ops.softmax(ops.cast(e, wide), axis=axis), e.dtype)


def energies(q, k):
    """q kᵀ (B, h, N, M) in float32 (or wider): half-precision energies overflow (|e| > 65504
    in float16) and round coarsely (bfloat16) before the softmax sees them."""
    wide = work_dtype(q.dtype)
    return ops.matmul(ops.cast(q, wide), ops.swapaxes(ops.cast(k, wide), -1, -2))


def softmax_attention(q, k, v, scale: float | None = None, query_chunk_size: int = DEFAULT_QUERY_CHUNK_SIZE):
    """softmax_j(scale·qᵢ·kⱼ) v, ``query_chunk_size`` queries at a time.

    Each query row needs all keys but no other query, so a chunk of queries is exact: memory
    O(chunk·M) instead of O(N·M). The chunks run under ``keras.ops.map`` (one loop body, compiled
    once under XLA); the last chunk is zero-padded and its extra rows dropped. Energies and softmax
    run in float32 (or wider), the product with v in v's dtype.
    """
    k_wide = ops.cast(k, work_dtype(k.dtype))

    def rows(qc):  # (B, h, cq, c) -> (B, h, cq, cv)
        e = energies(qc, k_wide)
        if scale is not None:
            e = e * scale
        return ops.matmul(ops.cast(ops.softmax(e), v.dtype), v)

    b, h, n, c = ops.shape(q)
    chunk = query_chunk_size
    if isinstance(n, int) and n <= chunk:
        return rows(q)
    steps = (n + chunk - 1) // chunk  # symbolic where n is
    q = ops.pad(q, [[0, 0], [0, 0], [0, steps * chunk - n], [0, 0]])
    q = ops.moveaxis(ops.reshape(q, (b, h, steps, chunk, c)), 2, 0)  # (steps, B, h, chunk, c)
    out = ops.map(rows, q)  # (steps, B, h, chunk, cv)
    return ops.reshape(ops.moveaxis(out, 0, 2), (b, h, steps * chunk, ops.shape(v)[-1]))[:, :, :n]


def dot_product_attention(q, k, v, scale: float | None = None):
    """(scale/M)·(q kᵀ) v as q ((kᵀ v)·scale/M): (c × cv) per head instead of N × M, linear in N.

    The sums over keys run in float32 (or wider) and are divided by M before anything is rounded
    back, so half precision overflows only where the result itself does."""
    wide = work_dtype(q.dtype)
    factor = (1.0 if scale is None else float(scale)) / count(ops.shape(k)[-2], wide)
    kv = ops.matmul(ops.swapaxes(ops.cast(k, wide), -1, -2), ops.cast(v, wide)) * factor
    return ops.cast(ops.matmul(ops.cast(q, wide), kv), q.dtype)


def concatenation_attention(a, b, v):
    """(1/M) Σⱼ ReLU(aᵢ + bⱼ) vⱼ for a (B, h, N), b (B, h, M), v (B, h, M, cv) -> (B, h, N, cv).

    The keys with bⱼ > −aᵢ (exactly those with aᵢ + bⱼ > 0) are a prefix of the keys sorted by b
    descending, of length nᵢ, so the sum is aᵢ·G[nᵢ] + BG[nᵢ] with G, BG the prefix sums of v and
    b·v in that order (float32 or wider): O((N + M) log(N + M)) time, O((N + M)·cv) memory.
    nᵢ = #{j : −bⱼ < aᵢ} is the rank of query i among the keys in one joint sort of [−b, a]
    (keras.ops has no searchsorted over batches). Ties bⱼ = −aᵢ contribute 0 either way, so the
    sort need not be stable.

    NaN as in the materialised sum (the reference's): a NaN bⱼ makes column j of the relation
    NaN, so every output; a NaN vⱼ reaches every query through its weight, 0 or not, so its
    channel of every output. Prefix sums would pass either only to the queries after it in the
    sort order, so those outputs are set NaN explicitly. (A NaN aᵢ makes row i NaN by itself.)
    """
    dtype, m = v.dtype, ops.shape(b)[-1]
    wide = work_dtype(dtype)
    a, b, v = (ops.cast(t, wide) for t in (a, b, v))
    order = ops.argsort(-b, axis=-1)  # keys, b descending
    b_sorted = ops.take_along_axis(b, order, axis=-1)
    v_sorted = ops.take_along_axis(v, order[..., None], axis=-2)
    zero = ops.zeros_like(v_sorted[..., :1, :])
    sum_v = ops.concatenate([zero, ops.cumsum(v_sorted, axis=-2)], axis=-2)  # (B, h, M + 1, cv)
    sum_bv = ops.concatenate([zero, ops.cumsum(b_sorted[..., None] * v_sorted, axis=-2)], axis=-2)
    joint = ops.concatenate([ops.stop_gradient(-b), ops.stop_gradient(a)], axis=-1)  # (B, h, M + N)
    rank = ops.argsort(joint, axis=-1)
    is_key = ops.cast(rank < m, "int32")
    keys_before = ops.take_along_axis(ops.cumsum(is_key, axis=-1), ops.argsort(rank, axis=-1), axis=-1)
    index = keys_before[..., m:, None]  # (B, h, N, 1): broadcast over cv
    y = a[..., None] * ops.take_along_axis(sum_v, index, axis=-2) + ops.take_along_axis(sum_bv, index, axis=-2)
    poisoned = ops.logical_or(
        ops.any(ops.isnan(b), axis=-1)[..., None, None], ops.any(ops.isnan(v), axis=-2)[..., None, :]
    )  # (B, h, 1, cv)
    y = ops.where(poisoned, ops.cast(float("nan"), wide), y)
    return ops.cast(y / count(m, wide), dtype)
