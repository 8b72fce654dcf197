"""The trainable residual gate of SAGAN / DANet / CCNet."""

from __future__ import annotations

from ..specs import ScaleConfig
from ._common import Block, layers, param


class Scale(Block):
    """y = gamma * x for any input shape; ``gamma`` has shape (1,), initialised to ``init`` (0)."""
    config_class = ScaleConfig

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gamma = param(layers(self.spec)["gamma"])
        self._finish()

    def forward(self, x):
        self.check_input(x)
        return self.gamma * x
