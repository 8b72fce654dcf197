"""Classical non-local means (scikit-image ``denoise_nl_means``, both modes), vectorised in torch.

The semantics are the reference's (``nlattn.numpy_ref.nl_means``), quirks included. fast_mode=False:
reflect-padded patches, a search window clipped at the image border, the Gaussian patch kernel
normalised to 1 / (C·h²), the early-exit cutoff tested on the partial sums of patch rows 0 … s−2
only. fast_mode=True: an unclipped window over the image reflect-padded by s//2 + d + 1, uniform
(s−1)² box distances over C·h²·s², weight 0 above the cutoff. Both use scikit-image's bit-trick
``fast_exp`` instead of exp.

Speed: a pair's weight is symmetric, so only half of the (2d+1)² offsets are computed
(``NonLocalMeansConfig.half_window``), each row of them at once; the Gaussian patch kernel is
applied as two 1-D passes, the box as two running sums.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..specs import FAST_EXP_A, FAST_EXP_BC, NL_MEANS_DISTANCE_CUTOFF, NonLocalMeansConfig
from ._base import Block, without_autocast, work_dtype

#: float64 exponent bias minus float32's (1023 − 127), in units of the high word's exponent field
_REBIAS = (1023 - 127) << 20


def fast_exp(y: torch.Tensor) -> torch.Tensor:
    """scikit-image's approximate exp for y ≤ 0 (0 where its integer wraps, and for NaN), in y's dtype:
    the upper 32 bits of a float64 are trunc(EXP_A·y) + EXP_BC, the lower 32 bits zero. Bit for bit
    in float64; below float64, the same 20-bit mantissa written as a float32 (exponent re-biased),
    from float32 arithmetic (0 below float32's normal range). A staircase: its derivative is 0
    almost everywhere (see ``fast_exp_envelope``)."""
    if y.dtype == torch.float64:
        hi = (torch.trunc(FAST_EXP_A * y) + FAST_EXP_BC).clamp(min=0)
        return torch.where(torch.isnan(y), 0.0, (hi.to(torch.int64) << 32).view(torch.float64))
    y32 = torch.where(y > -1000.0, y.float(), -1000.0)  # NaN → −1000 → 0; |trunc| < 2**31 below
    hi = torch.trunc(y32 * FAST_EXP_A).to(torch.int32) + (FAST_EXP_BC - _REBIAS)
    bits = torch.where(hi > 0, hi << 3, 0)  # 20 → 23 mantissa bits
    return bits.view(torch.float32).to(y.dtype)


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
        if self.spec.fast_mode:
            if exp is fast_exp and self._tiled_applies(xw):
                return self._tiled_integral_image_filter(xw)
            return self._integral_image_filter(xw, exp)
        return self._pixelwise_filter(xw, exp)

    def _pixelwise_filter(self, xw, exp):
        """fast_mode=False: Gaussian patch distances, the row-wise cutoff, a clipped window."""
        cfg = self.spec
        b, c, height, width = xw.shape
        s, d, o = cfg.patch_size, cfg.patch_distance, cfg.patch_size // 2
        rows_w, cols_w = cfg.separable_kernel(c)
        noise = c * 2.0 * cfg.sigma * cfg.sigma
        wp = width + 2 * o
        patches = F.pad(xw, (o, o, o, o), mode="reflect")  # every pixel has a full patch
        others = F.pad(patches, (d, d))  # shifted by up to ±d columns (0 outside)
        values = F.pad(xw, (d, d))
        num = torch.zeros_like(xw)
        den = xw.new_zeros(b, height, width)
        cols = torch.arange(width, device=xw.device)
        for di, js in cfg.half_window():
            hc = height - di  # centres whose candidate row is in the image
            if hc <= 0:
                continue
            j0, hr = js[0], hc + 2 * o
            strip = others[:, :, di : di + hr].unfold(-1, wp, 1)[:, :, :, d + j0 :]  # (B, C, hr, n, wp)
            sq = _channel_sum(torch.square(patches[:, :, :hr, None] - strip)) - noise  # (B, hr, n, wp)
            line = sq[..., :width] * cols_w[0]  # Gaussian along the patch rows
            for l in range(1, s):
                line = torch.add(line, sq[..., l : l + width], alpha=cols_w[l])
            partial = line[:, :hc] * rows_w[0]  # (B, hc, n, W), then patch row by patch row
            highest = None
            for k in range(1, s):  # tested before rows 1 … s−1 are added: partial sums of rows 0 … s−2
                if cfg.sigma > 0:  # terms can be negative: any partial sum may be the one above 5
                    highest = partial if highest is None else torch.maximum(highest, partial)
                partial = torch.add(partial, line[:, k : k + hc], alpha=rows_w[k])
                if cfg.sigma == 0 and k == s - 2:  # terms ≥ 0: the partial sums only grow
                    highest = partial
            shifted = cols[None, :] + torch.tensor(js, device=xw.device)[:, None]
            drop = ((shifted < 0) | (shifted >= width))[None, None]  # (1, 1, n, W)
            if highest is not None:
                drop = drop | (highest > NL_MEANS_DISTANCE_CUTOFF)
            weight = torch.where(drop, 0.0, exp(-partial.clamp(min=0))).to(xw.dtype)  # (B, hc, n, W)
            cand = values[:, :, di : di + hc].unfold(-1, width, 1)[:, :, :, d + j0 :]  # (B, C, hc, n, W)
            num = num + F.pad((weight[:, None] * cand).sum(3), (0, 0, 0, di))
            den = den + F.pad(weight.sum(2), (0, 0, 0, di))
            # the candidate (r + di, c + dj) gets the same weight for the centre (r, c)
            given = F.pad(weight[:, None] * xw[:, :, :hc, None], (d, d))  # (B, C, hc, n, W + 2d)
            num = num + F.pad(_skewed_sum(given, d, j0, width, di == 0), (0, 0, di, 0))
            den = den + F.pad(_skewed_sum(F.pad(weight, (d, d)), d, j0, width, di == 0), (0, 0, di, 0))
        return num / den[:, None]

    def _integral_image_filter(self, xw, exp):
        """fast_mode=True: uniform box distances, an unclipped window over the reflect-padded image."""
        cfg = self.spec
        b, c, height, width = xw.shape
        d, o, pad = cfg.patch_distance, cfg.patch_size // 2, cfg.fast_mode_pad
        noise = c * 2.0 * cfg.sigma * cfg.sigma
        scale = cfg.fast_mode_scale(c)
        padded = _reflect(xw, pad)  # (B, C, H + 2P, W + 2P)
        wide = F.pad(padded, (d, d))  # column slices of every offset stay in range
        # weights are computed for the centres A whose pair (A, A + u) has A or A + u in the image:
        # rows P − di … P + H − 1, columns P − d … P + W + d − 1 (the widest row of offsets)
        ne_c, box = width + 2 * d, 2 * o
        num = torch.zeros_like(xw)
        den = xw.new_zeros(b, height, width)
        for di, js in cfg.half_window():
            n, j0, ne_r = len(js), js[0], height + di
            lo = pad - di - o + 1  # first row of the box pixels (rows of squared differences)
            rows, cols = ne_r + box - 1, ne_c + box - 1
            centre = wide[:, :, lo : lo + rows, pad - o + 1 : pad - o + 1 + cols]
            strip = wide[:, :, lo + di : lo + di + rows, pad - o + 1 + j0 : pad - o + 1 + d + cols]
            sq = _channel_sum(torch.square(centre[:, :, :, None] - strip.unfold(-1, cols, 1))) - noise
            if o == 0:  # the integral image's four corners coincide: an empty box, distance 0
                dist = sq.new_zeros(b, ne_r, n, ne_c)
            else:
                line = _running_sum(sq, box, -1)  # (B, rows, n, ne_c)
                dist = _running_sum(line, box, 1).clamp(min=0) / scale  # (B, ne_r, n, ne_c)
            weight = torch.where(dist > NL_MEANS_DISTANCE_CUTOFF, 0.0, exp(-dist)).to(xw.dtype)
            own = weight[:, di : di + height, :, d : d + width]  # centres in the image: (B, H, n, W)
            cand = wide[:, :, pad + di : pad + di + height, pad + d + j0 : pad + 2 * d + width].unfold(-1, width, 1)
            num = num + (own[:, None] * cand).sum(3)
            den = den + own.sum(2)
            # A + u in the image gets the weight of the pair from A = (P − di + r, P − d + c) ...
            source = padded[:, :, pad - di : pad + height, pad - d : pad + width + d]  # (B, C, ne_r, ne_c)
            given = weight[:, None] * source[:, :, :, None]
            num = num + _skewed_sum(given, d, j0, width, di == 0)[:, :, :height]
            den = den + _skewed_sum(weight, d, j0, width, di == 0)[:, :height]
        return num / den[:, None]

    #: elements of one tile of squared differences (offsets × rows × columns): 512 KiB in float32,
    #: so that a tile's dozen passes run in a core's L2 cache rather than in memory
    TILE_ELEMENTS = 1 << 17

    def _tiled_applies(self, xw) -> bool:
        """Whether the tiled filter computes what ``_integral_image_filter`` does: a non-empty box,
        h > 0 and finite x (with NaN or inf, or h = 0, the bit trick sees NaN: the general path)."""
        cfg = self.spec
        return cfg.patch_size > 1 and cfg.h > 0 and bool(torch.isfinite(xw).all())

    def _tiled_integral_image_filter(self, xw):
        """fast_mode=True with ``fast_exp``, the forward without autograd: what
        ``_integral_image_filter`` computes, a tile (some offsets of one row of the window, some
        rows of centres) at a time with the offsets as the leading axis, so that every pass runs on
        contiguous planes held in cache. The box is summed by doubling (three adds for six), the
        noise and the scale come after it, and the bit trick works in place on the box distances
        with the cutoff as one masking pass: the same terms, float rounding apart."""
        cfg = self.spec
        b, c, height, width = xw.shape
        d, o, pad = cfg.patch_distance, cfg.patch_size // 2, cfg.fast_mode_pad
        box, scale = 2 * o, cfg.fast_mode_scale(c)
        wide = F.pad(_reflect(xw, pad), (d, d))  # (B, C, H + 2P, W + 2P + 2d)
        cols = width + 2 * d + box - 1  # box pixels of the centre columns P − d … P + W + d − 1
        num = torch.zeros_like(xw)
        den = xw.new_zeros(b, 1, height, width)
        for di, js in cfg.half_window():
            ne_r = height + di  # centre rows P − di … P + H − 1: A or A + u in the image
            # ~32 centre rows a tile (the box's halo rows are computed twice), as many offsets as fit
            group = max(1, min(len(js), self.TILE_ELEMENTS // (b * c * (32 + box - 1) * cols)))
            tile = max(1, self.TILE_ELEMENTS // (b * c * group * cols) - box + 1)
            for g0 in range(0, len(js), group):
                dj = js[g0 : g0 + group]
                for r0 in range(0, ne_r, tile):
                    t = min(tile, ne_r - r0)
                    weight = self._tile_weights(wide, di, dj, pad - di + r0, t, cols, box, scale)
                    self._accumulate(num, den, weight, wide, di, dj, r0, t, pad)
        return num / den

    def _tile_weights(self, wide, di, dj, top, t, cols, box, scale):
        """Weights (B, n, t, W + 2d) of the offsets (di, dj …) for t centre rows from padded row
        ``top`` and every centre column: 0 above the cutoff, else fast_exp(−max(0, D))."""
        cfg = self.spec
        o, pad = cfg.patch_size // 2, cfg.fast_mode_pad
        b, c = wide.shape[:2]
        rows, first, n = t + box - 1, pad - o + 1, len(dj)
        lo = top - o + 1  # squared differences at the box pixels of the t centres
        centre = wide[:, :, lo : lo + rows, first : first + cols]
        start = first + dj[0]  # the column of the box's left edge for offset dj[0], in ``wide``
        other = wide[:, :, lo + di : lo + di + rows, start : start + cols + n - 1].unfold(-1, cols, 1)
        sq = torch.sub(centre[:, :, None], other.transpose(2, 3), out=wide.new_empty(b, c, n, rows, cols))
        sq = _channel_sum(sq.square_())  # (B, n, rows, cols)
        dist = _window_sum(_window_sum(sq, box, -1), box, -2)  # box sums (B, n, t, W + 2d)
        if cfg.sigma > 0:
            dist = dist.sub_(box * box * c * 2.0 * cfg.sigma * cfg.sigma).clamp_(min=0)
        # the cutoff as a bit mask, all ones where D ≤ cutoff: the sign of cutoff·scale − box spread
        # over the word by an arithmetic shift (a comparison and masked_fill are 10× slower on CPU)
        bits = torch.int64 if dist.dtype == torch.float64 else torch.int32
        keep = torch.sub(NL_MEANS_DISTANCE_CUTOFF * scale, dist).view(bits)
        keep = keep.bitwise_right_shift_(8 * dist.element_size() - 1).bitwise_not_()
        # fast_exp(−box / scale) in place: the bit pattern from trunc(−A·box / scale)
        hi = dist.mul_(-FAST_EXP_A / scale).to(bits)
        if bits == torch.int64:
            hi = hi.add_(FAST_EXP_BC).bitwise_left_shift_(32)
        else:
            hi = hi.add_(FAST_EXP_BC - _REBIAS).bitwise_left_shift_(3)
        return hi.bitwise_and_(keep).view(dist.dtype)

    def _accumulate(self, num, den, weight, wide, di, dj, r0, t, pad):
        """Adds a tile's weights to num (B, C, H, W) and den (B, 1, H, W), both ways: the centre A
        in the image gets w·x(A + u), A + u in the image gets w·x(A)."""
        d = self.spec.patch_distance
        height, width = num.shape[-2:]
        ne_c = weight.shape[-1]
        # centres in the image: tile rows r0 + i ≥ di are image rows r0 + i − di
        i0, i1 = max(0, di - r0), min(t, height + di - r0)
        if i0 < i1:
            own = weight[:, None, :, i0:i1, d : d + width]  # (B, 1, n, m, W)
            top = pad + r0 + i0  # the image row of A + u in padded rows: (r0 + i0 − di) + di
            cand = wide[:, :, top : top + i1 - i0, d + pad + dj[0] : d + pad + dj[-1] + width]
            cand = cand.unfold(-1, width, 1).transpose(2, 3)  # (B, C, n, m, W)
            rows = slice(r0 + i0 - di, r0 + i1 - di)
            num[:, :, rows].add_((own * cand).sum(2))
            den[:, :, rows].add_(own.sum(2))
        # A + u in the image: tile rows r0 + i < H are the image rows of A + u
        i1 = min(t, height - r0)
        if i1 > 0:
            skip = 1 if di == 0 and dj[0] == 0 else 0  # u = (0, 0): counted once, above
            w = weight[:, :, :i1]
            source = wide[:, :, pad - di + r0 : pad - di + r0 + i1, pad : pad + ne_c]  # x(A), A's columns
            given = w[:, None] * source[:, :, None]  # (B, C, n, i1, W + 2d)
            rows = slice(r0, r0 + i1)
            num[:, :, rows].add_(_skewed_offset_sum(given, d, dj[0], width, skip))
            den[:, :, rows].add_(_skewed_offset_sum(w[:, None], d, dj[0], width, skip))


def _channel_sum(t: torch.Tensor) -> torch.Tensor:
    """Σ over the channel axis 1 (a view for one channel)."""
    return t[:, 0] if t.shape[1] == 1 else t.sum(1)


def _running_sum(t: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """Sums of k consecutive entries along dim (length L -> L − k + 1), added one by one."""
    total = t.narrow(dim, 0, t.shape[dim] - k + 1)
    for i in range(1, k):
        total = total + t.narrow(dim, i, t.shape[dim] - k + 1)
    return total


def _skewed_sum(t: torch.Tensor, d: int, j0: int, width: int, skip_first: bool) -> torch.Tensor:
    """Σ_j t[..., j, d − dj + c] over the offsets dj = j0 + j of one row: (..., n, W + 2d) -> (..., W).

    Entry (j, c) of the skewed view sits at column d − dj + c, i.e. one column further left per
    offset: the offset axis has stride (W + 2d) − 1. ``skip_first`` leaves out j = 0 (the pixel
    itself, u = (0, 0), which was counted once already).
    """
    t = t.contiguous()
    n = t.shape[-2]
    size = (*t.shape[:-2], n, width)
    stride = (*t.stride()[:-2], t.stride(-2) - 1, 1)
    view = t.as_strided(size, stride, t.storage_offset() + d - j0)
    return (view[..., 1:, :] if skip_first else view).sum(-2)


def _window_sum(t: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """Sums of k consecutive entries along dim (length L -> L − k + 1) by doubling: sums of 1, 2,
    4 … entries, added where k's binary digits need them (three adds for k = 6, not five)."""
    length = t.shape[dim] - k + 1
    total: torch.Tensor | None = None
    done, span, part = 0, 1, t  # part: sums of ``span`` entries
    while True:
        if k & span:
            piece = part.narrow(dim, done, length)
            total = piece if total is None else total + piece
            done += span
        if 2 * span > k:
            assert total is not None  # k ≥ 1 has a highest binary digit
            return total
        m = part.shape[dim] - span
        part, span = part.narrow(dim, 0, m) + part.narrow(dim, span, m), 2 * span


def _skewed_offset_sum(t: torch.Tensor, d: int, j0: int, width: int, skip_first: int) -> torch.Tensor:
    """Σ_j t[..., j, r, d − dj + c] over offsets dj = j0 + j: (..., n, m, W + 2d) -> (..., m, W).

    ``_skewed_sum`` with the offsets ahead of the rows: entry (j, r, c) of the view sits one
    column further left per offset, the offset axis has stride m·(W + 2d) − 1. ``skip_first``
    leaves out j = 0 (the pixel itself)."""
    t = t.contiguous()
    n, m = t.shape[-3], t.shape[-2]
    size = (*t.shape[:-3], n - skip_first, m, width)
    stride = (*t.stride()[:-3], t.stride(-3) - 1, t.stride(-2), 1)
    offset = t.storage_offset() + d - j0 + skip_first * (t.stride(-3) - 1)
    return t.as_strided(size, stride, offset).sum(-3)


def _reflect(x: torch.Tensor, pad: int) -> torch.Tensor:
    """NumPy ``mode='reflect'`` padding of the last two axes by ``pad``, any pad (F.pad needs
    pad < size; NumPy reflects again as often as needed, a period of 2·(size − 1))."""
    for axis in (-2, -1):
        size = x.shape[axis]
        period = max(2 * (size - 1), 1)
        idx = torch.remainder(torch.arange(-pad, size + pad, device=x.device), period)
        x = x.index_select(axis, torch.where(idx < size, idx, period - idx))
    return x
