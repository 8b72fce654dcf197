"""Classical non-local means (Buades et al.), scikit-image ``denoise_nl_means`` semantics, in jnp.

Semantics (see ``nlattn.numpy_ref.nl_means`` for the full account). fast_mode=False: Gaussian-weighted
s×s patch distances on the reflect-padded image, a search window of (2d+1)² candidates clipped at
the image border, the early exit (a partial distance > 5 after any of patch rows 0 … s−2 gives
weight 0). fast_mode=True: uniform (s−1)² box distances over C·h²·s² on the image reflect-padded by
s//2 + d + 1, an unclipped window, weight 0 above the cutoff. Both use scikit-image's ``fast_exp``
bit trick, emulated here without float64. Gradients are those of the reference's derivative
function (``non_local_means_envelope``): the bit trick's piecewise-constant staircase gets the
slope of the envelope it samples (see ``fast_exp``).

Speed: a pair's weight is symmetric, w(A, u) = w(A + u, −u) from the same terms in the same order,
so only the half window (``NonLocalMeansConfig.half_window``) is computed and each weight is given
to both pixels. One ``lax.scan`` step per row of offsets di = 0 … d; inside it, one ``lax.map``
step per column offset dj writes that offset's weight plane. The loop boundary is what makes XLA
keep the planes: a plane read at 2d + 1 column shifts by the accumulation would otherwise be fused
into it and recomputed, with its whole patch sum, at each shift (10× slower). Channels go ahead
of the rows so that the image width is the contiguous, vectorised axis.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ..specs import FAST_EXP_A, FAST_EXP_BC, NL_MEANS_DISTANCE_CUTOFF, NonLocalMeansConfig
from ._base import Block, work_dtype

#: float64 exponent bias minus float32's (1023 − 127), in units of the high word's exponent field
_REBIAS = (1023 - 127) << 20


def fast_exp(y: jax.Array) -> jax.Array:
    """scikit-image's approximate exp for y <= 0 without float64, differentiable.

    Its float64 has the high word ``hi = trunc(FAST_EXP_A·y) + FAST_EXP_BC`` and a zero low word,
    i.e. the value 2**(hi >> 20 − 1023) · (1 + (hi & 0xFFFFF) / 2**20); 0 where ``hi`` would be
    negative.

    The value is that staircase exactly; its derivative is the slope of the continuous envelope
    it samples (``nlattn.numpy_ref.nl_means.fast_exp_envelope``), 2**(E − 1023) / ln 2 in the
    binade of exponent E (0 where the value is 0).

    Computed in float32 (or wider) whatever y's dtype: the mantissa 1 + m/2**20 needs 21 bits
    (float16 has 11: fast_exp(-1) came out 0). In float32 the 20-bit mantissa is written straight
    into the float32's bits (exponent re-biased; 0 below float32's normal range, < 1.2e-38).
    y = NaN gives 0, as the reference's bit trick does (its NaN high word is not ≥ 0), and no NaN
    in the derivative.
    """
    dtype = y.dtype
    if work_dtype(dtype) == jnp.float32:
        return _fast_exp32(y.astype(jnp.float32)).astype(dtype)
    return _fast_exp_wide(y)


@jax.custom_jvp
def _fast_exp32(y: jax.Array) -> jax.Array:
    """``fast_exp`` of float32 y: five integer operations on the bits (no ldexp)."""
    y = jnp.where(y > -1000.0, y, -1000.0)  # NaN → −1000 → 0; |trunc| < 2**31 below
    hi = jnp.trunc(y * FAST_EXP_A).astype(jnp.int32) + (FAST_EXP_BC - _REBIAS)
    return jax.lax.bitcast_convert_type(jnp.where(hi > 0, hi << 3, 0), jnp.float32)  # 20 → 23 mantissa bits


@_fast_exp32.defjvp
def _fast_exp32_jvp(primals, tangents):
    (y,), (y_dot,) = primals, tangents
    value = _fast_exp32(y)
    # the envelope's slope 2**E / ln 2: the value with its mantissa cleared (0 where the value is 0)
    power = jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(value, jnp.int32) & 0x7F800000, jnp.float32)
    return value, power * (1.0 / math.log(2.0)) * y_dot


def _fast_exp_wide(y: jax.Array) -> jax.Array:
    """``fast_exp`` for float64 y, through ``ldexp``, the derivative by a straight-through term
    ``slope · (y − stop_gradient(y))`` that is exactly 0 in value (and 0 where the value is 0)."""
    t = jnp.trunc(FAST_EXP_A * jnp.maximum(y, -1000.0))  # |t| < 2**31: fits an int32
    hi = t.astype(jnp.int32) + FAST_EXP_BC
    exponent = (hi >> 20) - 1023
    valid = (hi >= 0) & ~jnp.isnan(y)
    mantissa = 1.0 + (hi & 0xFFFFF).astype(y.dtype) / (1 << 20)
    value = jnp.where(valid, jnp.ldexp(mantissa, exponent), 0.0).astype(y.dtype)
    slope = jnp.where(valid, jnp.ldexp(jnp.asarray(1.0 / math.log(2.0), y.dtype), exponent), 0.0)
    through = jnp.where(valid, jax.lax.stop_gradient(slope.astype(y.dtype)) * (y - jax.lax.stop_gradient(y)), 0.0)
    return value + through


#: a weight plane of one offset: (di, dj) traced int32 scalars -> (B, H + d, W + 2d)
Plane = Callable[[jax.Array, jax.Array], jax.Array]


class NonLocalMeans(Block):
    """Non-local means of (B, H, W, C) images -> (B, H, W, C); no weights, no attention map.

    Keywords: patch_size=7 (odd), patch_distance=11, h=0.1, sigma=0.0, fast_mode=False. The C channels of one image
    share their patch weights (scikit-image's ``channel_axis``). ``implementation`` is accepted and
    has no effect (there is one path). Runs in float32 for bfloat16/float16 inputs (distances,
    weights and their sums); the output has the input's (or the computation ``dtype``).
    """

    config_class = NonLocalMeansConfig

    def __call__(self, x):
        """x (B, H, W, C) -> the filtered image (B, H, W, C)."""
        x = self.check_input(x)
        return self._filter(x.astype(work_dtype(x.dtype))).astype(x.dtype)

    def _filter(self, x):
        """The filter of x (B, H, W, C) in its own dtype."""
        xt = jnp.moveaxis(x, -1, 1)  # (B, C, H, W)
        if self.spec.fast_mode:
            plane, values = self._integral_image_planes(xt)
        else:
            plane, values = self._pixelwise_planes(xt)
        return jnp.moveaxis(self._half_window_means(plane, values, xt.shape), 1, -1)

    def _half_window_means(self, plane: Plane, values, shape):
        """Σ w·candidate / Σ w over the search window, each weight computed once for its pair.

        ``plane(di, dj)`` gives the weights w(A, u), u = (di, dj), of the centres A at rows
        −di … H + d − di − 1 and columns −d … W + d − 1 of the image (B, H + d, W + 2d): those
        where A or A + u is in the image, 0 for a pair the window excludes. ``values`` (B, C,
        H + 2d, W + 2d) holds the pixel values around the image (image pixel (r, c) at (d + r,
        d + c)). The centre A in the image gets w·x(A + u); for di > 0, A + u in the image gets
        w·x(A) as well, which accounts for the offset −u (the row di = 0 is computed whole).
        """
        b, c, height, width = shape
        d = self.spec.patch_distance
        columns = tuple(range(-d, d + 1))

        def step(carry, di):
            num, den = carry
            weight = jax.lax.map(lambda dj: plane(di, dj), jnp.arange(-d, d + 1))  # (n, B, H + d, W + 2d)
            own = jax.lax.dynamic_slice_in_dim(weight, di, height, axis=2)[..., d : d + width]  # A in the image
            ahead = jax.lax.dynamic_slice_in_dim(values, d + di, height, axis=2)  # x(A + u), rows of A
            num = num + sum(own[i, :, None] * ahead[..., d + dj : d + dj + width] for i, dj in enumerate(columns))
            den = den + sum(own[i] for i in range(len(columns)))
            # A + u in the image: rows 0 … H − 1 of the plane, A's column d − dj + c for A + u's c
            behind = jax.lax.dynamic_slice_in_dim(values, d - di, height, axis=2)  # x(A), rows of A + u
            given = weight[:, :, :height]
            num_given = sum(
                given[i, :, None, :, d - dj : d - dj + width] * behind[..., d - dj : d - dj + width]
                for i, dj in enumerate(columns)
            )
            den_given = sum(given[i, :, :, d - dj : d - dj + width] for i, dj in enumerate(columns))
            # where, not a product: 0·NaN would spread a NaN pixel beyond the reference's window
            num = jnp.where(di > 0, num + num_given, num)
            den = jnp.where(di > 0, den + den_given, den)
            return (num, den), None

        dtype = values.dtype
        init = (jnp.zeros((b, c, height, width), dtype), jnp.zeros((b, height, width), dtype))
        (num, den), _ = jax.lax.scan(step, init, jnp.arange(d + 1))
        return num / den[:, None]

    def _pixelwise_planes(self, xt) -> tuple[Plane, jax.Array]:
        """fast_mode=False on xt (B, C, H, W): Gaussian patch distances (two 1-D passes), the
        row-wise cutoff, weight 0 where A or A + u is outside the image (a clipped window)."""
        cfg = self.spec
        b, c, height, width = xt.shape
        s, d, o = cfg.patch_size, cfg.patch_distance, cfg.patch_size // 2
        rows_w, cols_w = (w.tolist() for w in cfg.separable_kernel(c))
        noise = c * 2.0 * cfg.sigma * cfg.sigma
        # every image pixel a reflect-padded patch; around that zeros, never weighted: by d rows
        # (centres −d … H + d − 1), by 2d columns (A + u for A at −d … W + d − 1)
        zeros = ((0, 0), (0, 0), (d, d), (2 * d, 2 * d))
        patches = jnp.pad(jnp.pad(xt, ((0, 0), (0, 0), (o, o), (o, o)), mode="reflect"), zeros)
        rows, cols, wide = height + d + 2 * o, width + 2 * d + 2 * o, width + 2 * d
        ahead = patches[:, :, d : d + rows]  # patch rows of A + u, whatever di
        r = jnp.arange(height + d)[:, None]  # plane row: the row of A + u
        col = jnp.arange(wide)[None, :] - d  # the column of A

        def plane(di, dj):
            centre = jax.lax.dynamic_slice_in_dim(patches, d - di, rows, axis=2)[..., d : d + cols]
            other = jax.lax.dynamic_slice_in_dim(ahead, d + dj, cols, axis=3)
            sq = sum(jnp.square(centre[:, k] - other[:, k]) for k in range(c)) - noise  # (B, rows, cols)
            line = sum(cols_w[l] * sq[..., l : l + wide] for l in range(s))  # along the patch rows
            partial = rows_w[0] * line[:, : height + d]
            highest = None
            for k in range(1, s):  # tested before rows 1 … s−1 are added: partial sums of rows 0 … s−2
                if cfg.sigma > 0:  # terms can be negative: any partial sum may be the one above 5
                    highest = partial if highest is None else jnp.maximum(highest, partial)
                partial = partial + rows_w[k] * line[:, k : k + height + d]
                if cfg.sigma == 0 and k == s - 2:  # terms ≥ 0: the partial sums only grow
                    highest = partial
            keep = (r >= di) & (r < height) & (col >= 0) & (col < width) & (col + dj >= 0) & (col + dj < width)
            if highest is not None:
                keep = keep & ~(highest > NL_MEANS_DISTANCE_CUTOFF)
            return jnp.where(keep, fast_exp(-jnp.maximum(partial, 0.0)), 0.0)

        return plane, jnp.pad(xt, ((0, 0), (0, 0), (d, d), (d, d)))

    def _integral_image_planes(self, xt) -> tuple[Plane, jax.Array]:
        """fast_mode=True on xt (B, C, H, W): uniform box distances, every pair of the unclipped
        window over the reflect-padded image."""
        cfg = self.spec
        b, c, height, width = xt.shape
        d, o, pad = cfg.patch_distance, cfg.patch_size // 2, cfg.fast_mode_pad
        box, scale = 2 * o, cfg.fast_mode_scale(c)
        noise = box * box * c * 2.0 * cfg.sigma * cfg.sigma  # per box pixel, summed over channels
        padded = _reflect(xt, pad)  # (B, C, H + 2P, W + 2P)
        # zeros beyond the reflection reach only planes' entries where neither A nor A + u is an
        # image pixel, which are never read
        wide = jnp.pad(padded, ((0, 0), (0, 0), (0, 0), (d, d)))
        # the box of a centre covers offsets −o+1 … o: squared differences from row P − o + 1 on
        first, rows, cols = pad - o + 1, height + d + box - 1, width + 2 * d + box - 1
        ahead = wide[:, :, first : first + rows]  # box rows of A + u, whatever di

        def plane(di, dj):
            if o == 0:  # the integral image's four corners coincide: an empty box, distance 0
                return jnp.ones((b, height + d, width + 2 * d), xt.dtype) * fast_exp(jnp.zeros((), xt.dtype))
            centre = jax.lax.dynamic_slice_in_dim(wide, first - di, rows, axis=2)[..., first : first + cols]
            other = jax.lax.dynamic_slice_in_dim(ahead, first + dj, cols, axis=3)
            sq = sum(jnp.square(centre[:, k] - other[:, k]) for k in range(c))  # (B, rows, cols)
            dist = _window_sum(_window_sum(sq, box, 2), box, 1)  # (B, H + d, W + 2d)
            dist = jnp.maximum(dist - noise if noise else dist, 0.0) / scale
            return jnp.where(dist > NL_MEANS_DISTANCE_CUTOFF, 0.0, fast_exp(-dist))

        return plane, padded[:, :, pad - d : pad + height + d, pad - d : pad + width + d]


def _window_sum(t: jax.Array, k: int, axis: int) -> jax.Array:
    """Sums of k consecutive entries along ``axis`` (length L -> L − k + 1), added one by one (XLA
    fuses the k slices into one pass)."""
    length = t.shape[axis] - k + 1
    total = jax.lax.slice_in_dim(t, 0, length, axis=axis)
    for i in range(1, k):
        total = total + jax.lax.slice_in_dim(t, i, i + length, axis=axis)
    return total


def _reflect(x: jax.Array, pad: int) -> jax.Array:
    """NumPy ``mode='reflect'`` padding of the last two axes (H, W) by ``pad``, any pad: a period
    of 2·(size − 1), reflected as often as needed."""
    for axis in (-2, -1):
        size = x.shape[axis]
        period = max(2 * (size - 1), 1)
        idx = np.remainder(np.arange(-pad, size + pad), period)
        x = jnp.take(x, np.where(idx < size, idx, period - idx), axis=axis)
    return x
