"""Keras conformance adapters: canonical channels-first NumPy in and out (docs/design.md §5).

``KerasAdapter`` ("keras", channels_last) and ``KerasChannelsFirstAdapter`` ("keras-cf") run the
layers with ``implementation="auto"`` (the fast paths; query chunks of ``query_chunk_size=16`` so
that the small conformance shapes run several chunks, a ragged last one included);
``KerasNaiveAdapter`` ("keras-naive") runs ``implementation="naive"``, every relation map
materialised. These run the whole block in the case's dtype (float32, bfloat16, float16: Keras
``dtype=``). ``KerasMixedAdapter`` ("keras-mixed") runs the fast paths under Keras's mixed
policies (``mixed_bfloat16``, ``mixed_float16``): float32 variables, computation in the half
dtype, which is what its ``dtypes`` name.

The environment variable ``NLATTN_KERAS_DTYPES`` (comma-separated, e.g. ``float32``) keeps only
those dtypes in every Keras column: CI runs the other Keras backends' columns in float32 only.
"""

from __future__ import annotations

import os

import keras
import numpy as np

from ..conformance.adapter import Adapter
from ..specs import tensors
from ..weights.access import STATISTICS, to_canonical
from . import BLOCKS
from ._weights import ACCESS, ensure_built, load_weights

#: restricts the dtypes of every Keras column (comma-separated names), when set
DTYPES_VARIABLE = "NLATTN_KERAS_DTYPES"


def selected(dtypes: tuple[str, ...]) -> tuple[str, ...]:
    """``dtypes``, less those that ``NLATTN_KERAS_DTYPES`` (when set) leaves out."""
    wanted = os.environ.get(DTYPES_VARIABLE)
    if not wanted:
        return dtypes
    keep = {d.strip() for d in wanted.split(",")}
    return tuple(d for d in dtypes if d in keep)


class KerasAdapter(Adapter):
    """Runs nlattn.tf layers in ``data_format`` ("keras": channels_last, "keras-cf": channels_first),
    the whole layer in the case's dtype."""

    dtypes: tuple[str, ...] = ("float32", "bfloat16", "float16")
    unbiased_running_var = False  # Keras updates moving_variance with the biased batch variance
    implementation = "auto"
    query_chunk_size = 16
    column = "keras"

    def __init__(self, data_format: str = "channels_last"):
        if data_format not in ("channels_last", "channels_first"):
            raise ValueError(f"data_format must be 'channels_last' or 'channels_first', got {data_format!r}")
        self.data_format = data_format
        suffix = "" if self.implementation == "auto" else f"-{self.implementation}"
        self.name = (self.column if data_format == "channels_last" else "keras-cf") + suffix
        self.supports_gradients = keras.backend.backend() == "tensorflow"
        self.dtypes = selected(type(self).dtypes)

    def policy(self, dtype: str) -> str:
        """The Keras dtype policy of a case's dtype."""
        return dtype

    # canonical (B, C, *S) <-> the layer's layout
    def _to_layer(self, x):
        return np.moveaxis(x, 1, -1) if self.data_format == "channels_last" else x

    def _from_layer(self, y):
        return np.moveaxis(y, -1, 1) if self.data_format == "channels_last" else y

    def build(self, block, config, dtype):
        cls = BLOCKS[block]
        kw = {"implementation": self.implementation, "dtype": self.policy(dtype), "data_format": self.data_format}
        if cls.config_class.query_chunked:
            kw["query_chunk_size"] = self.query_chunk_size
        layer = cls(**config, **kw)
        ensure_built(layer)
        return layer

    def load_weights(self, module, weights):
        load_weights(module, weights)

    def forward(self, module, x, *, training=False, return_attention=False):
        xin = keras.ops.convert_to_tensor(self._to_layer(x), dtype=module.compute_dtype)
        result = self._call(module, xin, training, return_attention)
        out, attn = result if return_attention else (result, None)
        out = self._from_layer(keras.ops.convert_to_numpy(out).astype(np.float64))
        if return_attention:
            return out, keras.ops.convert_to_numpy(attn).astype(np.float64)
        return out

    @staticmethod
    def _call(module, xin, training, return_attention):
        """The layer's forward; on Keras's jax backend compiled as one ``jax.jit`` of its
        ``stateless_call`` (op-by-op jax dispatch compiles every op separately: minutes per suite)."""
        kw = {"return_attention": True} if return_attention else {}
        if keras.backend.backend() != "jax":
            return module(xin, training=training, **kw)
        import jax  # Keras's own backend here: already imported by keras

        def stateless(trainable, non_trainable, x):
            return module.stateless_call(trainable, non_trainable, x, training=training, **kw)

        result, updated = jax.jit(stateless)(
            [v.value for v in module.trainable_variables], [v.value for v in module.non_trainable_variables], xin
        )
        for var, value in zip(module.non_trainable_variables, updated):
            var.assign(value)
        return result

    def running_stats(self, module):
        return {k: v.astype(np.float64) for k, v in ACCESS.running_stats(module).items()}

    def gradients(self, module, x, cotangent):
        import tensorflow as tf

        schema = tensors(module.spec.schema())
        table = {name: var for name, var in ACCESS.variables(module).items() if schema[name].kind not in STATISTICS}
        xin = tf.constant(self._to_layer(x), dtype=module.compute_dtype)
        cot = tf.constant(self._to_layer(cotangent), dtype=module.compute_dtype)
        variables = [var.value for var in table.values()]
        with tf.GradientTape() as tape:
            tape.watch(xin)
            tape.watch(variables)
            loss = tf.reduce_sum(module(xin, training=False) * cot)
        gx, *gw = tape.gradient(loss, [xin, *variables], unconnected_gradients=tf.UnconnectedGradients.ZERO)
        grads = {
            name: to_canonical(schema[name], np.asarray(g, dtype=np.float64), ACCESS.channels_last)
            for name, g in zip(table, gw)
        }
        return self._from_layer(np.asarray(gx, dtype=np.float64)), grads


class KerasChannelsFirstAdapter(KerasAdapter):
    """ "keras-cf": the layers with ``data_format="channels_first"`` (float32: the layout is a
    transpose, the half-precision arithmetic is "keras"'s)."""

    dtypes = ("float32",)

    def __init__(self):
        super().__init__("channels_first")


class KerasNaiveAdapter(KerasAdapter):
    """ "keras-naive": ``implementation="naive"`` (channels_last), every relation map materialised."""

    implementation = "naive"


class KerasMixedAdapter(KerasAdapter):
    """ "keras-mixed": the fast paths under ``mixed_bfloat16`` / ``mixed_float16``: variables (and
    running statistics) float32, computation in the half dtype; ``dtypes`` are the compute dtypes."""

    dtypes = ("bfloat16", "float16")
    column = "keras-mixed"

    def policy(self, dtype: str) -> str:
        return f"mixed_{dtype}"
