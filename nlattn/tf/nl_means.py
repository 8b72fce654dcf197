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
        if self.spec.fast_mode:
            return self._integral_image_filter(x)
        return self._pixelwise_filter(x)

    def _pixelwise_filter(self, x):
        """fast_mode=False: Gaussian patch distances, the row-wise cutoff, a clipped window."""
        cfg = self.spec
        _, height, width, c = ops.shape(x)
        s, d, o = cfg.patch_size, cfg.patch_distance, cfg.patch_size // 2
        w = cfg.patch_kernel(c).tolist()  # (s, s) constants
        noise = c * 2.0 * cfg.sigma * cfg.sigma
        padded = ops.pad(x, [[0, 0], [o, o], [o, o], [0, 0]], mode="reflect")  # every pixel a patch
        # candidates beyond the image are never used (their weight is masked to 0): pad by d more
        # with zeros so that every offset is one slice of the same shape
        far = ops.pad(padded, [[0, 0], [d, d], [d, d], [0, 0]])
        xs = ops.pad(x, [[0, 0], [d, d], [d, d], [0, 0]])
        rows_idx = ops.arange(height)[:, None]
        cols_idx = ops.arange(width)[None, :]
        side = 2 * d + 1

        def step(index, carry):  # one search offset (di, dj), row-major like the reference
            num, den = carry
            di, dj = index // side - d, index % side - d
            other = ops.slice(far, [0, d + di, d + dj, 0], ops.shape(padded))
            sq = ops.sum(ops.square(padded - other), axis=-1) - noise  # (B, H+2o, W+2o)
            partial, cut = None, None
            for k in range(s):  # patch rows
                row = sum(w[k][l] * sq[:, k : k + height, l : l + width] for l in range(s))
                if partial is None:
                    partial = row
                    continue
                # the cutoff is tested before rows 1 … s−1 are added (never on the full sum)
                over = partial > NL_MEANS_DISTANCE_CUTOFF
                cut = over if cut is None else ops.logical_or(cut, over)
                partial = partial + row
            inside = ops.logical_and(
                ops.logical_and(rows_idx + di >= 0, rows_idx + di < height),
                ops.logical_and(cols_idx + dj >= 0, cols_idx + dj < width),
            )
            # a NaN distance gives weight 0, as in the reference (its candidate still reaches num: 0·NaN)
            drop = ops.logical_or(ops.logical_not(inside), ops.isnan(partial))
            drop = drop if cut is None else ops.logical_or(cut, drop)
            weight = fast_exp(-ops.maximum(partial, 0.0))
            weight = ops.where(drop, ops.zeros_like(weight), weight)
            candidate = ops.slice(xs, [0, d + di, d + dj, 0], ops.shape(x))
            return num + weight[..., None] * candidate, den + weight[..., None]

        num, den = ops.fori_loop(0, side * side, step, (ops.zeros_like(x), ops.zeros_like(x[..., :1])))
        return num / den

    def _integral_image_filter(self, x):
        """fast_mode=True: uniform box distances, an unclipped window over the reflect-padded image."""
        cfg = self.spec
        _, height, width, c = ops.shape(x)
        d, o, pad = cfg.patch_distance, cfg.patch_size // 2, cfg.fast_mode_pad
        noise = c * 2.0 * cfg.sigma * cfg.sigma
        scale = cfg.fast_mode_scale(c)
        padded = _reflect(_reflect(x, pad, 1), pad, 2)  # (B, H + 2P, W + 2P, C)
        # the box of a centre covers offsets −o+1 … o: squared differences from row P − o + 1 on
        lo = pad - o + 1
        centre = padded[:, lo : lo + height + 2 * o - 1, lo : lo + width + 2 * o - 1]
        side = 2 * d + 1

        def step(index, carry):  # one search offset (di, dj)
            num, den = carry
            di, dj = index // side - d, index % side - d
            other = ops.slice(padded, [0, lo + di, lo + dj, 0], ops.shape(centre))
            sq = ops.sum(ops.square(centre - other), axis=-1) - noise  # (B, H + 2o − 1, W + 2o − 1)
            if o == 0:  # the integral image's four corners coincide: an empty box, distance 0
                dist = ops.zeros_like(x[..., 0])
            else:
                line = sum(sq[:, :, l : l + width] for l in range(2 * o))
                dist = ops.maximum(sum(line[:, k : k + height] for k in range(2 * o)), 0.0) / scale
            weight = fast_exp(-dist)
            weight = ops.where(ops.logical_not(dist <= NL_MEANS_DISTANCE_CUTOFF), ops.zeros_like(weight), weight)
            candidate = ops.slice(padded, [0, pad + di, pad + dj, 0], ops.shape(x))
            return num + weight[..., None] * candidate, den + weight[..., None]

        num, den = ops.fori_loop(0, side * side, step, (ops.zeros_like(x), ops.zeros_like(x[..., :1])))
        return num / den


def _reflect(x, pad: int, axis: int):
    """NumPy ``mode='reflect'`` padding of one axis by ``pad``, any pad: a period of 2·(size − 1),
    reflected as often as needed (``ops.pad`` needs pad < size on TensorFlow)."""
    size = ops.shape(x)[axis]
    period = ops.maximum(2 * (size - 1), 1)
    idx = ops.mod(ops.arange(-pad, size + pad), period)
    return ops.take(x, ops.where(idx < size, idx, period - idx), axis=axis)
