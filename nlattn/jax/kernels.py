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


#: elements of one (key block, width) slice of k or v that the forward's inner step reads (512 KiB
#: in float32): the key block is this over the wider of c and cv, at least MIN_KEY_BLOCK. Chosen by
#: measurement (forward at N = 16384, 1024 queries per chunk, SAGAN's widths 32/256 and the
#: non-local 128/128 and 256/128 at M = 4096, 2 loaded cores, CPU time against the materialising
#: path in one process: 256 to 1024 keys 0.37-0.64×, all keys at once 0.95-1.06×). A block this
#: small stays in cache between the product, the exponential and the second product; and it keeps
#: every buffer XLA's CPU matmul library allocates per step (the packed v block above all) below
#: glibc's mmap threshold, where all M keys per step cost a fresh mapping and its page faults for
#: every chunk (3 GiB of faults per call at N = M = 16384, as many as the materialising path).
KEY_BLOCK_ELEMENTS = 1 << 17
MIN_KEY_BLOCK = 128


def key_block(m: int, width: int) -> int:
    """Keys per inner step for M keys of ``width`` channels (the wider of q/k and v, all heads):
    M itself where it fits KEY_BLOCK_ELEMENTS, else M split evenly into as few blocks as fit
    (a multiple of 8), so that the padding of the last block is small."""
    block = max(MIN_KEY_BLOCK, KEY_BLOCK_ELEMENTS // max(width, 1))
    if m <= block:
        return m
    steps = -(-m // (block // 8 * 8))
    return -(-m // (8 * steps)) * 8


def softmax_attention(
    q,
    k,
    v,
    scale: float | None = None,
    query_chunk_size: int = DEFAULT_QUERY_CHUNK_SIZE,
    key_block_size: int | None = None,
) -> jax.Array:
    """softmax_j(scale·qᵢ·kⱼ) v without the (N, M) matrix: ``query_chunk_size`` queries at a time,
    forward and backward.

    Each query row's softmax needs all keys but no other query, so a chunk of queries is exact.
    Within a chunk the forward runs over blocks of ``key_block_size`` keys (default ``key_block``)
    with a running maximum, sum and output, rescaled when the maximum grows (the online softmax
    of flash attention), so that it holds one (chunk, key block) block of energies. It keeps,
    besides the output, one log-sum-exp Lᵢ = log Σⱼ exp(eᵢⱼ) per query; the backward
    (``jax.custom_vjp``) recomputes each chunk's probabilities P = exp(E − L) from it, so no pass
    holds more than one (chunk, M) block of the relation: training memory
    O(chunk · M + (N + M)(c + cv)), for one more q kᵀ than the materialised gradient (c wide, the
    cheap product where c < cv). N is zero-padded to a multiple of the chunk, M to one of the key
    block (padded keys masked out), the extra rows dropped.
    """
    if key_block_size is None:
        key_block_size = key_block(k.shape[-2], k.shape[1] * max(k.shape[-1], v.shape[-1]))
    return _softmax_attention(q, k, v, scale, query_chunk_size, key_block_size)


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


def _attend(q, k, v, scale, chunk, block):
    """Output (B, h, N, cv) and log-sum-exp L (B, h, N, 1), both in float32 (or wider)."""
    wide = work_dtype(v.dtype)
    q, k, v = (t.astype(wide) for t in (q, k, v))
    m = k.shape[-2]
    rows = _all_keys(k, v, scale) if m <= block else _key_blocks(k, v, scale, block)
    n = q.shape[-2]
    if n <= chunk:
        return rows(q)
    out, lse = jax.lax.map(rows, _chunked(q, chunk))
    return _unchunked(out, n), _unchunked(lse, n)


def _all_keys(k, v, scale):
    """One chunk of queries against all keys at once: the (chunk, M) block lives only in here."""

    def rows(qc):
        e = _scaled_energies(qc, k, scale)
        top = e.max(-1, keepdims=True)
        p = jnp.exp(e - top)
        total = p.sum(-1, keepdims=True)
        # normalising the (chunk, cv) product, not the (chunk, M) probabilities: one pass less
        return jnp.einsum("bhnm,bhmc->bhnc", p, v) / total, top + jnp.log(total)

    return rows


def _key_blocks(k, v, scale, block):
    """One chunk of queries, ``block`` keys at a time: running maximum, sum and output."""
    m = k.shape[-2]
    k_blocks, v_blocks = _chunked(k, block), _chunked(v, block)  # (steps, B, h, block, c | cv)
    padded = k_blocks.shape[0] * block > m
    # −inf energy for the padded keys of the last block: exp gives them weight 0
    mask = jnp.where(jnp.arange(k_blocks.shape[0] * block) < m, 0.0, -jnp.inf).astype(k.dtype)
    mask = mask.reshape(-1, block)

    def step(qc, carry, keys):
        out, top, total = carry
        kb, vb, mb = keys
        e = _scaled_energies(qc, kb, scale)
        if padded:
            e = e + mb
        new_top = jnp.maximum(top, e.max(-1, keepdims=True))
        # a row whose energies so far are all −inf keeps weight 0 (exp(−inf − 0)), not NaN
        shift = jnp.where(new_top == -jnp.inf, 0.0, new_top)
        rescale = jnp.exp(top - shift)
        p = jnp.exp(e - shift)
        out = out * rescale + jnp.einsum("bhnm,bhmc->bhnc", p, vb)
        return (out, new_top, total * rescale + p.sum(-1, keepdims=True)), None

    def rows(qc):
        shape = qc.shape[:-1]
        start = (
            jnp.zeros((*shape, v.shape[-1]), v.dtype),
            jnp.full((*shape, 1), -jnp.inf, v.dtype),
            jnp.zeros((*shape, 1), v.dtype),
        )
        (out, top, total), _ = jax.lax.scan(functools.partial(step, qc), start, (k_blocks, v_blocks, mask))
        return out / total, top + jnp.log(total)

    return rows


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _softmax_attention(q, k, v, scale, chunk, block):
    return _attend(q, k, v, scale, chunk, block)[0].astype(v.dtype)


def _softmax_attention_fwd(q, k, v, scale, chunk, block):
    out, lse = _attend(q, k, v, scale, chunk, block)
    return out.astype(v.dtype), (q, k, v, out, lse)


def _softmax_attention_bwd(scale, chunk, block, residuals, d_out):
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
