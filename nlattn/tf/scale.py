"""The trainable residual gate of SAGAN / DANet / CCNet."""

from __future__ import annotations

import keras
from keras import ops

from ..specs import ScaleConfig
from ._base import Block, static_shape


@keras.saving.register_keras_serializable(package="nlattn")
class Scale(Block):
    """y = gamma * x for any input shape (any layout); ``gamma`` has shape (1,), initialised to
    ``init`` (0). The attention blocks' residual gate ``gamma`` is a ``Scale`` layer."""

    config_class = ScaleConfig

    def build_layers(self, make):
        self.gamma = make(self.spec.layers()["gamma"])

    def check_shape(self, shape) -> None:
        """Any shape of rank >= 1, in any layout."""
        self.spec.check_input_shape(tuple(1 if s is None else s for s in static_shape(shape)))

    def call_channels_last(self, x, training, return_attention):
        return ops.cast(self.gamma, x.dtype) * x
