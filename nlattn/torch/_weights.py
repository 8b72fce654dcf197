"""Canonical weights of torch blocks, or of any model that contains nlattn blocks.

The canonical names are the blocks' own ``state_dict()`` keys (without ``num_batches_tracked``),
and torch's layouts are the canonical ones, so the mapping is driven by ``spec.schema()`` alone:
every schema tensor is the block's parameter or buffer of that name. Inside a larger model a
block's names are prefixed by its path (``layer3.1.nl.theta.weight``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from ..errors import WeightError
from ..specs import check_weights, tensors
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


def _in_model(problem: str, path: str, block: Block) -> str:
    """A block's weight problem with the tensor named by its full path in the model."""
    if not path:
        return problem
    named = re.sub(r"'([^']*)'", lambda m: repr(_join(path, m.group(1))), problem, count=1)
    return f"{named} ({block.spec.block} at {path!r})"


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
    weights = {str(k): _as_numpy(v) for k, v in weights.items()}
    problems, plan, claimed = [], [], set()
    for path, block in found:
        prefix = _join(path, "")
        own = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        claimed.update(prefix + k for k in own)
        try:
            check_weights(block.spec.block, block.spec.schema(), own)
        except WeightError as e:
            problems += [_in_model(p, path, block) for p in e.problems]
        else:
            plan.append((block, own))
    problems += [f"unexpected {k!r} (no nlattn block at that path)" for k in weights if k not in claimed]
    if problems:
        name = found[0][1].spec.block if found[0][0] == "" else type(module).__name__
        raise WeightError(name, problems)
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
