"""The fast attention kernels: exact re-formulations that never form the (N, M) relation matrix.

The same names, signatures and layout in ``nlattn/tf/kernels.py`` and ``nlattn/jax/kernels.py``:
heads lead, positions next, channels last — q (B, h, N, c), k (B, h, M, c), v (B, h, M, cv) ->
(B, h, N, cv). Each returns A v for the block's relation A, including its 1/M where the relation
has one (dot_product, concatenation), so a block never divides afterwards. ``scale=None`` means
no scaling of the energies (not SDPA's 1/√c).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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


def softmax_attention(q, k, v, scale: float | None = None) -> torch.Tensor:
    """softmax_j(scale·qᵢ·kⱼ) v through ``F.scaled_dot_product_attention`` (the flash kernel on CPU,
    which tiles the queries itself).

    The CPU flash kernel needs one head width for q, k and v, so the narrower side is zero-padded:
    padding q and k leaves qᵢ·kⱼ unchanged, padding v adds output columns that are dropped.
    (Measured at N = 128², c = 32, cv = 256: padding runs in 0.7× the materialising time; one call
    per c-wide slice of v needs less memory but twice the time.)
    """
    c, cv = q.shape[-1], v.shape[-1]
    width = max(c, cv)
    q, k, v = (F.pad(t, (0, width - t.shape[-1])).contiguous() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, scale=1.0 if scale is None else float(scale))
    return out[..., :cv]


def dot_product_attention(q, k, v, scale: float | None = None) -> torch.Tensor:
    """(scale/M)·(q kᵀ) v as q ((kᵀ v)·scale/M): (c × cv) per head instead of N × M, linear in N.

    The sums over keys run in float32 (or wider) and are divided by M before anything is rounded
    back, so half precision overflows only where the result itself does."""
    factor = (1.0 if scale is None else float(scale)) / k.shape[-2]
    wide = work_dtype(q.dtype)
    with without_autocast(q.device):
        kv = (k.to(wide).transpose(-1, -2) @ v.to(wide)) * factor
        return (q.to(wide) @ kv).to(q.dtype)


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
