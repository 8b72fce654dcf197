"""A SAGAN self-attention written as another project would write it, and its nlattn adapter.

The module follows the paper's symbols, not nlattn's: f (keys), g (queries) and h (values) are
``nn.Linear`` layers over channels-last features, ``sigma`` the residual gate, a 0-d parameter.
The adapter maps nlattn's canonical weights (``query_conv.weight`` (C/8, C, 1, 1), ``gamma`` (1,),
...) onto those names and layouts, and the gradients back. ``WrongAxisAdapter`` runs a copy whose
softmax normalises over the queries instead of the keys: the suite must fail it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from nlattn.conformance import Adapter, NotSupported


class SelfAttn(nn.Module):
    """x (B, C, H, W) -> x + σ·o, o_j = Σ_i softmax_i(f(x_i)·g(x_j)) h(x_i) (j queries, i keys)."""

    def __init__(self, channels: int, ratio: int = 8, key_axis: int = -1):
        super().__init__()
        self.f = nn.Linear(channels, channels // ratio)
        self.g = nn.Linear(channels, channels // ratio)
        self.h = nn.Linear(channels, channels)
        self.sigma = nn.Parameter(torch.zeros(()))
        self.key_axis = key_axis  # -1: softmax over the keys (right); -2 over the queries (wrong)

    def forward(self, x, with_map: bool = False):
        b, c, height, width = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (B, N, C)
        scores = self.g(tokens) @ self.f(tokens).transpose(1, 2)  # (B, N queries, N keys)
        beta = torch.softmax(scores, dim=self.key_axis)
        o = (beta @ self.h(tokens)).transpose(1, 2).reshape(b, c, height, width)
        y = x + self.sigma * o
        return (y, beta) if with_map else y


#: canonical conv name -> this module's linear layer
LAYERS = {"query_conv": "g", "key_conv": "f", "value_conv": "h"}
DTYPES = {"float32": torch.float32, "float64": torch.float64}


class SaganStyleAdapter(Adapter):
    name = "sagan-style"
    dtypes = ("float32", "float64")
    supports_gradients = True
    key_axis = -1

    def supports(self, case):
        if case.block != "SelfAttention":
            return f"sagan-style implements SelfAttention only, not {case.block}"
        return None

    def build(self, block, config, dtype):
        if block != "SelfAttention":  # the runner asks supports() first: this is a second guard
            raise NotSupported(f"no {block}")
        return SelfAttn(config["in_channels"], config.get("qk_ratio", 8), self.key_axis).to(DTYPES[dtype]).eval()

    def load_weights(self, module, weights):
        own = {"sigma": weights["gamma"].reshape(())}
        for conv, linear in LAYERS.items():
            own[f"{linear}.weight"] = weights[f"{conv}.weight"][:, :, 0, 0]  # (out, in, 1, 1) -> (out, in)
            own[f"{linear}.bias"] = weights[f"{conv}.bias"]
        dtype = next(module.parameters()).dtype
        module.load_state_dict({k: torch.as_tensor(np.asarray(v)).to(dtype) for k, v in own.items()})

    def _input(self, module, x):
        return torch.as_tensor(np.asarray(x, dtype=np.float64)).to(next(module.parameters()).dtype)

    def forward(self, module, x, *, training=False, return_attention=False):
        with torch.no_grad():
            out = module(self._input(module, x), with_map=return_attention)
        if return_attention:
            return tuple(t.double().numpy() for t in out)
        return out.double().numpy()

    def running_stats(self, module):
        return {}  # no BatchNorm

    def gradients(self, module, x, cotangent):
        module.zero_grad(set_to_none=True)
        xt = self._input(module, x).requires_grad_(True)
        out = module(xt)
        (out * torch.as_tensor(np.asarray(cotangent)).to(out.dtype)).sum().backward()
        grads = {"gamma": module.sigma.grad.reshape(1)}
        for conv, linear in LAYERS.items():
            layer = getattr(module, linear)
            grads[f"{conv}.weight"] = layer.weight.grad[:, :, None, None]
            grads[f"{conv}.bias"] = layer.bias.grad
        return xt.grad.double().numpy(), {k: g.double().numpy() for k, g in grads.items()}


class WrongAxisAdapter(SaganStyleAdapter):
    """The same module with its softmax over the wrong axis (queries)."""

    name = "sagan-wrong-axis"
    key_axis = -2
