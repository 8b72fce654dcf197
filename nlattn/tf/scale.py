"""The trainable residual gate of SAGAN / DANet / CCNet: y = gamma * x."""

from __future__ import annotations

import keras

from ..errors import ConfigError
from ..specs import ScaleConfig, check_float_dtype


@keras.saving.register_keras_serializable(package="nlattn")
class Scale(keras.layers.Layer):
    """``y = gamma * x`` for an input of any shape (any layout); ``gamma`` is a trainable (1,) weight
    that starts at ``init`` (0: the SAGAN / DANet / CCNet residual gate starts closed).

    Keywords: init=0.0, implementation="auto" (accepted for uniformity; there is one path), and
    ``data_format`` is accepted and ignored (a scalar gate has no layout).
    """

    block = "Scale"

    def __init__(self, init=0.0, *, implementation="auto", **kwargs):
        if "data_format" in kwargs and kwargs["data_format"] not in (None, "channels_last", "channels_first"):
            raise ConfigError(f"Scale: data_format must be None, 'channels_last' or 'channels_first', "
                              f"got {kwargs['data_format']!r}")
        kwargs.pop("data_format", None)   # gamma is a scalar: any layout
        if not isinstance(implementation, str) or implementation not in ("auto", "naive"):
            raise ConfigError(f"Scale: implementation must be one of ('auto', 'naive'), got {implementation!r}")
        super().__init__(**kwargs)
        self.implementation = implementation
        self.spec = ScaleConfig(init=init)

    def default_input_shape(self):
        return (None,)

    def build(self, input_shape):
        self.spec.check_input_shape(tuple(input_shape))
        self.gamma = self.add_weight(name="gamma", shape=(1,),
                                     initializer=keras.initializers.Constant(float(self.spec.init)))

    def call(self, x, training=None):
        check_float_dtype(self.block, keras.backend.standardize_dtype(x.dtype))
        self.spec.check_input_shape(tuple(x.shape))
        return keras.ops.cast(self.gamma, x.dtype) * x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "init": float(self.spec.init), "implementation": self.implementation}
