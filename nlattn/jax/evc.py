"""Explicit visual center (CFPNet): stem, LVC codebook branch and LightMLP branch, fused by a 1×1 conv."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ..specs import ExplicitVisualCenterConfig
from ._base import Block, max_pool


def _gelu(x):
    return jax.nn.gelu(x, approximate=False)   # exact (erf) GELU, as torch.nn.GELU(); Flax's default is tanh


class ExplicitVisualCenter(Block):
    """EVC on (B, H, W, C) -> (B, H, W, C).

    Keywords: in_channels (>= 4), num_codes=64, mlp_ratio=4, bn_eps=1e-5, conv_block_bn_eps=1e-6,
    gn_eps=1e-5, bn_momentum=0.1, layer_scale_init=1e-5. Sub-modules follow the published EVCBlock
    (``conv1``, ``bn1``, ``lvc.conv_1.*``, ``lvc.LVC[0|1|3|4]``, ``lvc.fc[0]``, ``l_MLP.*``, ``cnv1``).
    ``return_attention=True`` also returns the LVC's soft assignment of positions to codewords
    (B, N, K), positions flattened row-major.
    """
    config_class = ExplicitVisualCenterConfig

    def overrides(self):
        k, c = self.spec.num_codes, self.spec.in_channels
        bound = 1.0 / math.sqrt(k * c)   # the published Encoding init
        return {
            "lvc.LVC.3.codewords": lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound),
            "lvc.LVC.3.scale": lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -1.0, 0.0),
        }

    def __call__(self, x, return_attention: bool = False):
        x = self.check_input(x)
        stem = max_pool(jax.nn.relu(self.bn1(self.conv1(x))), (3, 3), (1, 1), padding=1)

        # LVC: bottleneck ConvBlock with a projected residual
        cb = self.lvc.conv_1
        t = jax.nn.relu(cb.bn1(cb.conv1(stem)))
        t = jax.nn.relu(cb.bn2(cb.conv2(t)))
        local = jax.nn.relu(cb.bn3(cb.conv3(t)) + cb.residual_bn(cb.residual_conv(stem)))
        # encoding layer: soft-assign every position to K codewords d_k by s_k‖x − d_k‖²
        enc = self.lvc.LVC
        feat = jax.nn.relu(enc[1](enc[0](local)))
        b, c = feat.shape[0], feat.shape[-1]
        pos = feat.reshape(b, -1, c)                                              # (B, N, C)
        resid = pos[:, :, None, :] - enc[3].codewords[...][None, None]            # (B, N, K, C)
        assign = jax.nn.softmax(enc[3].scale[...] * (resid ** 2).sum(-1), -1)     # (B, N, K)
        encoded = jnp.einsum("bnk,bnkc->bck", assign, resid)                      # (B, C, K): BN1d over K
        encoded = jax.nn.relu(enc[4](encoded)).mean(-1)                           # (B, C)
        channel_gate = jax.nn.sigmoid(self.lvc.fc[0](encoded))[:, None, None, :]
        lvc = jax.nn.relu(local + local * channel_gate)

        # LightMLP: depthwise/pointwise 1×1 (BN + SiLU) and a 1×1-conv MLP, each with a layer scale
        mm = self.l_MLP
        dw = jax.nn.silu(mm.dw.dconv.bn(mm.dw.dconv.conv(mm.norm1(stem))))
        dw = jax.nn.silu(mm.dw.pconv.bn(mm.dw.pconv.conv(dw)))
        mlp = stem + mm.layer_scale_1[...] * dw
        mlp = mlp + mm.layer_scale_2[...] * mm.mlp.fc2(_gelu(mm.mlp.fc1(mm.norm2(mlp))))

        out = self.cnv1(jnp.concatenate([lvc, mlp], -1))
        return (out, assign) if return_attention else out
