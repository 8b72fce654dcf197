"""Classical non-local means (scikit-image ``denoise_nl_means``, fast_mode=False), vectorised in torch.

The semantics are the reference's (``nlattn.numpy_ref.nl_means``), quirks included: reflect-padded
patches, a search window clipped at the image border, the Gaussian patch kernel normalised to
1 / (C·h²), the early-exit cutoff tested on the partial sums of patch rows 0 … s−2 only, and
scikit-image's bit-trick ``fast_exp`` instead of exp.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..specs import FAST_EXP_A, FAST_EXP_BC, NL_MEANS_DISTANCE_CUTOFF, NonLocalMeansConfig
from ._base import Block, without_autocast, work_dtype


def fast_exp(y: torch.Tensor) -> torch.Tensor:
    """scikit-image's approximate exp for y ≤ 0, bit for bit, in float64 (0 where its integer wraps):
    the upper 32 bits of a float64 are trunc(EXP_A·y) + EXP_BC, the lower 32 bits zero.
    A staircase: its derivative is 0 almost everywhere (see ``fast_exp_envelope``)."""
    hi = (torch.trunc(FAST_EXP_A * y.to(torch.float64)) + FAST_EXP_BC).clamp(min=0)
    return (hi.to(torch.int64) << 32).view(torch.float64)


def fast_exp_envelope(y: torch.Tensor) -> torch.Tensor:
    """The continuous piecewise-linear function that ``fast_exp`` samples (float64, differentiable):
    slope 2**(E − 1023) / ln 2 inside the binade of exponent E, 0 where fast_exp's integer wraps."""
    hi = (FAST_EXP_A * y.to(torch.float64) + FAST_EXP_BC).clamp(min=0) / 2.0**20
    exponent = torch.floor(hi.detach())
    return torch.where(hi > 0, torch.ldexp(1.0 + (hi - exponent), exponent - 1023), 0.0)


class NonLocalMeans(Block):
    """Non-local means of x (B, C, H, W) -> (B, C, H, W); no parameters, no attention map.

    Each batch item is one C-channel image whose channels share their patch weights. Candidates of
    pixel (r, c) are the image pixels within ``patch_distance`` (clipped at the border); their
    weight is fast_exp(−max(0, D)) for the noise-corrected, kernel-weighted patch distance D, or 0
    if a partial row sum exceeds 5. Runs in the input's dtype (float32 for bfloat16/float16).
    Gradients are those of the reference's definition: the filter with fast_exp replaced by its
    continuous piecewise-linear envelope (``fast_exp_envelope``), the
    cutoff and the clamp max(0, D) being the ordinary where/maximum they are. The forward value
    stays the bit-trick one: out = filter(fast_exp) + (e − e.detach()), e = filter(envelope),
    where the added term is exactly 0 (computed only when x requires grad). ``implementation``
    is accepted and has no effect (there is one path).
    """

    config_class = NonLocalMeansConfig

    def forward(self, x):
        """x (B, C, H, W) -> the filtered image (B, C, H, W), same dtype."""
        self.check_input(x)
        with without_autocast(x.device):
            return self._straight_through(x.to(work_dtype(x.dtype))).to(x.dtype)

    def _straight_through(self, xw):
        """The filter of xw in its dtype: the bit trick's value, the envelope's derivatives."""
        if not (torch.is_grad_enabled() and xw.requires_grad):
            return self._filter(xw, fast_exp)
        with torch.no_grad():
            out = self._filter(xw, fast_exp)
        envelope = self._filter(xw, fast_exp_envelope)
        return out + (envelope - envelope.detach())

    def _filter(self, xw, exp):
        """The filter on xw (B, C, H, W) with ``exp`` as the weight function of −max(0, D)."""
        cfg = self.spec
        b, c, height, width = xw.shape
        s, d, o = cfg.patch_size, cfg.patch_distance, cfg.patch_size // 2
        kernel = torch.as_tensor(cfg.patch_kernel(c), dtype=xw.dtype, device=xw.device)  # (s, s)
        noise = c * 2.0 * cfg.sigma * cfg.sigma

        patches = F.pad(xw, (o, o, o, o), mode="reflect")  # every pixel has a full patch
        hp, wp = height + 2 * o, width + 2 * o
        others = F.pad(patches, (d, d, d, d))  # shifted by up to ±d (0 outside)
        values = F.pad(xw, (d, d, d, d))
        rows_in = torch.arange(height, device=xw.device)
        cols_in = torch.arange(width, device=xw.device)[None, :] + torch.arange(-d, d + 1, device=xw.device)[:, None]
        col_ok = (cols_in >= 0) & (cols_in < width)  # (n_off, W): candidate column in the image

        num = torch.zeros_like(xw)
        den = xw.new_zeros(b, height, width)
        for di in range(-d, d + 1):  # offset rows in a loop, offset columns vectorised
            if abs(di) >= height:  # no centre has its candidate row in the image
                continue
            row_ok = ((rows_in + di >= 0) & (rows_in + di < height))[:, None]  # (H, 1)
            strip = others[:, :, d + di : d + di + hp].unfold(-1, wp, 1)  # (B, C, hp, n_off, wp)
            sq = ((patches[:, :, :, None] - strip) ** 2).sum(1) - noise  # (B, hp, n_off, wp)
            # R[k, .., r, j, c] = Σ_l sq[.., r, j, c + l]·w[k, l]; patch row k of centre r is R[k] at r + k
            rk = torch.einsum("brjcl,kl->kbrjc", sq.unfold(-1, s, 1), kernel)  # (s, B, hp, n_off, W)
            partial = rk[0, :, :height].clone()  # (B, H, n_off, W)
            cut = torch.zeros_like(partial, dtype=torch.bool)
            for k in range(1, s):  # tested before rows 1 … s−1 are added: the partial sums of rows 0 … s−2
                cut |= partial > NL_MEANS_DISTANCE_CUTOFF
                partial += rk[k, :, k : k + height]
            keep = ~cut & row_ok[:, None, :] & col_ok  # (B, H, n_off, W)
            weight = torch.where(keep, exp(-partial.clamp(min=0)), 0.0).to(xw.dtype)
            cand = values[:, :, d + di : d + di + height].unfold(-1, width, 1)  # (B, C, H, n_off, W)
            num = num + torch.einsum("bhjw,bchjw->bchw", weight, cand)
            den = den + weight.sum(2)
        return num / den[:, None]
