"""Schema-driven mapping between Keras variables and the canonical weights (DESIGN §3).

Every schema layer of a block has a sublayer in ``block.sub`` under its canonical prefix (free
parameters are in ``block.params``, or a ``Scale`` gate in ``block.sub``); a tensor kind names the
Keras attribute, and layouts move between PyTorch's (conv (O, I/groups, *k), dense (out, in)) and
Keras's (conv (*k, I/groups, O), dense (in, out)).

``export_weights`` / ``load_weights`` also take any Keras model or layer that *contains* nlattn
layers: each block's names are then prefixed by its path, the chain of layer names from the model
down to the block joined by "." (``"stage2.nl.theta.weight"``).
"""

from __future__ import annotations

import os
from typing import Mapping

import keras
import numpy as np

from ..specs import Param, Tensor, check_model_weights

#: canonical tensor kind -> attribute of the Keras sublayer
ATTRIBUTE = {"conv_kernel": "kernel", "conv_bias": "bias", "dense_kernel": "kernel", "dense_bias": "bias",
             "bn_weight": "gamma", "bn_bias": "beta", "bn_mean": "moving_mean", "bn_var": "moving_variance",
             "norm_weight": "gamma", "norm_bias": "beta"}


def is_block(layer) -> bool:
    """An nlattn Keras layer (a block or a Scale)."""
    return isinstance(layer, keras.layers.Layer) and hasattr(layer, "spec") and hasattr(layer, "block") \
        and type(layer).__module__.startswith("nlattn.tf")


def ensure_built(block) -> None:
    if not block.built:
        block.build(block.default_input_shape())


def _children(layer):
    if isinstance(layer, keras.Model) and hasattr(layer, "layers"):
        return list(layer.layers)
    return list(layer._flatten_layers(include_self=False, recursive=False))


def blocks(root) -> list[tuple[str, object]]:
    """(path, block) of every nlattn layer in ``root`` (path "" when ``root`` is one)."""
    if not isinstance(root, keras.layers.Layer):
        raise TypeError(f"expected a Keras layer or model, got {type(root).__name__}")
    if is_block(root):
        return [("", root)]
    found, seen = [], set()

    def walk(layer, path):
        for child in _children(layer):
            if id(child) in seen:
                continue
            seen.add(id(child))
            child_path = f"{path}.{child.name}" if path else child.name
            if is_block(child):
                found.append((child_path, child))
            else:
                walk(child, child_path)

    walk(root, "")
    if not found:
        raise TypeError(f"{type(root).__name__} {root.name!r} contains no nlattn layer")
    return found


def resolve(block) -> dict[str, tuple[object, Tensor]]:
    """{canonical name: (Keras variable, schema tensor)} of one block, in schema order (builds it
    if needed)."""
    ensure_built(block)
    table = {}
    for layer in block.spec.schema():
        if isinstance(layer, Param):
            if block.block == "Scale":
                var = block.gamma
            else:
                gate = block.sub.get(layer.name)
                var = gate.gamma if gate is not None else block.params[layer.name]
            table[layer.name] = (var, next(layer.tensors()))
            continue
        sub = block.sub[layer.prefix]
        for t in layer.tensors():
            table[t.name] = (getattr(sub, ATTRIBUTE[t.kind]), t)
    return table


def to_keras(t: Tensor, value, shape) -> np.ndarray:
    """Canonical layout -> the Keras variable's layout (``shape``)."""
    a = np.asarray(value)
    if t.kind == "conv_kernel":                      # (O, I, *k) -> (*k, I, O)
        a = a.transpose(*range(2, a.ndim), 1, 0)
    elif t.kind == "dense_kernel":                   # (out, in) -> (in, out)
        a = a.T
    return a.reshape(shape)   # e.g. the 2D concat_project kernel of a 1D/3D block


def to_canonical(t: Tensor, value) -> np.ndarray:
    """The Keras variable's layout -> canonical layout (``t.shape``)."""
    a = np.asarray(value)
    if t.kind == "conv_kernel":
        o, i, *k = t.shape
        a = a.reshape(*k, i, o).transpose(len(k) + 1, len(k), *range(len(k)))
    elif t.kind == "dense_kernel":
        a = a.T
    return np.ascontiguousarray(a.reshape(t.shape))


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def export_weights(model) -> dict[str, np.ndarray]:
    """Canonical weights of an nlattn layer, or of every nlattn layer inside a Keras model/layer
    (names prefixed by the layer path): PyTorch names and layouts, the variables' dtype."""
    out = {}
    for path, block in blocks(model):
        for name, (var, t) in resolve(block).items():
            out[_join(path, name)] = to_canonical(t, keras.ops.convert_to_numpy(var))
    return out


def load_weights(model, weights) -> None:
    """Set every variable from canonical weights (a dict, or a safetensors file), atomically:
    all blocks are checked and converted first; on any problem one WeightError lists them all and
    nothing changes."""
    if isinstance(weights, (str, os.PathLike)):
        from safetensors.numpy import load_file
        weights = load_file(os.fspath(weights))
    if not isinstance(weights, Mapping):
        raise TypeError(f"load_weights expects a dict of arrays or a path, got {type(weights).__name__}")
    found = blocks(model)
    name = found[0][1].spec.block if found[0][0] == "" else f"{type(model).__name__} {model.name!r}"
    owned = check_model_weights(name, [(path, b.spec) for path, b in found],
                                {str(k): v for k, v in weights.items()})
    plan = [(resolve(block), own) for (_, block), own in zip(found, owned)]
    staged = []
    for table, own in plan:
        for name, (var, t) in table.items():
            value = to_keras(t, np.asarray(own[name]), tuple(var.shape))
            staged.append((var, keras.ops.convert_to_tensor(value, dtype=var.dtype)))
    for var, value in staged:
        var.assign(value)
