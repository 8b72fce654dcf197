"""The trainable residual gate of SAGAN / DANet / CCNet."""

from __future__ import annotations

from ..specs import ScaleConfig
from ._common import defines, prepare


@defines("Scale")
def scale(x, weights, *, training=False, stats=None, **config):
    """y = gamma * x for any shape; gamma has shape (1,)."""
    cfg, ctx, x = prepare(ScaleConfig, x, weights, config, training, stats)
    return ctx["gamma"] * x
