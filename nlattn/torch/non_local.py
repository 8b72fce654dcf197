"""Non-local block (Wang et al. 2018) in its four modes, 1D/2D/3D, as ``nn.Module``s.

With ``implementation="auto"`` (the default) and without ``return_attention`` the (B, N, M)
relation is never materialised, forward or backward: ``aggregate`` runs the kernels of
``kernels.py`` (softmax modes a query chunk at a time with a recomputing backward, ``dot_product``
re-associated, ``concatenation`` by sorting); ``implementation="naive"`` always forms it in
``relation`` (the readable reference path).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..specs import NonLocalBlock1DConfig, NonLocalBlock2DConfig, NonLocalBlock3DConfig
from . import kernels
from ._base import Block

_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


class _NonLocal(Block):
    """Non-local block: out = x + BN(W(y)), y = A g with A the (B, N, M) relation of θ and φ.

    Input (B, C, *S) channels-first; output the same shape. With ``return_attention=True`` also
    returns A, (B, N, M), or (B, heads, N, M) when ``num_heads > 1`` (positions flattened row-major).
    Starts as the identity: BN γ = β = 0 (W = 0 without BN), as AlexHex7 initialises it.
    """

    def build_layers(self, make):
        cfg, L = self.spec, self.spec.layers()
        self.g = make(L["g"])
        if cfg.mode != "gaussian":
            self.theta = make(L["theta"])
            if not cfg.share_query_key:
                self.phi = make(L["phi"])
        if cfg.mode == "concatenation":
            self.concat_project = make(L["concat_project"])
        self.W = make(L["W"])
        if cfg.bn_layer:
            self.bn = make(L["bn"])

    def forward(self, x, return_attention: bool = False):
        """x (B, C, *S) -> (B, C, *S) [, attention (B, N, M) or (B, heads, N, M)]."""
        self.check_input(x)
        theta, phi, g = self.embed(x)  # (B, h, N | M, c)
        if self.fast(return_attention):  # never the (N, M) relation
            return self.residual(x, self.aggregate(theta, phi, g))
        attn = self.relation(theta, phi)  # (B, h, N, M)
        out = self.residual(x, attn @ g)
        if return_attention:
            return out, (attn[:, 0] if self.spec.num_heads == 1 else attn)
        return out

    def residual(self, x, y):
        """x + BN(W(y)) for y (B, h, N, Cv/h): the heads merged back into (B, Cv, *S) for W."""
        b, _, *spatial = x.shape
        z = self.W(y.transpose(-1, -2).reshape(b, y.shape[1] * y.shape[3], *spatial))
        if self.spec.bn_layer:
            z = self.bn(z)
        return z + x

    def pool(self, t):
        if not self.spec.sub_sample:
            return t
        window = self.spec.pool_window
        return _POOL[self.spec.spatial_dims](t, kernel_size=window, stride=window)

    def embed(self, x):
        """θ (B, h, N, Ck/h), φ (B, h, M, Ck/h), g (B, h, M, Cv/h): φ and g convolved then pooled
        (AlexHex7), or pooled then convolved (``pool_first``, Caffe2); θ is never pooled."""
        cfg = self.spec
        x_pooled = self.pool(x) if cfg.pool_first or cfg.mode == "gaussian" else None

        def pooled(conv):
            return conv(x_pooled) if cfg.pool_first else self.pool(conv(x))

        if cfg.mode == "gaussian":
            theta, phi = x, x_pooled
        elif cfg.share_query_key:
            theta = self.theta(x)
            phi = self.theta(x_pooled) if cfg.pool_first else self.pool(theta)  # one conv: reuse θ
        else:
            theta, phi = self.theta(x), pooled(self.phi)
        return tuple(self.split_heads(t) for t in (theta, phi, pooled(self.g)))

    def split_heads(self, t):
        """(B, C, *S) -> (B, h, positions, C / h)."""
        h = self.spec.num_heads
        return t.flatten(2).unflatten(1, (h, t.shape[1] // h)).transpose(-1, -2)

    def relation(self, theta, phi):
        """The relation A (B, h, N, M) of θ (B, h, N, c) and φ (B, h, M, c), materialised."""
        cfg, m = self.spec, phi.shape[-2]
        if cfg.mode == "concatenation":
            # the published formulation, pair by pair: [θᵢ; φⱼ] (B, h, N, M, 2c), then the 1×1 conv
            n, c = theta.shape[-2], theta.shape[-1]
            pairs = torch.cat(
                [theta[..., :, None, :].expand(-1, -1, -1, m, -1), phi[..., None, :, :].expand(-1, -1, n, -1, -1)], -1
            )
            return torch.relu(pairs @ self.concat_project.weight.reshape(2 * c)) / m
        f = kernels.energies(theta, phi)  # float32 for half-precision inputs
        if cfg.scale is not None:
            f = f * cfg.scale
        return (f / m if cfg.mode == "dot_product" else torch.softmax(f, dim=-1)).to(theta.dtype)

    def aggregate(self, theta, phi, g):
        """y = A g (B, h, N, Cv/h) without materialising A."""
        cfg = self.spec
        if cfg.mode == "dot_product":
            return kernels.dot_product_attention(theta, phi, g, cfg.scale)
        if cfg.mode == "concatenation":
            return kernels.concatenation_attention(*self.concat_terms(theta, phi), g)
        return kernels.softmax_attention(theta, phi, g, cfg.scale)

    def concat_terms(self, theta, phi):
        """ReLU(w·[θᵢ; φⱼ]) = ReLU(aᵢ + bⱼ): per-query a (B, h, N) and per-key b (B, h, M)."""
        w = self.concat_project.weight.reshape(-1)
        c = theta.shape[-1]
        return theta @ w[:c], phi @ w[c:]


class NonLocalBlock1D(_NonLocal):
    __doc__ = str(_NonLocal.__doc__).replace("(B, C, *S)", "(B, C, L)", 1)
    config_class = NonLocalBlock1DConfig


class NonLocalBlock2D(_NonLocal):
    __doc__ = str(_NonLocal.__doc__).replace("(B, C, *S)", "(B, C, H, W)", 1)
    config_class = NonLocalBlock2DConfig


class NonLocalBlock3D(_NonLocal):
    __doc__ = (
        str(_NonLocal.__doc__).replace("(B, C, *S)", "(B, C, T, H, W)", 1) + "    Sub-sampling max-pools (1, 2, 2).\n"
    )
    config_class = NonLocalBlock3DConfig
