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
    """softmax_j(scale·qᵢ·kⱼ) v, ``query_chunk_size`` queries at a time, forward and backward.

    Each query row needs all keys but no other query, so a chunk of queries is exact. The forward
    keeps, besides the output, one log-sum-exp Lᵢ = log Σⱼ exp(eᵢⱼ) per query; the gradient
    (``keras.ops.custom_gradient``, on every backend) recomputes each chunk's probabilities
    P = exp(E − L) from it, so neither pass holds more than one (chunk, M) block of the relation:
    memory O(chunk · M + (N + M)(c + cv)), for one more q kᵀ (c wide) than the materialised
    gradient. The forward chunks run under ``keras.ops.map``, the backward under
    ``keras.ops.fori_loop`` (one loop body each, compiled once under XLA); the last chunk is
    zero-padded and its extra rows dropped. Everything runs in float32 (or wider).
    """
    chunk = query_chunk_size

    @ops.custom_gradient
    def attend(q, k, v):
        out, lse = _attend(q, k, v, scale, chunk)

        def grad(*args, upstream=None):  # tensorflow and jax pass the upstream positionally, torch by name
            d_out = args[0] if upstream is None else upstream
            return _attend_grad(q, k, v, out, lse, d_out, scale, chunk)

        return ops.cast(out, v.dtype), grad

    return attend(q, k, v)


def _steps(n, chunk: int):
    """Whether (B, h, N, ·) needs more than one chunk, and how many: n may be symbolic."""
    return not (isinstance(n, int) and n <= chunk), (n + chunk - 1) // chunk


def _chunked(t, steps, chunk: int):
    """(B, h, N, d) -> (steps, B, h, chunk, d), N zero-padded to steps · chunk."""
    b, h, n, d = ops.shape(t)
    t = ops.pad(t, [[0, 0], [0, 0], [0, steps * chunk - n], [0, 0]])
    return ops.moveaxis(ops.reshape(t, (b, h, steps, chunk, d)), 2, 0)


def _unchunked(t, n):
    """(steps, B, h, chunk, d) -> (B, h, N, d), the padding dropped."""
    steps, b, h, chunk, d = ops.shape(t)
    return ops.reshape(ops.moveaxis(t, 0, 2), (b, h, steps * chunk, d))[:, :, :n]


def _scaled_energies(q, k, scale):
    e = ops.einsum("bhnc,bhmc->bhnm", q, k)
    return e if scale is None else e * scale


def _attend(q, k, v, scale, chunk: int):
    """Output (B, h, N, cv) and log-sum-exp L (B, h, N, 1), both in float32 (or wider)."""
    wide = work_dtype(v.dtype)
    q, k, v = (ops.cast(t, wide) for t in (q, k, v))

    def rows(qc):  # one chunk of queries: the (chunk, M) block lives only in here
        e = _scaled_energies(qc, k, scale)
        top = ops.max(e, axis=-1, keepdims=True)
        p = ops.exp(e - top)
        total = ops.sum(p, axis=-1, keepdims=True)
        # normalising the (chunk, cv) product, not the (chunk, M) probabilities: one pass less
        return ops.einsum("bhnm,bhmc->bhnc", p, v) / total, top + ops.log(total)

    n = ops.shape(q)[2]
    several, steps = _steps(n, chunk)
    if not several:
        return rows(q)
    out, lse = ops.map(rows, _chunked(q, steps, chunk))
    return _unchunked(out, n), _unchunked(lse, n)


def _attend_grad(q, k, v, out, lse, d_out, scale, chunk: int):
    """dq, dk, dv by query chunks: with P = exp(E − L) recomputed and D = rowsum(dO ∘ O),
    dE = P ∘ (dO vᵀ − D); dv = Pᵀ dO, dq = s·dE k, dk = s·dEᵀ q (s the scale).

    dk and dv are summed over the chunks as dkᵀ = s·qᵀ dE (c, M) and dvᵀ = dOᵀ P (cv, M), each
    transposed once at the end: XLA's CPU dot runs the product that contracts the chunk's rows
    into an (M, ·) output (dEᵀ q, Pᵀ dO) 1.5-4× slower than the same product into (·, M)
    (measured, one core, chunk 1024, M = 16384, c = 32, cv = 256)."""
    wide = out.dtype
    qw, kw, vw, d_out = (ops.cast(t, wide) for t in (q, k, v, d_out))
    delta = ops.sum(d_out * out, axis=-1, keepdims=True)  # (B, h, N, 1)

    def rows(qc, doc, lc, dc):
        p = ops.exp(_scaled_energies(qc, kw, scale) - lc)
        de = p * (ops.einsum("bhnc,bhmc->bhnm", doc, vw) - dc)
        if scale is not None:
            de = de * scale
        dk_t = ops.einsum("bhnc,bhnm->bhcm", qc, de)
        dv_t = ops.einsum("bhnc,bhnm->bhcm", doc, p)
        return ops.einsum("bhnm,bhmc->bhnc", de, kw), dk_t, dv_t

    n = ops.shape(q)[2]
    several, steps = _steps(n, chunk)
    if not several:
        dq, dk_t, dv_t = rows(qw, d_out, lse, delta)
    else:
        xs = [_chunked(t, steps, chunk) for t in (qw, d_out, lse, delta)]

        def step(i, grads):  # zero-padded rows add nothing: their dO is 0
            dq, dk_t, dv_t = grads
            dq_i, dk_i, dv_i = rows(*(t[i] for t in xs))
            return ops.slice_update(dq, [i, 0, 0, 0, 0], dq_i[None]), dk_t + dk_i, dv_t + dv_i

        zero = tuple(ops.zeros_like(t) for t in (xs[0], ops.swapaxes(kw, -1, -2), ops.swapaxes(vw, -1, -2)))
        dq, dk_t, dv_t = ops.fori_loop(0, steps, step, zero)
        dq = _unchunked(dq, n)
    dk, dv = ops.swapaxes(dk_t, -1, -2), ops.swapaxes(dv_t, -1, -2)
    return ops.cast(dq, q.dtype), ops.cast(dk, k.dtype), ops.cast(dv, v.dtype)


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
