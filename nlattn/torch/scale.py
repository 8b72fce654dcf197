"""The trainable residual gate of SAGAN / DANet / CCNet."""

from __future__ import annotations

from ..specs import ScaleConfig
from ._base import Block


class Scale(Block):
    """y = gamma * x for any input shape; ``gamma`` has shape (1,), initialised to ``init`` (0)."""

    config_class = ScaleConfig

    def build_layers(self, make):
        self.gamma = make(self.spec.layers()["gamma"])

    def forward(self, x):
        self.check_input(x)
        return self.gamma * x
