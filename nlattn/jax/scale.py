"""The trainable residual gate of SAGAN / DANet / CCNet."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..specs import ScaleConfig, check_float_dtype
from ._base import Block


class Scale(Block):
    """y = gamma * x for any input shape; ``gamma`` has shape (1,), initialised to ``init`` (0)."""

    config_class = ScaleConfig

    def build_layers(self, make):
        self.gamma = make(self.spec.layers()["gamma"])

    def check_input(self, x) -> jax.Array:
        """Any rank >= 1 (no channels-last layout to check)."""
        check_float_dtype(self.spec.block, x.dtype if hasattr(x, "dtype") else jnp.asarray(x).dtype)
        x = jnp.asarray(x)
        self.spec.check_input_shape(x.shape)
        return x if self.dtype is None else x.astype(self.dtype)

    def __call__(self, x):
        x = self.check_input(x)
        return self.param(self.gamma) * x
