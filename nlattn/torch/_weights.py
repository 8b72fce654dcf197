"""Canonical weights of torch blocks, or of any model that contains nlattn blocks.

The canonical names are the blocks' own ``state_dict()`` keys (without ``num_batches_tracked``)
and torch's layouts are the canonical ones, so a canonical tensor is the block's parameter or
buffer of that name. Inside a larger model a block's names are prefixed by its path
(``layer3.1.nl.theta.weight``). Export and load themselves are ``nlattn.weights.access``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..specs import tensors
from ..weights.access import WeightAccess
from ._base import Block


class TorchWeights(WeightAccess):
    channels_last = False

    def blocks(self, model):
        if not isinstance(model, nn.Module):
            raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
        if isinstance(model, Block):
            return [("", model)]
        found: list[tuple[str, Block]] = []
        for path, m in model.named_modules():
            if isinstance(m, Block) and not any(path.startswith(p + ".") for p, _ in found):
                found.append((path, m))
        if not found:
            raise TypeError(f"{type(model).__name__} contains no nlattn block")
        return found

    def variables(self, block):
        live = dict(block.named_parameters())
        live.update(block.named_buffers())
        return {name: live[name] for name in tensors(block.spec.schema())}

    def read(self, variable):
        value = variable.detach().cpu()
        if value.dtype == torch.bfloat16:  # NumPy has no bfloat16: widen exactly
            value = value.float()
        return value.numpy()

    def convert(self, variable, value):
        value = np.array(value, dtype=value.dtype.newbyteorder("="))
        return torch.from_numpy(value).to(device=variable.device, dtype=variable.dtype)

    def assign(self, variable, value):
        with torch.no_grad():
            variable.copy_(value)

    def finite(self, value):
        return bool(torch.isfinite(value).all())


ACCESS = TorchWeights()
blocks = ACCESS.blocks
export_weights = ACCESS.export_weights
load_weights = ACCESS.load_weights
