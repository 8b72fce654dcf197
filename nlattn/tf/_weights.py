"""Canonical weights of Keras blocks, or of any Keras model or layer that contains nlattn blocks.

Every schema layer of a block is the Keras layer (or variable) at its canonical prefix
(``walk(block, "W_spatial.3")`` is ``block.W_spatial[3]``); a tensor kind names the Keras attribute,
and a ``Gate`` is a ``Scale`` layer holding ``gamma``. Keras stores conv kernels (*k, I/groups, O)
and dense kernels (in, out). Inside a larger model a block's names are prefixed by its path, the
chain of layer names from the model down to the block joined by "." (``stage2.nl.theta.weight``).
Export and load themselves are ``nlattn.weights.access``.
"""

from __future__ import annotations

import keras
import numpy as np

from ..specs import layer_name
from ..weights.access import WeightAccess, walk
from ._base import Block
from .scale import Scale

#: canonical tensor kind -> attribute of the Keras layer (a "param" is the variable itself)
ATTRIBUTE = {
    "conv_kernel": "kernel",
    "conv_bias": "bias",
    "conv_g": "g",  # WeightNormConv's magnitude
    "dense_kernel": "kernel",
    "dense_bias": "bias",
    "bn_weight": "gamma",
    "bn_bias": "beta",
    "bn_mean": "moving_mean",
    "bn_var": "moving_variance",
    "norm_weight": "gamma",
    "norm_bias": "beta",
}


def ensure_built(block: Block) -> None:
    """Create a block's variables (from ``default_input_shape``) if it has not been called yet."""
    if not block.built:
        block.build(block.default_input_shape())


def _children(layer) -> list:
    if isinstance(layer, keras.Model) and hasattr(layer, "layers"):
        return list(layer.layers)
    return list(layer._flatten_layers(include_self=False, recursive=False))


def find_blocks(model) -> list[tuple[str, Block]]:
    """(path, block) of every outermost nlattn layer of a Keras layer or model, as they are (built
    or not); a TypeError when there is none."""
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(f"expected a Keras layer or model, got {type(model).__name__}")
    if isinstance(model, Block):
        return [("", model)]
    found: list[tuple[str, Block]] = []
    seen: set[int] = set()

    def visit(layer, path):
        for child in _children(layer):
            if id(child) in seen:
                continue
            seen.add(id(child))
            child_path = f"{path}.{child.name}" if path else child.name
            if isinstance(child, Block):
                found.append((child_path, child))
            else:
                visit(child, child_path)

    visit(model, "")
    if not found:
        raise TypeError(f"{type(model).__name__} {model.name!r} contains no nlattn layer")
    return found


class KerasWeights(WeightAccess):
    channels_last = True

    def blocks(self, model):
        """(path, block) of every outermost nlattn layer, each built (from its default input shape
        if it has not been called yet)."""
        found = find_blocks(model)
        for _, block in found:
            ensure_built(block)
        return found

    def variables(self, block):
        ensure_built(block)
        out = {}
        for layer in block.spec.schema():
            node = walk(block, layer_name(layer))
            for t in layer.tensors():
                if t.kind == "param":  # the variable itself, or a Gate's Scale layer
                    out[t.name] = node.gamma if isinstance(node, Scale) else node
                else:
                    out[t.name] = getattr(node, ATTRIBUTE[t.kind])
        return out

    def read(self, variable):
        value = keras.ops.convert_to_numpy(variable)
        if value.dtype.name == "bfloat16":  # not a NumPy floating type: widen exactly
            value = value.astype(np.float32)
        return value

    def convert(self, variable, value):
        value = np.asarray(value, dtype=value.dtype.newbyteorder("="))
        return keras.ops.convert_to_tensor(value, dtype=variable.dtype)

    def assign(self, variable, value):
        variable.assign(value)

    def finite(self, value):
        return bool(keras.ops.convert_to_numpy(keras.ops.all(keras.ops.isfinite(value))))


ACCESS = KerasWeights()
blocks = ACCESS.blocks
export_weights = ACCESS.export_weights
load_weights = ACCESS.load_weights
