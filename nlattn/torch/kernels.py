"""The fast attention kernels: exact re-formulations that never form the (N, M) relation matrix.

The same names, signatures and layout in ``nlattn/tf/kernels.py`` and ``nlattn/jax/kernels.py``:
heads lead, positions next, channels last — q (B, h, N, c), k (B, h, M, c), v (B, h, M, cv) ->
(B, h, N, cv). Each returns A v for the block's relation A, including its 1/M where the relation
has one (dot_product, concatenation), so a block never divides afterwards. ``scale=None`` means
no scaling of the energies (not SDPA's 1/√c).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import specs
from ._base import without_autocast, work_dtype


def softmax(e: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax accumulated in float32 (or wider), returned in e's dtype."""
    return torch.softmax(e, dim=dim, dtype=work_dtype(e.dtype)).to(e.dtype)


def energies(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q kᵀ (B, h, N, M) in float32 (or wider): half-precision energies overflow (|e| > 65504
    in float16) and round coarsely (bfloat16) before the softmax sees them."""
    wide = work_dtype(q.dtype)
    with without_autocast(q.device):
        return q.to(wide) @ k.to(wide).transpose(-1, -2)


#: floor of the shifted energies eᵢⱼ − maxⱼ eᵢⱼ (and eᵢⱼ − Lᵢ in the backward) before exp. Without
#: it a peaked row (gaussian mode: x·x over C = 256 channels spreads the energies over hundreds)
#: gives probabilities below 1.2e-38, float32 denormals, which x86 handles in microcode: measured
#: (1 thread, a 256 × 16384 chunk) exp 70× and the P·V product 200× slower, the whole gaussian
#: training step at 64² 16×. exp(−60) ≈ 9e-27: clamping moves a row's result by at most M·9e-27
#: relative, far below float32 (and float64 tolerance) rounding.
ENERGY_FLOOR = -60.0


def softmax_attention(q, k, v, scale: float | None = None, query_chunk_size: int | None = None) -> torch.Tensor:
    """softmax_j(scale·qᵢ·kⱼ) v for q (B, h, N, c), k (B, h, M, c), v (B, h, M, cv) -> (B, h, N, cv).

    On the CPU: ``_ChunkedSoftmaxAttention``, ``query_chunk_size`` queries at a time (default
    ``specs.query_chunk``), exact FLOPs for unequal widths (SAGAN/PAM: c = C/8, cv = C; gaussian: c = C,
    cv = C/2), the shifted energies floored at ``ENERGY_FLOOR``. Not SDPA there, although its CPU
    flash kernel is faster on mild energies (training step at N = 16384, M = 4096,
    c = cv = 128, 1 thread: 0.95 s against 1.1-1.3 s): once rows peak (energy spreads past ~90,
    as trained unscaled non-local and SAGAN energies do) its probabilities turn into float32
    denormals and the same step takes 11.6 s against 1.2 s here; unequal widths it would also pad.
    On other devices, where denormals cost nothing, and when tracing (ONNX export: SDPA has an
    export, a chunk loop would fix N in the graph), without ``query_chunk_size``:
    ``F.scaled_dot_product_attention``. Either way no (N, M) tensor exists, forward or backward:
    at most one (batch·heads, chunk, M) block of energies.

    Half-precision inputs: energies, softmax and sums run in float32 and the result is cast back.
    Gradients are exact; a second derivative (``create_graph=True``) is not supported on the
    chunked path and raises (use ``implementation="naive"``).
    """
    if scale is None:
        scale = 1.0
    if torch.jit.is_tracing() or (q.device.type != "cpu" and query_chunk_size is None):
        return _flash_attention(q, k, v, scale)
    dtype, wide = v.dtype, work_dtype(v.dtype)
    *lead, n, _ = q.shape
    m, cv = k.shape[-2], v.shape[-1]
    chunk = specs.query_chunk(math.prod(lead), m) if query_chunk_size is None else int(query_chunk_size)
    if chunk < 1:
        raise ValueError(f"softmax_attention: query_chunk_size must be >= 1, got {query_chunk_size!r}")
    with without_autocast(q.device):
        # the scale is folded into q once (N·c products instead of N·M), after the cast (a
        # half-precision q·scale would round the energies), outside the Function so that autograd
        # carries it and the casts back to the caller's q. Row-major copies (N·c, not N·M): the
        # blocks hand over channels-first views, and the products want row-major operands
        q3, k3, v3 = (t.reshape(-1, *t.shape[-2:]).contiguous() for t in (q.to(wide) * scale, k.to(wide), v.to(wide)))
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q3, k3, v3)):
            out = _ChunkedSoftmaxAttention.apply(q3, k3, v3, chunk)
        else:
            out = _attend(q3, k3, v3, chunk)[0]
    return out.reshape(*lead, n, cv).to(dtype)


def _flash_attention(q, k, v, scale: float) -> torch.Tensor:
    """SDPA on one head width: the narrower of q/k and v zero-padded (padding q and k leaves
    qᵢ·kⱼ unchanged, padding v adds output columns that are dropped)."""
    cv = v.shape[-1]
    width = max(q.shape[-1], cv)
    q, k, v = (F.pad(t, (0, width - t.shape[-1])).contiguous() for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, scale=float(scale))[..., :cv]


def _attend(q, k, v, chunk: int, with_lse: bool = False):
    """softmax(q kᵀ) v for q (G, N, c), k (G, M, c), v (G, M, cv), ``chunk`` queries at a time;
    also the per-query log-sum-exp of the energies (G, N, 1) when asked (else None)."""
    n = q.shape[1]
    out = q.new_empty(q.shape[0], n, v.shape[-1])
    lse = q.new_empty(q.shape[0], n, 1) if with_lse else None
    kt = k.transpose(1, 2)
    for rows, p in _chunks(q, k, chunk):
        torch.bmm(q[:, rows], kt, out=p)  # (G, chunk, M) energies, then in place the unnormalised P
        top = p.amax(-1, keepdim=True)
        p.sub_(top).clamp_(min=ENERGY_FLOOR).exp_()
        total = p.sum(-1, keepdim=True)
        out[:, rows] = torch.bmm(p, v).div_(total)
        if lse is not None:
            lse[:, rows] = top + total.log()
    return out, lse


def _chunks(q, k, chunk: int, buffers: int = 1):
    """(query slice, ``buffers`` (G, rows, M) tensors) for each chunk of q's rows. The buffers are
    views of one allocation each, reused chunk after chunk: a fresh 16 MiB block per chunk costs
    its page faults wherever the allocator maps large blocks afresh (glibc with a low
    M_MMAP_THRESHOLD, as benchmarks/bench.py runs: the SAGAN training step at 128², 1 thread,
    0.75× the naive time with reuse, 1.04× without)."""
    (g, n, _), m = q.shape, k.shape[1]
    stores = [q.new_empty(g * min(chunk, n) * m) for _ in range(buffers)]
    for i in range(0, n, chunk):
        r = min(chunk, n - i)
        yield (slice(i, i + r), *(store[: g * r * m].view(g, r, m) for store in stores))


class _ChunkedSoftmaxAttention(torch.autograd.Function):
    """O = softmax(q kᵀ) v for q (G, N, c), k (G, M, c), v (G, M, cv) (scale already in q), a query
    chunk at a time, keeping only O and the log-sum-exp L (G, N, 1) for the backward.

    The backward recomputes each chunk's P = exp(q kᵀ − L) (one more q kᵀ: a training step does
    (8c + 6cv)·NM FLOPs against the materialising path's (6c + 6cv)·NM) and uses
    Dᵢ = Σ_d dOᵢ_d Oᵢ_d = Σⱼ Pᵢⱼ dPᵢⱼ, so dS = P ∘ (dO vᵀ − D) needs no second pass over the keys:
    dq = dS k, dk = dSᵀ q, dv = Pᵀ dO, summed over the chunks. Not twice differentiable.
    """

    @staticmethod
    def forward(ctx, q, k, v, chunk):
        out, lse = _attend(q, k, v, chunk, with_lse=True)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.chunk = chunk
        return out

    @staticmethod
    def backward(ctx, d_out):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "softmax_attention: the chunked path has no second derivative (backward with "
                "create_graph=True); build the block with implementation='naive' for that"
            )
        q, k, v, out, lse = ctx.saved_tensors
        with without_autocast(q.device):
            d_out = d_out.to(out.dtype).contiguous()  # the blocks' layout changes hand it over transposed
            delta = (d_out * out).sum(-1, keepdim=True)  # Dᵢ (G, N, 1)
            # dk accumulated transposed (c, M) and vᵀ laid out row-major once: the products that
            # read them run 1.5× (dkᵀ += qᵀ dS) and 1.3× (dO vᵀ) faster than on the transposed views
            dq = torch.empty_like(q)
            dkt = q.new_zeros(k.shape[0], k.shape[2], k.shape[1])
            dv = torch.zeros_like(v)
            kt, vt = k.transpose(1, 2), v.transpose(1, 2).contiguous()
            for rows, p, ds in _chunks(q, k, ctx.chunk, buffers=2):
                qc, doc = q[:, rows], d_out[:, rows]
                torch.bmm(qc, kt, out=p).sub_(lse[:, rows]).clamp_(min=ENERGY_FLOOR).exp_()  # P (G, chunk, M)
                dv.baddbmm_(p.transpose(1, 2), doc)
                torch.bmm(doc, vt, out=ds).sub_(delta[:, rows]).mul_(p)  # dS = P ∘ (dP − D)
                dq[:, rows] = torch.bmm(ds, k)
                dkt.baddbmm_(qc.transpose(1, 2), ds)
        return dq, dkt.transpose(1, 2), dv, None


def dot_product_attention(q, k, v, scale: float | None = None) -> torch.Tensor:
    """(scale/M)·(q kᵀ) v as q ((kᵀ v)·scale/M): (c × cv) per head instead of N × M, linear in N.

    The sums over keys run in float32 (or wider) and are divided by M before anything is rounded
    back, so half precision overflows only where the result itself does."""
    factor = (1.0 if scale is None else float(scale)) / k.shape[-2]
    wide = work_dtype(q.dtype)
    with without_autocast(q.device):
        kv = (k.to(wide).transpose(-1, -2) @ v.to(wide)) * factor
        # (kvᵀ qᵀ)ᵀ: the same values, laid out channels-first as the blocks' convs produce and read
        # them, so their layout changes around the kernel are views, not copies (training step at
        # 128², C = 256, 1 thread: 0.22 s against 0.28 s)
        return (kv.transpose(-1, -2) @ q.to(wide).transpose(-1, -2)).transpose(-1, -2).to(q.dtype)


def concatenation_attention(a, b, v) -> torch.Tensor:
    """(1/M) Σⱼ ReLU(aᵢ + bⱼ) vⱼ for a (B, h, N), b (B, h, M), v (B, h, M, cv) -> (B, h, N, cv).

    The keys with bⱼ > −aᵢ (exactly those with aᵢ + bⱼ > 0) are a prefix of the keys sorted by b
    descending, of length nᵢ found by binary search, so the sum is aᵢ·G[nᵢ] + BG[nᵢ] with G, BG
    the prefix sums of v and b·v in that order (float32 or wider): O((N + M) log M) time,
    O((N + M)·cv) memory.
    """
    dtype, m = v.dtype, b.shape[-1]
    a, b, v = (t.to(work_dtype(dtype)) for t in (a, b, v))
    b_sorted, order = torch.sort(b, dim=-1, descending=True)
    v_sorted = torch.gather(v, -2, order[..., None].expand_as(v))
    zero = v.new_zeros(*v.shape[:-2], 1, v.shape[-1])
    sum_v = torch.cat([zero, v_sorted.cumsum(-2)], -2)  # (B, h, M + 1, cv)
    sum_bv = torch.cat([zero, (v_sorted * b_sorted[..., None]).cumsum(-2)], -2)
    # nᵢ = #{j : bⱼ > −aᵢ} = #{j : −bⱼ < aᵢ}, and −b_sorted is ascending
    count = torch.searchsorted((-b_sorted).contiguous(), a.contiguous(), side="left")
    index = count[..., None].expand(*count.shape, v.shape[-1])  # (B, h, N, cv)
    y = a[..., None] * torch.gather(sum_v, -2, index) + torch.gather(sum_bv, -2, index)
    return (y / m).to(dtype)
