"""Exact re-formulations of the relation-map products that never materialise the N×M matrix
(DESIGN §6), in ``keras.ops`` only so that they run and compile on every Keras backend.

* ``softmax_attention``: softmax(θ φᵀ)·g over query chunks: each query row needs all keys but no
  other query, so a chunk of queries is exact; memory O(chunk·M) instead of O(N·M). The chunks
  run under ``keras.ops.map`` (one loop body, compiled once under XLA).
* ``concat_attention``: the concatenation mode's ReLU(aᵢ + bⱼ)/M relation applied to g by sorting
  the keys: O((N + M) log(N + M)) time, O((N + M)·C) memory.
"""

from __future__ import annotations

from keras import ops


def softmax_attention(q, k, v, chunk: int, scale=None):
    """softmax_j(qᵢ·kⱼ [· scale]) v for q (B, h, N, c), k (B, h, M, c), v (B, h, M, cv) -> (B, h, N, cv).

    Queries are processed ``chunk`` at a time (the last chunk zero-padded, its extra rows dropped).
    """
    h, n, c = (int(s) for s in q.shape[1:])
    kt = ops.swapaxes(k, -1, -2)                                   # (B, h, c, M)

    def attend(qc):                                                # (B, h, chunk, c)
        f = ops.matmul(qc, kt)
        if scale is not None:
            f = f * scale
        return ops.matmul(ops.softmax(f, axis=-1), v)

    if n <= chunk:
        return attend(q)
    chunks = -(-n // chunk)
    qp = ops.pad(q, [[0, 0], [0, 0], [0, chunks * chunk - n], [0, 0]])
    qp = ops.transpose(ops.reshape(qp, (-1, h, chunks, chunk, c)), (2, 0, 1, 3, 4))
    out = ops.map(attend, qp)                                      # (chunks, B, h, chunk, cv)
    cv = int(out.shape[-1])
    out = ops.reshape(ops.transpose(out, (1, 2, 0, 3, 4)), (-1, h, chunks * chunk, cv))
    return out[:, :, :n]


def concat_attention(a, b, g):
    """yᵢ = Σⱼ ReLU(aᵢ + bⱼ) gⱼ for a (B, N), b (B, M), g (B, M, cv) -> (B, N, cv) (not divided by M).

    The terms that survive the ReLU are those with bⱼ > −aᵢ: with the keys sorted by b descending,
    they are a prefix whose length cᵢ is the number of keys ranked before query i when −b and a
    are sorted together, so yᵢ = aᵢ·Σ_{<cᵢ} g + Σ_{<cᵢ} b·g from two prefix sums. (Ties bⱼ = −aᵢ
    contribute 0 either way, so the sort need not be stable.)
    """
    m = int(b.shape[-1])
    order = ops.argsort(-b, axis=-1)                               # keys, b descending
    b_sorted = ops.take_along_axis(b, order, axis=-1)
    g_sorted = ops.take_along_axis(g, ops.expand_dims(order, -1), axis=1)
    zero = ops.zeros_like(g_sorted[:, :1])
    sum_g = ops.concatenate([zero, ops.cumsum(g_sorted, axis=1)], axis=1)             # (B, M+1, cv)
    sum_bg = ops.concatenate([zero, ops.cumsum(b_sorted[..., None] * g_sorted, axis=1)], axis=1)
    # cᵢ = #{j: −bⱼ < aᵢ}: rank the queries among the keys by one joint sort of [−b, a]
    joint = ops.concatenate([ops.stop_gradient(-b), ops.stop_gradient(a)], axis=-1)   # (B, M+N)
    order = ops.argsort(joint, axis=-1)
    is_key = ops.cast(order < m, "int32")
    keys_before = ops.take_along_axis(ops.cumsum(is_key, axis=-1), ops.argsort(order, axis=-1), axis=-1)
    count = keys_before[:, m:]                                                        # (B, N)
    index = count[..., None]                                      # broadcast over the channels
    return (a[..., None] * ops.take_along_axis(sum_g, index, axis=1)
            + ops.take_along_axis(sum_bg, index, axis=1))
