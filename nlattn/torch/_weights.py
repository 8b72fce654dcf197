"""Canonical weights of torch blocks, or of any model that contains nlattn blocks.

The canonical names are the blocks' own ``state_dict()`` keys (without ``num_batches_tracked``),
and torch's layouts are the canonical ones, so the mapping is driven by ``spec.schema()`` alone:
every schema tensor is the block's parameter or buffer of that name. Inside a larger model a
block's names are prefixed by its path (``layer3.1.nl.theta.weight``).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from ..specs import check_model_weights, tensors
from ._common import Block


def blocks(module: nn.Module) -> list[tuple[str, Block]]:
    """(path, block) of every nlattn block in ``module`` (path "" when ``module`` is one)."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(module).__name__}")
    found: list[tuple[str, Block]] = []
    for path, m in module.named_modules():
        if isinstance(m, Block) and not any(path.startswith(p + ".") for p, _ in found if p):
            found.append((path, m))
            if not path:
                break
    if not found:
        raise TypeError(f"{type(module).__name__} contains no nlattn block")
    return found


def _variables(block: Block) -> dict[str, torch.Tensor]:
    """The block's schema tensors (parameters and BN buffers), by canonical name."""
    live = dict(block.named_parameters())
    live.update(block.named_buffers())
    return {name: live[name] for name in tensors(block.spec.schema())}


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _as_numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype == torch.bfloat16:      # NumPy has no bfloat16: widen exactly
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def export_weights(module: nn.Module) -> dict[str, np.ndarray]:
    """Canonical weights of a block, or of every nlattn block inside a model (prefixed by its path).

    Arrays are copies in the block's dtype (bfloat16 widened to float32), in schema order.
    """
    out = {}
    for path, block in blocks(module):
        for name, t in _variables(block).items():
            out[_join(path, name)] = _as_numpy(t).copy()
    return out


def load_weights(module: nn.Module, weights: Mapping) -> None:
    """Set every canonical tensor of a block (or of every block in a model) from ``weights``.

    Atomic: all names, shapes and values are checked first (one ``WeightError`` lists every
    problem, over all blocks), everything is converted, and only then assigned.
    """
    if not isinstance(weights, Mapping):
        raise TypeError(f"load_weights: expected a mapping of name -> array, got {type(weights).__name__}")
    found = blocks(module)
    name = found[0][1].spec.block if found[0][0] == "" else type(module).__name__
    owned = check_model_weights(name, [(path, b.spec) for path, b in found],
                                {str(k): _as_numpy(v) for k, v in weights.items()})
    plan = [(block, own) for (_, block), own in zip(found, owned)]
    staged = []
    for block, own in plan:
        live = _variables(block)
        for name, value in own.items():
            dst = live[name]
            src = torch.from_numpy(np.array(value, dtype=value.dtype.newbyteorder("="))).to(device=dst.device, dtype=dst.dtype)
            staged.append((dst, src))
    with torch.no_grad():
        for dst, src in staged:
            dst.copy_(src)
