"""Classical non-local means (Buades et al.), scikit-image ``denoise_nl_means`` semantics, in jnp.

Semantics (see ``nlattn.numpy_ref.nl_means`` for the full account). fast_mode=False: Gaussian-weighted
s×s patch distances on the reflect-padded image, a search window of (2d+1)² candidates clipped at
the image border, the early exit (a partial distance > 5 after any of patch rows 0 … s−2 gives
weight 0). fast_mode=True: uniform (s−1)² box distances over C·h²·s² on the image reflect-padded by
s//2 + d + 1, an unclipped window, weight 0 above the cutoff. Both use scikit-image's ``fast_exp``
bit trick, emulated here without float64. One ``lax.scan`` step per search offset, which XLA fuses
into a few passes over the image. Gradients are those of the reference's derivative function
(``non_local_means_envelope``): the bit trick's piecewise-constant
staircase gets the slope of the envelope it samples (see ``fast_exp``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from ..specs import FAST_EXP_A, FAST_EXP_BC, NL_MEANS_DISTANCE_CUTOFF, NonLocalMeansConfig
from ._base import Block, work_dtype


def fast_exp(y: jax.Array) -> jax.Array:
    """scikit-image's approximate exp for y <= 0 without float64, differentiable.

    Its float64 has the high word ``hi = trunc(FAST_EXP_A·y) + FAST_EXP_BC`` and a zero low word,
    i.e. the value 2**(hi >> 20 − 1023) · (1 + (hi & 0xFFFFF) / 2**20); 0 where ``hi`` would be
    negative.

    The value is that staircase exactly; its derivative is the slope of the continuous envelope
    it samples (``nlattn.numpy_ref.nl_means.fast_exp_envelope``), 2**(E − 1023) / ln 2 in the
    binade of exponent E (0 where the value is 0), through a straight-through term
    ``slope · (y − stop_gradient(y))`` that is exactly 0 in value, and 0 where the value is 0.

    Computed in float32 (or wider) whatever y's dtype: the mantissa 1 + m/2**20 needs 21 bits
    (float16 has 11: fast_exp(-1) came out 0). y = NaN gives 0, as the reference's bit trick does
    (its NaN high word is not ≥ 0), and no NaN through the straight-through term.
    """
    dtype = y.dtype
    y = y.astype(work_dtype(dtype))
    t = jnp.trunc(FAST_EXP_A * jnp.maximum(y, -1000.0))  # |t| < 2**31: fits an int32
    hi = t.astype(jnp.int32) + FAST_EXP_BC
    exponent = (hi >> 20) - 1023
    valid = (hi >= 0) & ~jnp.isnan(y)
    mantissa = 1.0 + (hi & 0xFFFFF).astype(y.dtype) / (1 << 20)
    value = jnp.where(valid, jnp.ldexp(mantissa, exponent), 0.0).astype(y.dtype)
    slope = jnp.where(valid, jnp.ldexp(jnp.asarray(1.0 / math.log(2.0), y.dtype), exponent), 0.0)
    through = jnp.where(valid, jax.lax.stop_gradient(slope.astype(y.dtype)) * (y - jax.lax.stop_gradient(y)), 0.0)
    return (value + through).astype(dtype)


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
        """The filter of x in its own dtype."""
        if self.spec.fast_mode:
            return self._integral_image_filter(x)
        return self._pixelwise_filter(x)

    def _pixelwise_filter(self, x):
        """fast_mode=False: Gaussian patch distances, the row-wise cutoff, a clipped window."""
        cfg = self.spec
        b, height, width, c = x.shape
        s, d, o = cfg.patch_size, cfg.patch_distance, cfg.patch_size // 2
        w = np.asarray(cfg.patch_kernel(c), dtype=x.dtype)  # (s, s) constants
        noise = c * 2.0 * cfg.sigma * cfg.sigma

        padded = jnp.pad(x, ((0, 0), (o, o), (o, o), (0, 0)), mode="reflect")  # every pixel a patch
        # candidates beyond the border are never used: pad by d more so every offset is a slice
        far = jnp.pad(padded, ((0, 0), (d, d), (d, d), (0, 0)))
        xs = jnp.pad(x, ((0, 0), (d, d), (d, d), (0, 0)))
        rows_idx = jnp.arange(height)[:, None]
        cols_idx = jnp.arange(width)[None, :]

        def step(carry, offset):
            num, den = carry
            di, dj = offset[0], offset[1]
            other = jax.lax.dynamic_slice(far, (0, d + di, d + dj, 0), padded.shape)
            sq = ((padded - other) ** 2).sum(-1) - noise  # (B, H+2o, W+2o)
            rows = [sum(w[k, l] * sq[:, k : k + height, l : l + width] for l in range(s)) for k in range(s)]
            partial = rows[0]
            cut = jnp.zeros(partial.shape, bool)
            for row in rows[1:]:  # tested before each of rows 1 … s−1 is added
                cut = cut | (partial > NL_MEANS_DISTANCE_CUTOFF)
                partial = partial + row
            inside = (rows_idx + di >= 0) & (rows_idx + di < height) & (cols_idx + dj >= 0) & (cols_idx + dj < width)
            weight = jnp.where(cut | ~inside, 0.0, fast_exp(-jnp.maximum(partial, 0.0)))
            candidate = jax.lax.dynamic_slice(xs, (0, d + di, d + dj, 0), x.shape)
            return (num + weight[..., None] * candidate, den + weight), None

        offsets = jnp.array([(i, j) for i in range(-d, d + 1) for j in range(-d, d + 1)], jnp.int32)
        init = (jnp.zeros_like(x), jnp.zeros((b, height, width), x.dtype))
        (num, den), _ = jax.lax.scan(step, init, offsets)
        return num / den[..., None]

    def _integral_image_filter(self, x):
        """fast_mode=True: uniform box distances, an unclipped window over the reflect-padded image."""
        cfg = self.spec
        b, height, width, c = x.shape
        d, o, pad = cfg.patch_distance, cfg.patch_size // 2, cfg.fast_mode_pad
        noise = c * 2.0 * cfg.sigma * cfg.sigma
        scale = cfg.fast_mode_scale(c)
        padded = _reflect(x, pad)  # (B, H + 2P, W + 2P, C)
        # the box of a centre covers offsets −o+1 … o: squared differences from row P − o + 1 on
        lo, rows, cols = pad - o + 1, height + 2 * o - 1, width + 2 * o - 1
        centre = padded[:, lo : lo + rows, lo : lo + cols]

        def step(carry, offset):
            num, den = carry
            di, dj = offset[0], offset[1]
            other = jax.lax.dynamic_slice(padded, (0, lo + di, lo + dj, 0), centre.shape)
            sq = ((centre - other) ** 2).sum(-1) - noise  # (B, H + 2o − 1, W + 2o − 1)
            if o == 0:  # the integral image's four corners coincide: an empty box, distance 0
                dist = jnp.zeros((b, height, width), x.dtype)
            else:
                line = sum(sq[:, :, l : l + width] for l in range(2 * o))
                dist = jnp.maximum(sum(line[:, k : k + height] for k in range(2 * o)), 0.0) / scale
            weight = jnp.where(dist > NL_MEANS_DISTANCE_CUTOFF, 0.0, fast_exp(-dist))
            candidate = jax.lax.dynamic_slice(padded, (0, pad + di, pad + dj, 0), x.shape)
            return (num + weight[..., None] * candidate, den + weight), None

        d_range = range(-d, d + 1)
        offsets = jnp.array([(i, j) for i in d_range for j in d_range], jnp.int32)
        init = (jnp.zeros_like(x), jnp.zeros((b, height, width), x.dtype))
        (num, den), _ = jax.lax.scan(step, init, offsets)
        return num / den[..., None]


def _reflect(x: jax.Array, pad: int) -> jax.Array:
    """NumPy ``mode='reflect'`` padding of axes 1 and 2 (H, W) by ``pad``, any pad: a period of
    2·(size − 1), reflected as often as needed."""
    for axis in (1, 2):
        size = x.shape[axis]
        period = max(2 * (size - 1), 1)
        idx = np.remainder(np.arange(-pad, size + pad), period)
        x = jnp.take(x, np.where(idx < size, idx, period - idx), axis=axis)
    return x
