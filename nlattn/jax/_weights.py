"""Canonical weights <-> Flax variables, driven by ``block.spec.schema()``.

Canonical layout is PyTorch's: conv kernels (O, I/groups, *k) become Flax's (*k, I/groups, O), dense
(out, in) becomes (in, out), BN weight/bias/running_mean/running_var become scale/bias/mean/var,
GroupNorm weight/bias become scale/bias, free parameters are used as they are. Reading and writing
go through ``nnx.state`` / ``nnx.update``.
"""

from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..specs import Tensor, check_model_weights, tensors
from ._base import path_of

#: canonical tensor kind -> Flax variable name (free parameters keep their own name)
FLAX_NAME = {
    "conv_kernel": "kernel", "conv_bias": "bias",
    "dense_kernel": "kernel", "dense_bias": "bias",
    "bn_weight": "scale", "bn_bias": "bias", "bn_mean": "mean", "bn_var": "var",
    "norm_weight": "scale", "norm_bias": "bias",
}
#: kinds that are not trained (nnx.BatchStat, not nnx.Param)
STATISTICS = ("bn_mean", "bn_var")


def flax_path(t: Tensor) -> tuple[str | int, ...]:
    """The ``nnx.state`` path of a canonical tensor."""
    if t.kind == "param":
        return path_of(t.name)
    return path_of(t.name.rsplit(".", 1)[0]) + (FLAX_NAME[t.kind],)


def to_flax(t: Tensor, value: np.ndarray) -> np.ndarray:
    if t.kind == "conv_kernel":            # (O, I, *k) -> (*k, I, O)
        return np.transpose(value, (*range(2, value.ndim), 1, 0))
    if t.kind == "dense_kernel":           # (out, in) -> (in, out)
        return value.T
    return value


def to_canonical(t: Tensor, value: np.ndarray) -> np.ndarray:
    if t.kind == "conv_kernel":            # (*k, I, O) -> (O, I, *k)
        n = value.ndim
        return np.transpose(value, (n - 1, n - 2, *range(n - 2)))
    if t.kind == "dense_kernel":
        return value.T
    return value


def canonical(block: nnx.Module, state=None, *, trainable_only: bool = False) -> dict[str, np.ndarray]:
    """Canonical dict from ``state`` (default ``nnx.state(block)``; any state of the block's shape,
    e.g. its gradients), in schema order."""
    flat = dict(nnx.to_flat_state(nnx.state(block) if state is None else state))
    out = {}
    for name, t in tensors(block.spec.schema()).items():
        if trainable_only and t.kind in STATISTICS:
            continue
        value = flat[flax_path(t)]
        value = value.get_value() if isinstance(value, nnx.Variable) else value
        out[name] = np.array(to_canonical(t, np.asarray(value)))
    return out


def blocks_of(model: nnx.Module) -> dict[str, nnx.Module]:
    """The nlattn blocks of ``model`` by name prefix: ``{"": model}`` for a block itself, else every
    outermost block inside it, named by its attribute path joined with "." (``"stage.1.nl"``)."""
    from ._base import Block

    if isinstance(model, Block):
        return {"": model}
    found: dict[str, nnx.Module] = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, Block) and path:
            name = ".".join(str(p) for p in path)
            if not any(name.startswith(outer + ".") for outer in found):
                found[name] = node
    if not found:
        raise TypeError(f"{type(model).__name__} is not an nlattn.jax block and holds none")
    return found


def export_weights(model: nnx.Module) -> dict[str, np.ndarray]:
    """Every weight of a block by canonical name and layout, in the block's parameter dtype.

    ``model`` may also be any ``nnx.Module`` holding nlattn blocks: names are then prefixed by
    each block's attribute path (``"stage.1.nl.theta.weight"``).
    """
    return {_join(prefix, k): v for prefix, block in blocks_of(model).items()
            for k, v in canonical(block).items()}


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def load_weights(model: nnx.Module, weights: Mapping[str, np.ndarray]) -> None:
    """Set every weight of a block (or of every block inside ``model``) from a canonical dict, atomically.

    Everything is validated (one ``nlattn.WeightError`` lists every missing, extra, mis-shaped or
    non-finite tensor, of all blocks) and converted first; only then are the blocks updated, so on
    any failure nothing changes. Values are cast to the dtype of the variable they replace.
    """
    blocks = blocks_of(model)
    name = blocks[""].spec.block if list(blocks) == [""] else type(model).__name__
    owned = check_model_weights(name, [(path, b.spec) for path, b in blocks.items()], dict(weights))
    updates = [(block, _converted(block, own)) for block, own in zip(blocks.values(), owned)]
    for block, new in updates:
        nnx.update(block, new)


def _converted(block: nnx.Module, weights: Mapping[str, np.ndarray]):
    """The block's state holding ``weights`` (validated), in the dtypes of its variables."""
    current = dict(nnx.to_flat_state(nnx.state(block)))
    new = {}
    for name, t in tensors(block.spec.schema()).items():
        path = flax_path(t)
        dtype = current[path].get_value().dtype
        new[path] = jnp.asarray(np.asarray(to_flax(t, np.asarray(weights[name])), dtype=dtype))
    return nnx.from_flat_state(new)
