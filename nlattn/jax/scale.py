"""The trainable residual gate of SAGAN / DANet / CCNet."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..specs import ScaleConfig, check_float_dtype
from ._base import Block


class Scale(Block):
    """y = gamma * x for an input of any rank >= 1; gamma has shape (1,), init 0 (keyword ``init``)."""
    config_class = ScaleConfig

    def check_input(self, x) -> jax.Array:
        x = jnp.asarray(x)
        check_float_dtype(self.spec.block, x.dtype)
        self.spec.check_input_shape(x.shape)
        return x

    def __call__(self, x):
        x = self.check_input(x)
        return self.gamma[...] * x
