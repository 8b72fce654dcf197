"""Export and load of canonical weights, written once for every framework.

A framework contributes a small ``WeightAccess`` subclass (``nlattn/<framework>/_weights.py``):
how to find the nlattn blocks in a model, and how to read, convert and assign one variable. The
rest lives here: canonical names prefixed by the block's path in the model, layouts (canonical
conv kernels are (O, I/groups, *k) and dense kernels (out, in); channels-last frameworks store
(*k, I/groups, O) and (in, out)), and the atomic load: every block is checked and every value
converted before the first variable is assigned, so a failed load changes nothing.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import WeightError
from ..specs import Tensor, check_model_weights, tensors

#: tensor kinds that are running statistics, not trained parameters
STATISTICS = ("bn_mean", "bn_var")

#: held while variables are assigned or read, so loads and exports are atomic across threads
_LOCK = threading.RLock()


def join(path: str, name: str) -> str:
    """A canonical name inside a model: the block's path, then the name ("" for a lone block)."""
    return f"{path}.{name}" if path else name


def walk(root: Any, dotted: str) -> Any:
    """The object at a canonical dotted prefix: attributes, and integers index a list or a
    ``Sequential`` (``"W_spatial.3"`` is ``root.W_spatial[3]``)."""
    node = root
    for part in dotted.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


def to_native(t: Tensor, value: np.ndarray, shape: tuple[int, ...], channels_last: bool) -> np.ndarray:
    """A canonical array in a framework's layout, reshaped to its variable's ``shape`` (a 1D or 3D
    block's ``concat_project`` is a 2D conv in some frameworks)."""
    if channels_last and t.kind == "conv_kernel":  # (O, I, *k) -> (*k, I, O)
        value = np.transpose(value, (*range(2, value.ndim), 1, 0))
    elif channels_last and t.kind == "dense_kernel":  # (out, in) -> (in, out)
        value = value.T
    return value.reshape(shape)


def to_canonical(t: Tensor, value: np.ndarray, channels_last: bool) -> np.ndarray:
    """A framework's array in the canonical layout and shape ``t.shape``."""
    if channels_last and t.kind == "conv_kernel":
        o, i, *k = t.shape
        value = value.reshape(*k, i, o).transpose(len(k) + 1, len(k), *range(len(k)))
    elif channels_last and t.kind == "dense_kernel":
        value = value.T
    return np.ascontiguousarray(value.reshape(t.shape))


class WeightAccess:
    """What one framework must say for ``export_weights`` / ``load_weights`` to work."""

    #: whether the framework stores conv kernels (*k, I, O) and dense kernels (in, out)
    channels_last: bool = False

    # -- the framework-specific part ---------------------------------------------------------------
    def blocks(self, model: Any) -> list[tuple[str, Any]]:
        """(path, block) of every outermost nlattn block in ``model`` (path "" when it is one);
        TypeError if there is none."""
        raise NotImplementedError

    def variables(self, block: Any) -> dict[str, Any]:
        """The block's live variable of every canonical tensor, by canonical name."""
        raise NotImplementedError

    def read(self, variable: Any) -> np.ndarray:
        """A variable's value as NumPy, in the framework's layout (bfloat16 widened to float32)."""
        raise NotImplementedError

    def convert(self, variable: Any, value: np.ndarray) -> Any:
        """``value`` (the framework's layout) as what ``assign`` takes, in the variable's dtype."""
        raise NotImplementedError

    def assign(self, variable: Any, value: Any) -> None:
        raise NotImplementedError

    def finite(self, value: Any) -> bool:
        """Whether a converted value (the variable's dtype) holds no NaN or infinity."""
        raise NotImplementedError

    # -- written once ----------------------------------------------------------------------------
    def export_weights(self, model: Any) -> dict[str, np.ndarray]:
        """Canonical weights of a block, or of every nlattn block inside a model (names prefixed
        by the block's path), as NumPy copies in the variables' dtype, in schema order."""
        out = {}
        with _LOCK:  # never half of a concurrent load
            for path, block in self.blocks(model):
                schema = tensors(block.spec.schema())
                for name, variable in self.variables(block).items():
                    value = np.array(self.read(variable))
                    out[join(path, name)] = to_canonical(schema[name], value, self.channels_last)
        return out

    def load_weights(self, model: Any, weights: Mapping[str, Any]) -> None:
        """Set every canonical tensor of a block (or of every block in a model), atomically.

        All names, shapes and values are checked first (one ``WeightError`` lists every problem of
        every block), everything is converted to the variables' dtypes and checked again (a float64
        1e300 is no float32), and only then assigned — under a lock, so that two threads loading
        into one block leave one weight set or the other, never a mixture.
        """
        if not isinstance(weights, Mapping):
            raise TypeError(f"load_weights: expected a mapping of name -> array, got {type(weights).__name__}")
        found = self.blocks(model)
        name = found[0][1].spec.block if found[0][0] == "" else type(model).__name__
        arrays = {str(k): np.asarray(v) for k, v in weights.items()}
        owned = check_model_weights(name, [(path, b.spec) for path, b in found], arrays)
        staged, overflow = [], []
        for (path, block), own in zip(found, owned):
            schema = tensors(block.spec.schema())
            for key, variable in self.variables(block).items():
                native = to_native(schema[key], own[key], tuple(variable.shape), self.channels_last)
                staged.append((variable, self.convert(variable, native)))
                if not self.finite(staged[-1][1]):
                    overflow.append(
                        f"{join(path, key)!r} is not finite in the variable's dtype (values beyond its range)"
                    )
        if overflow:
            raise WeightError(name, overflow)
        with _LOCK:
            for variable, value in staged:
                self.assign(variable, value)

    def running_stats(self, block: Any) -> dict[str, np.ndarray]:
        """Every BatchNorm running mean and variance of a block, by canonical name."""
        kinds = tensors(block.spec.schema())
        return {k: v for k, v in self.export_weights(block).items() if kinds[k].kind in STATISTICS}
