"""Canonical weights of Flax blocks, or of any ``nnx.Module`` that contains nlattn blocks.

A block's sub-modules sit at the canonical prefixes (``_base.py``), so a canonical tensor is the
variable of its Flax name (kernel/bias, BatchNorm scale/bias/mean/var, GroupNorm scale/bias) in
the sub-module at its prefix; a free parameter is the ``nnx.Param`` at its own name. Inside a
larger model a block's names are prefixed by its attribute path (``stage.1.nl.theta.weight``).
Export, load and the Flax layouts (HWIO kernels, dense (in, out)) are ``nlattn.weights.access``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..specs import layer_name
from ..weights.access import WeightAccess, walk
from ._base import Block

#: canonical tensor kind -> the Flax variable's attribute in its layer (free parameters: the layer)
ATTRIBUTE = {
    "conv_kernel": "kernel",
    "conv_bias": "bias",
    "conv_g": "g",  # WeightNormConv's magnitude
    "dense_kernel": "kernel",
    "dense_bias": "bias",
    "bn_weight": "scale",
    "bn_bias": "bias",
    "bn_mean": "mean",
    "bn_var": "var",
    "norm_weight": "scale",
    "norm_bias": "bias",
}


class FlaxWeights(WeightAccess):
    channels_last = True

    def blocks(self, model):
        if isinstance(model, Block):
            return [("", model)]
        found: list[tuple[str, Block]] = []
        if isinstance(model, nnx.Module):
            for path, node in nnx.iter_graph(model):
                name = ".".join(str(p) for p in path)
                if isinstance(node, Block) and path and not any(name.startswith(p + ".") for p, _ in found):
                    found.append((name, node))
        if not found:
            raise TypeError(f"{type(model).__name__} contains no nlattn block")
        return found

    def variables(self, block):
        out = {}
        for layer in block.spec.schema():
            node = walk(block, layer_name(layer))
            for t in layer.tensors():
                out[t.name] = node if t.kind == "param" else getattr(node, ATTRIBUTE[t.kind])
        return out

    def read(self, variable):
        value = np.asarray(variable.get_value())
        if value.dtype.name == "bfloat16":  # NumPy has no bfloat16 of its own: widen exactly
            value = value.astype(np.float32)
        return value

    def convert(self, variable, value):
        """NumPy in the variable's dtype (bfloat16 is ml_dtypes'): checked by NumPy, not by a
        compiled jnp call per shape and dtype."""
        with np.errstate(over="ignore"):  # beyond the dtype's range: inf, reported by ``finite``
            return np.asarray(value, dtype=variable.get_value().dtype)

    def assign(self, variable, value):
        variable.set_value(jnp.asarray(value))

    def finite(self, value):
        return bool(np.isfinite(value).all())


ACCESS = FlaxWeights()
blocks = ACCESS.blocks
export_weights = ACCESS.export_weights
load_weights = ACCESS.load_weights
