"""Classical non-local means (Buades et al. 2005), as scikit-image's ``denoise_nl_means`` computes it.

x is (B, C, H, W); every batch item is one C-channel image whose channels share their patch weights
(scikit-image's ``channel_axis``). The output has the same shape. Both of scikit-image's 2-D
algorithms are reproduced quirk for quirk, so that they can be checked against it
(tests/test_reference_nl_means.py). ``fast_mode=False`` (nlattn's default) is the *pixelwise*
algorithm:

* patches are s×s (s = patch_size, odd), centred on a pixel; the image is reflect-padded by s//2
  (NumPy ``mode='reflect'``, edge not repeated) so that every pixel has a full patch;
* the candidates of pixel (r, c) are the *image* pixels (i, j) with |i−r| ≤ d, |j−c| ≤ d
  (d = patch_distance): the search window is clipped at the image border, never padded, so border
  pixels average over fewer candidates;
* patch distance  D = Σ_{k,l,c} w[k,l]·((p[k,l,c] − q[k,l,c])² − 2σ²)  with a Gaussian kernel
  w[k,l] ∝ exp(−(k² + l²) / (2A²)), A = (s−1)/4, scaled so that Σw = 1 / (C·h²);
* early exit: D is accumulated patch row by patch row and, *before* each row is added, a partial sum
  greater than DISTANCE_CUTOFF = 5.0 sets the weight to exactly 0. So the partial sums after rows
  0 … s−2 are tested (strict >), the complete sum never is;
* otherwise the weight is fast_exp(−max(0, D)), Schraudolph's bit-trick approximation of exp
  (not exp: it is ~3 % off, e.g. fast_exp(0) ≈ 0.9710), and
  out[:, r, c] = Σ weight·x[:, i, j] / Σ weight. The pixel itself always has weight fast_exp(0) > 0.

``fast_mode=True`` (scikit-image's default; Darbon et al. 2008, Froment 2014) is another filter:

* the image is reflect-padded by P = s//2 + d + 1 (``fast_mode_pad``; NumPy ``reflect``, repeated
  when P exceeds the image), and the candidates of pixel (r, c) are *all* (2d+1)² pixels (r+i, c+j)
  of the padded image, |i|, |j| ≤ d: the search window is not clipped, reflected pixels take part;
* the patch distance has uniform weights and comes from an integral image: its box covers the
  (s−1)×(s−1) pixels at offsets −s//2+1 … s//2 from the centre (the four-corner difference of an
  integral image drops the first row and column of the s×s patch; s = 1 gives an empty box,
  distance 0, a plain box mean), D = max(0, Σ_box Σ_c ((p − q)² − 2σ²)) / (C·h²·s²), divided by
  s² although the box holds (s−1)² pixels;
* the weight is 0 where D > DISTANCE_CUTOFF, else fast_exp(−D) (D ≤ 5 there: no wrap);
  out = Σ weight·candidate / Σ weight. scikit-image visits each unordered pair of patches once
  (half-weights for the column offset 0, the pixel itself included); the sum is the same.

Two deliberate departures of the pixelwise algorithm, both outside the regime where
scikit-image's result is meaningful:

* patch_size = 1: scikit-image's kernel is exp(−0/0) = NaN there, its distances are NaN, and its
  C ``max(0, NaN)`` yields 0, so every weight is fast_exp(0): a plain box mean that ignores h and σ.
  We take the A → 0 limit of the kernel instead, a single tap w = 1 / (C·h²): a pixel-similarity
  (Yaroslavsky-type) filter over the search window.
* arguments of fast_exp below about −709: the bit trick's integer then goes negative and
  scikit-image returns a negative or NaN "weight" (seen with tiny h, when only the last patch row
  differs, so the cutoff does not fire). We return 0 there, the value exp would underflow towards.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..specs import FAST_EXP_A, FAST_EXP_BC, NL_MEANS_DISTANCE_CUTOFF, NonLocalMeansConfig
from ._common import defines, prepare

# scikit-image's constants, kept in the spec so that every implementation shares them
DISTANCE_CUTOFF = NL_MEANS_DISTANCE_CUTOFF
_EXP_A, _EXP_BC = FAST_EXP_A, FAST_EXP_BC


def fast_exp(y):
    """scikit-image's approximate exp for y ≤ 0, bit for bit (0 where its integer would wrap)."""
    y = np.asarray(y, dtype=np.float64)
    # C's (int32_t) cast truncates toward zero; the sum is an exact integer in float64
    hi = np.trunc(_EXP_A * y) + _EXP_BC
    hi = np.where(hi >= 0, hi, 0.0)  # a negative high word would set the sign bit: garbage weights
    return (hi.astype(np.int64) << 32).view(np.float64)


def fast_exp_envelope(y):
    """The continuous, piecewise-linear function that ``fast_exp`` samples (no truncation).

    fast_exp is a staircase: its steps are 2**-20 relative and 1/EXP_A ≈ 6.6e-7 wide, so its
    derivative is 0 almost everywhere and central differences of it measure the step size, not
    the filter. The derivative of NonLocalMeans is defined as that of this envelope, which is
    within 2**-20 of fast_exp and has slope 2**(E - 1023) / ln 2 inside the binade of exponent E.
    """
    hi = np.maximum(_EXP_A * np.asarray(y, dtype=np.float64) + _EXP_BC, 0.0) / 2.0**20
    exponent = np.floor(hi)
    value = np.ldexp(1.0 + (hi - exponent), exponent.astype(np.int64) - 1023)
    return np.where(hi > 0, value, 0.0)  # where fast_exp's integer would wrap it returns 0 too


def patch_kernel(patch_size: int, n_channels: int, h: float) -> np.ndarray:
    """The (s, s) Gaussian patch weights, summing to 1 / (C·h²) (``NonLocalMeansConfig.patch_kernel``)."""
    return NonLocalMeansConfig(patch_size=patch_size, h=h).patch_kernel(n_channels)


@defines("NonLocalMeans")
def non_local_means(x, weights=None, *, return_attention=False, training=False, stats=None, **config):
    """Non-local means of x (B, C, H, W) -> (B, C, H, W); no weights, no attention map.

    Config: patch_size=7 (odd), patch_distance=11, h=0.1, sigma=0.0, fast_mode=False (see the
    module docstring).
    """
    return _non_local_means(x, weights, return_attention, training, stats, config, fast_exp)


@defines("NonLocalMeans", derivative=True)
def non_local_means_envelope(x, weights=None, *, return_attention=False, training=False, stats=None, **config):
    """non_local_means with ``fast_exp_envelope``: what its derivatives are taken of."""
    return _non_local_means(x, weights, return_attention, training, stats, config, fast_exp_envelope)


def _non_local_means(x, weights, return_attention, training, stats, config, exp):
    cfg, ctx, x = prepare(NonLocalMeansConfig, x, weights, config, training, stats)
    if return_attention:
        raise ValueError("NonLocalMeans has no attention map")
    if cfg.fast_mode:
        return _integral_image_means(x, cfg, exp)
    return _pixelwise_means(x, cfg, exp)


def _pixelwise_means(x, cfg, exp):
    """fast_mode=False: Gaussian patch distances with the row-wise cutoff, clipped search window."""
    b, c, height, width = x.shape
    s, d, o = cfg.patch_size, cfg.patch_distance, cfg.patch_size // 2
    w = patch_kernel(s, c, cfg.h)
    # each term subtracts 2σ², the expected squared difference of two pixels with independent noise;
    # skimage subtracts it inside every channel's term, hence C times per patch pixel
    noise = c * 2.0 * cfg.sigma * cfg.sigma

    padded = np.pad(x, ((0, 0), (0, 0), (o, o), (o, o)), mode="reflect")
    num = np.zeros_like(x)
    den = np.zeros((b, height, width))
    # row-major over the offsets, like scikit-image's (i, j) loop, so the sums accumulate in its order
    for di in range(-d, d + 1):
        r0, r1 = max(0, -di), min(height, height - di)  # centres whose candidate row is in the image
        if r0 >= r1:
            continue
        for dj in range(-d, d + 1):
            c0, c1 = max(0, -dj), min(width, width - dj)
            if c0 >= c1:
                continue
            centre = padded[:, :, r0 : r1 + 2 * o, c0 : c1 + 2 * o]
            other = padded[:, :, r0 + di : r1 + di + 2 * o, c0 + dj : c1 + dj + 2 * o]
            sq = ((centre - other) ** 2).sum(axis=1) - noise  # (B, h+2o, w+2o)
            win = sliding_window_view(sq, (s, s), axis=(1, 2))  # (B, h, w, s, s)
            rows = np.einsum("bhwkl,kl->bhwk", win, w)  # weighted patch rows
            partial = np.cumsum(rows, axis=-1)
            # the test runs before rows 1 … s−1 are added: partial sums of rows 0 … s−2 only
            cut = (partial[..., :-1] > DISTANCE_CUTOFF).any(axis=-1)
            weight = np.where(cut, 0.0, exp(-np.maximum(partial[..., -1], 0.0)))
            num[:, :, r0:r1, c0:c1] += weight[:, None] * x[:, :, r0 + di : r1 + di, c0 + dj : c1 + dj]
            den[:, r0:r1, c0:c1] += weight
    return num / den[:, None]


def _integral_image_means(x, cfg, exp):
    """fast_mode=True: uniform (s−1)² box distances over a reflect-padded, unclipped search window."""
    b, c, height, width = x.shape
    d, o, pad = cfg.patch_distance, cfg.patch_size // 2, cfg.fast_mode_pad
    noise = c * 2.0 * cfg.sigma * cfg.sigma  # per box pixel, summed over channels as in skimage
    scale = cfg.fast_mode_scale(c)
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode="reflect")
    # squared differences are needed at the box pixels of every centre: rows pad−o+1 … pad+H+o−1
    lo, n_rows, n_cols = pad - o + 1, height + 2 * o - 1, width + 2 * o - 1
    centre = padded[:, :, lo : lo + n_rows, lo : lo + n_cols]
    num = np.zeros_like(x)
    den = np.zeros((b, height, width))
    for di in range(-d, d + 1):
        for dj in range(-d, d + 1):
            other = padded[:, :, lo + di : lo + di + n_rows, lo + dj : lo + dj + n_cols]
            sq = ((centre - other) ** 2).sum(axis=1) - noise  # (B, H+2o−1, W+2o−1)
            if o == 0:  # the four corners coincide: an empty box
                box = np.zeros((b, height, width))
            else:
                box = sliding_window_view(sq, (2 * o, 2 * o), axis=(1, 2)).sum(axis=(-2, -1))
            dist = np.maximum(box, 0.0) / scale
            weight = np.where(dist > DISTANCE_CUTOFF, 0.0, exp(-dist))
            cand = padded[:, :, pad + di : pad + di + height, pad + dj : pad + dj + width]
            num += weight[:, None] * cand
            den += weight
    return num / den[:, None]
