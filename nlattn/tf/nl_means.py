"""Classical non-local means (scikit-image ``denoise_nl_means``, both modes), in keras.ops.

The semantics are the reference's (``nlattn.numpy_ref.nl_means``), quirks included. fast_mode=False:
reflect-padded patches, a search window clipped at the image border, the Gaussian patch kernel
normalised to 1 / (C·h²), the early-exit cutoff tested on the partial sums of patch rows 0 … s−2
only. fast_mode=True: an unclipped window over the image reflect-padded by s//2 + d + 1, uniform
(s−1)² box distances over C·h²·s², weight 0 above the cutoff. Both use scikit-image's bit-trick
``fast_exp`` instead of exp.
"""

from __future__ import annotations

import math

import keras
from keras import ops

from ..specs import FAST_EXP_A, FAST_EXP_BC, NL_MEANS_DISTANCE_CUTOFF, NonLocalMeansConfig
from ._base import Block, work_dtype

#: float64 exponent bias minus float32's (1023 - 127), in units of the high word's exponent field
_REBIAS = (1023 - 127) << 20
_LN2 = math.log(2.0)


def fast_exp(y):
    """scikit-image's ``fast_exp`` for y <= 0 (Schraudolph's bit trick), with the slope of its envelope.

    Forward: the float64 whose high word is ``hi = trunc(FAST_EXP_A·y) + FAST_EXP_BC`` (low word
    0) has a 20-bit mantissa, so it is written exactly as a float32 (exponent re-biased, mantissa
    shifted by 3); 0 where it is below float32's normal range (the reference's 0 for hi < 0 included).
    Backward: the staircase has derivative 0 almost everywhere, so the gradient is that of the
    continuous envelope it samples (``numpy_ref.nl_means.fast_exp_envelope``), 2**(E - 1023) / ln 2
    in the binade of exponent E, by a straight-through term that is exactly 0 in value (and 0,
    not 0·NaN, where y is not finite). A NaN y gives 0, as the reference's integer does.
    """
    y32 = ops.cast(ops.stop_gradient(y), "float32")
    y32 = ops.where(ops.isnan(y32), -1000.0, ops.maximum(y32, -1000.0))
    t = ops.trunc(FAST_EXP_A * y32)  # |t| < 2**31: an int32
    hi = ops.cast(t, "int32") + (FAST_EXP_BC - _REBIAS)  # high word, float32 bias
    bits = ops.where(hi > 0, hi * 8, 0)  # << 3: 20 -> 23 mantissa bits
    fe = _as_float32(bits)
    slope = _as_float32(ops.bitwise_and(bits, 0x7F800000)) / _LN2  # mantissa cleared
    fe, slope = ops.cast(fe, y.dtype), ops.cast(slope, y.dtype)
    zero = ops.where(ops.isfinite(y), y - ops.stop_gradient(y), ops.zeros_like(y))
    return fe + ops.stop_gradient(slope) * zero


def _as_float32(bits):
    """int32 bits -> the float32s they encode; through a static last axis of 1, as Keras's TF
    ``view`` reads the last size as a Python int (symbolic sizes would fail)."""
    return ops.view(bits[..., None], "float32")[..., 0]


@keras.saving.register_keras_serializable(package="nlattn")
class NonLocalMeans(Block):
    """Non-local means of (B, H, W, C) / (B, C, H, W) -> same shape; no weights, no attention map.

    Keywords: patch_size=7 (odd), patch_distance=11, h=0.1, sigma=0.0, fast_mode=False,
    data_format=None. The C
    channels of one image share their patch weights (scikit-image's ``channel_axis``); the
    reference's quirks (clipped search window, partial-distance cutoff, fast_exp) are reproduced.
    """

    config_class = NonLocalMeansConfig

    def call_channels_last(self, x, training, return_attention):
        """x (B, H, W, C) -> the filtered image (B, H, W, C), same dtype; computed in float32 for
        bfloat16/float16 inputs (the bit trick and the distance sums need its range and bits)."""
        dtype = x.dtype
        return ops.cast(self._filter(ops.cast(x, work_dtype(dtype))), dtype)

    def _filter(self, x):
        """The filter of x (B, H, W, C) in x's dtype; sizes may be symbolic."""
        xt = ops.transpose(x, (0, 3, 1, 2))  # (B, C, H, W): the width the contiguous axis
        if self.spec.fast_mode:
            plane, values = self._integral_image_planes(xt)
        else:
            plane, values = self._pixelwise_planes(xt)
        return ops.transpose(self._half_window_means(plane, values, xt), (0, 2, 3, 1))

    def _half_window_means(self, plane, values, xt):
        """Σ w·candidate / Σ w over the search window, each weight computed once for its pair
        (the weights are symmetric, w(A, u) = w(A + u, −u), from the same terms in the same order).

        ``plane(di, dj)`` gives the weights w(A, u), u = (di, dj), of the centres A at rows
        −di … H + d − di − 1 and columns −d … W + d − 1 of the image (B, H + d, W + 2d): those
        where A or A + u is in the image, 0 for a pair the window excludes. ``values`` (B, C,
        H + 2d, W + 2d) holds the pixel values around the image (image pixel (r, c) at (d + r,
        d + c)). One loop step per row of offsets di = 0 … d, one ``ops.map`` step per column
        offset: the loop keeps each plane in memory, where XLA would otherwise fuse it into the
        accumulation and recompute it, patch sum and all, at each of the 2d + 1 shifts. The centre
        A in the image gets w·x(A + u); for di > 0, A + u in the image gets w·x(A) as well, which
        accounts for the offset −u (the row di = 0 is computed whole).
        """
        b, c, height, width = ops.shape(xt)
        d = self.spec.patch_distance
        columns = tuple(range(-d, d + 1))
        n = len(columns)

        def step(di, carry):
            num, den = carry
            weight = ops.map(lambda dj: plane(di, dj), ops.arange(-d, d + 1))  # (n, B, H + d, W + 2d)
            own = ops.slice(weight, [0, 0, di, d], [n, b, height, width])  # A in the image
            ahead = ops.slice(values, [0, 0, d + di, 0], [b, c, height, width + 2 * d])  # x(A + u)
            num = num + sum(own[i, :, None] * ahead[..., d + dj : d + dj + width] for i, dj in enumerate(columns))
            den = den + sum(own[i] for i in range(n))
            # A + u in the image: rows 0 … H − 1 of the plane, A's column d − dj + c for A + u's c
            behind = ops.slice(values, [0, 0, d - di, 0], [b, c, height, width + 2 * d])  # x(A)
            given = weight[:, :, :height]
            num_given = sum(
                given[i, :, None, :, d - dj : d - dj + width] * behind[..., d - dj : d - dj + width]
                for i, dj in enumerate(columns)
            )
            den_given = sum(given[i, :, :, d - dj : d - dj + width] for i, dj in enumerate(columns))
            # where, not a product: 0·NaN would spread a NaN pixel beyond the reference's window
            return ops.where(di > 0, num + num_given, num), ops.where(di > 0, den + den_given, den)

        init = (ops.zeros_like(xt), ops.zeros_like(xt[:, 0]))
        num, den = ops.fori_loop(0, d + 1, step, init)
        return num / den[:, None]

    def _pixelwise_planes(self, xt):
        """fast_mode=False on xt (B, C, H, W): Gaussian patch distances (two 1-D passes), the
        row-wise cutoff, weight 0 where A or A + u is outside the image (a clipped window)."""
        cfg = self.spec
        b, c, height, width = ops.shape(xt)
        s, d, o = cfg.patch_size, cfg.patch_distance, cfg.patch_size // 2
        rows_w, cols_w = (w.tolist() for w in cfg.separable_kernel(c))
        noise = c * 2.0 * cfg.sigma * cfg.sigma
        # every image pixel a reflect-padded patch; around that zeros, never weighted: by d rows
        # (centres −d … H + d − 1), by 2d columns (A + u for A at −d … W + d − 1)
        patches = ops.pad(xt, [[0, 0], [0, 0], [o, o], [o, o]], mode="reflect")
        patches = ops.pad(patches, [[0, 0], [0, 0], [d, d], [2 * d, 2 * d]])
        rows, cols, wide = height + d + 2 * o, width + 2 * d + 2 * o, width + 2 * d
        r = ops.arange(height + d)[:, None]  # plane row: the row of A + u
        col = ops.arange(wide)[None, :] - d  # the column of A

        def plane(di, dj):
            centre = ops.slice(patches, [0, 0, d - di, d], [b, c, rows, cols])
            other = ops.slice(patches, [0, 0, d, d + dj], [b, c, rows, cols])
            sq = sum(ops.square(centre[:, k] - other[:, k]) for k in range(c)) - noise  # (B, rows, cols)
            line = sum(cols_w[l] * sq[..., l : l + wide] for l in range(s))  # along the patch rows
            partial = rows_w[0] * line[:, : height + d]
            highest = None
            for k in range(1, s):  # tested before rows 1 … s−1 are added: partial sums of rows 0 … s−2
                if cfg.sigma > 0:  # terms can be negative: any partial sum may be the one above 5
                    highest = partial if highest is None else ops.maximum(highest, partial)
                partial = partial + rows_w[k] * line[:, k : k + height + d]
                if cfg.sigma == 0 and k == s - 2:  # terms ≥ 0: the partial sums only grow
                    highest = partial
            keep = (r >= di) & (r < height) & (col >= 0) & (col < width) & (col + dj >= 0) & (col + dj < width)
            if highest is not None:
                keep = ops.logical_and(keep, ops.logical_not(highest > NL_MEANS_DISTANCE_CUTOFF))
            # a NaN distance gives weight 0, as in the reference, whatever maximum(NaN, 0) gives
            keep = ops.logical_and(keep, ops.logical_not(ops.isnan(partial)))
            weight = fast_exp(-ops.maximum(partial, 0.0))
            return ops.where(keep, weight, ops.zeros_like(weight))

        return plane, ops.pad(xt, [[0, 0], [0, 0], [d, d], [d, d]])

    def _integral_image_planes(self, xt):
        """fast_mode=True on xt (B, C, H, W): uniform box distances, every pair of the unclipped
        window over the reflect-padded image."""
        cfg = self.spec
        b, c, height, width = ops.shape(xt)
        d, o, pad = cfg.patch_distance, cfg.patch_size // 2, cfg.fast_mode_pad
        box, scale = 2 * o, cfg.fast_mode_scale(c)
        noise = box * box * c * 2.0 * cfg.sigma * cfg.sigma  # per box pixel, summed over channels
        padded = _reflect(_reflect(xt, pad, 2), pad, 3)  # (B, C, H + 2P, W + 2P)
        # zeros beyond the reflection reach only planes' entries where neither A nor A + u is an
        # image pixel, which are never read
        wide = ops.pad(padded, [[0, 0], [0, 0], [0, 0], [d, d]])
        # the box of a centre covers offsets −o+1 … o: squared differences from row P − o + 1 on
        first, rows, cols = pad - o + 1, height + d + box - 1, width + 2 * d + box - 1
        out_rows, out_cols = height + d, width + 2 * d

        def plane(di, dj):
            if o == 0:  # the integral image's four corners coincide: an empty box, distance 0
                return ops.ones((b, out_rows, out_cols), xt.dtype) * fast_exp(ops.zeros((), xt.dtype))
            centre = ops.slice(wide, [0, 0, first - di, first], [b, c, rows, cols])
            other = ops.slice(wide, [0, 0, first, first + dj], [b, c, rows, cols])
            sq = sum(ops.square(centre[:, k] - other[:, k]) for k in range(c))  # (B, rows, cols)
            line = sum(sq[:, :, l : l + out_cols] for l in range(box))
            dist = sum(line[:, k : k + out_rows] for k in range(box))  # (B, H + d, W + 2d)
            dist = dist - noise if noise else dist
            scaled = ops.maximum(dist, 0.0) / scale
            # a NaN distance gives weight 0, as in the reference, whatever maximum(NaN, 0) gives
            drop = ops.logical_or(ops.isnan(dist), ops.logical_not(scaled <= NL_MEANS_DISTANCE_CUTOFF))
            weight = fast_exp(-scaled)
            return ops.where(drop, ops.zeros_like(weight), weight)

        values = padded[:, :, pad - d : pad + height + d, pad - d : pad + width + d]
        return plane, values


def _reflect(x, pad: int, axis: int):
    """NumPy ``mode='reflect'`` padding of one axis by ``pad``, any pad: a period of 2·(size − 1),
    reflected as often as needed (``ops.pad`` needs pad < size on TensorFlow)."""
    size = ops.shape(x)[axis]
    period = ops.maximum(2 * (size - 1), 1)
    idx = ops.mod(ops.arange(-pad, size + pad), period)
    return ops.take(x, ops.where(idx < size, idx, period - idx), axis=axis)
