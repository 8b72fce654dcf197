"""A plain embedded-Gaussian non-local block, as the widely copied 2D implementations have it, and
its nlattn adapter.

The module has in_channels, inter_channels, sub_sample and bn_layer and nothing else: no other
mode, no pool_first, scale, heads, shared θ/φ, value width, weight norm, and BatchNorm with torch's
defaults. The adapter declares every case that sets one of those "not supported", with the option
named, instead of failing it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nlattn.conformance import Adapter

#: the keywords this module has; the value every other config field must keep
HAS = ("in_channels", "inter_channels", "sub_sample", "bn_layer")
DEFAULTS = {
    "mode": "embedded_gaussian",
    "pool_first": False,
    "scale": None,
    "num_heads": 1,
    "share_query_key": False,
    "value_channels": None,
    "bn_eps": 1e-5,
    "bn_momentum": 0.1,
    "weight_norm": False,
}


class PlainNonLocal2D(nn.Module):
    def __init__(self, in_channels, inter_channels=None, sub_sample=True, bn_layer=True):
        super().__init__()
        inter = inter_channels or max(in_channels // 2, 1)
        self.sub_sample = sub_sample
        self.g, self.theta, self.phi = (nn.Conv2d(in_channels, inter, 1) for _ in range(3))
        self.W = nn.Conv2d(inter, in_channels, 1)
        self.bn = nn.BatchNorm2d(in_channels) if bn_layer else None

    def forward(self, x, return_attention=False):
        b, c, h, w = x.shape
        pool = (lambda t: F.max_pool2d(t, 2)) if self.sub_sample else (lambda t: t)
        theta = self.theta(x).flatten(2).transpose(1, 2)  # (B, N, c')
        phi = pool(self.phi(x)).flatten(2)  # (B, c', M)
        g = pool(self.g(x)).flatten(2).transpose(1, 2)  # (B, M, c')
        attn = torch.softmax(theta @ phi, dim=-1)
        z = self.W((attn @ g).transpose(1, 2).reshape(b, -1, h, w))
        y = (self.bn(z) if self.bn is not None else z) + x
        return (y, attn) if return_attention else y


class PlainNonLocalAdapter(Adapter):
    name = "plain-nl"
    dtypes = ("float32",)

    def supports(self, case):
        if case.block != "NonLocalBlock2D":
            return f"only NonLocalBlock2D, not {case.block}"
        config = case.spec.to_dict()
        missing = [f"{k}={config[k]!r}" for k, default in DEFAULTS.items() if config.get(k, default) != default]
        return f"no option for {', '.join(missing)}" if missing else None

    def build(self, block, config, dtype):
        return PlainNonLocal2D(**{k: v for k, v in config.items() if k in HAS}).eval()

    def load_weights(self, module, weights):
        module.load_state_dict(
            {k: torch.as_tensor(np.asarray(v, np.float32)) for k, v in weights.items()}, strict=False
        )

    def forward(self, module, x, *, training=False, return_attention=False):
        module.train(training)
        with torch.no_grad():
            out = module(torch.as_tensor(np.asarray(x, np.float32)), return_attention=return_attention)
        module.eval()
        return tuple(t.double().numpy() for t in out) if return_attention else out.double().numpy()

    def running_stats(self, module):
        if module.bn is None:
            return {}
        return {f"bn.{k}": getattr(module.bn, k).double().numpy() for k in ("running_mean", "running_var")}
