"""Non-local block (Wang et al. 2018) in its four modes, 1D/2D/3D, as ``nn.Module``s.

With ``implementation="auto"`` (the default) and without ``return_attention`` the (B, N, M)
relation is never materialised: softmax modes run through ``F.scaled_dot_product_attention``
(CPU flash kernel), ``dot_product`` re-associates θ(φᵀg)/M, and ``concatenation`` sums
ReLU(aᵢ + bⱼ) g over keys sorted by bⱼ (prefix sums, O((N + M) log M)).
``implementation="naive"`` always materialises it (the readable reference path).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..specs import NonLocalBlock1DConfig, NonLocalBlock2DConfig, NonLocalBlock3DConfig
from ._common import Block, attend, batch_norm, conv, layers, work_dtype, zero_

_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


class _NonLocal(Block):
    """Non-local block: out = x + BN(W(y)), y = A g with A the (B, N, M) relation of θ and φ.

    Input (B, C, *S) channels-first; output the same shape. With ``return_attention=True`` also
    returns A, (B, N, M), or (B, heads, N, M) when ``num_heads > 1`` (positions flattened row-major).
    Starts as the identity: BN γ = β = 0 (W = 0 without BN), as AlexHex7 initialises it.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        cfg, L = self.spec, layers(self.spec)
        # registered in schema order: g, θ, φ, concat_project, W, bn
        self.g = conv(L["g"])
        if cfg.mode != "gaussian":
            self.theta = conv(L["theta"])
            if not cfg.share_query_key:
                self.phi = conv(L["phi"])
        if cfg.mode == "concatenation":
            self.concat_project = conv(L["concat_project"])
        self.W = conv(L["W"])
        if cfg.bn_layer:
            self.bn = batch_norm(L["bn"], cfg.spatial_dims)
            zero_(self.bn)
        else:
            zero_(self.W)
        self._finish()

    def _pool(self, t):
        if not self.spec.sub_sample:
            return t
        w = self.spec.pool_window
        return _POOL[self.spec.spatial_dims](t, kernel_size=w, stride=w)

    def _embed(self, layer, x, x_pooled):
        """conv then pool (AlexHex7), or pool then conv (``pool_first``, Caffe2)."""
        return layer(x_pooled) if self.spec.pool_first else self._pool(layer(x))

    def forward(self, x, return_attention: bool = False):
        """x (B, C, *S) -> (B, C, *S) [, attention (B, N, M) or (B, heads, N, M)]."""
        self.check_input(x)
        cfg = self.spec
        b, c, *spatial = x.shape
        x_pooled = self._pool(x) if cfg.pool_first or cfg.mode == "gaussian" else None
        if cfg.mode == "gaussian":
            theta, phi = x, x_pooled
        else:
            theta = self.theta(x)
            if cfg.share_query_key and not cfg.pool_first:
                phi = self._pool(theta)           # the same conv: reuse θ
            else:
                phi = self._embed(self.theta if cfg.share_query_key else self.phi, x, x_pooled)
        g = self._embed(self.g, x, x_pooled)

        h = cfg.num_heads
        theta = theta.reshape(b, h, theta.shape[1] // h, -1)     # (B, h, Ck/h, N)
        phi = phi.reshape(b, h, phi.shape[1] // h, -1)           # (B, h, Ck/h, M)
        g = g.reshape(b, h, g.shape[1] // h, -1)                 # (B, h, Cv/h, M)
        if self.fast(return_attention):
            y = self._aggregate(theta, phi, g)                       # never the (N, M) relation
        else:
            attn = self.relation(theta, phi)                         # (B, h, N, M)
            y = torch.einsum("bhnm,bhcm->bhcn", attn, g)
        z = self.W(y.reshape(b, -1, *spatial))
        if cfg.bn_layer:
            z = self.bn(z)
        out = z + x
        if return_attention:
            return out, (attn[:, 0] if h == 1 else attn)
        return out

    def relation(self, theta, phi):
        """The relation A (B, h, N, M) of θ (B, h, Ck, N) and φ (B, h, Ck, M), materialised."""
        cfg, m = self.spec, phi.shape[-1]
        if cfg.mode == "concatenation":
            # the published formulation, pair by pair: [θᵢ; φⱼ] (B, h, 2Ck, N, M), then the 1×1 conv
            n = theta.shape[-1]
            pairs = torch.cat([theta[..., None].expand(-1, -1, -1, -1, m),
                               phi[..., None, :].expand(-1, -1, -1, n, -1)], dim=2)
            f = torch.einsum("c,bhcnm->bhnm", self.concat_project.weight.reshape(-1), pairs)
            return torch.relu(f) / m
        f = torch.einsum("bhcn,bhcm->bhnm", theta, phi)
        if cfg.scale is not None:
            f = f * cfg.scale
        if cfg.mode == "dot_product":
            return f / m
        return torch.softmax(f, dim=-1, dtype=work_dtype(f.dtype)).to(f.dtype)

    def _concat_terms(self, theta, phi):
        """ReLU(w·[θᵢ; φⱼ]) = ReLU(aᵢ + kⱼ): per-query a (B, h, N) and per-key k (B, h, M)."""
        w = self.concat_project.weight.reshape(-1)
        ci = theta.shape[2]
        return (torch.einsum("c,bhcn->bhn", w[:ci], theta), torch.einsum("c,bhcm->bhm", w[ci:], phi))

    def _aggregate(self, theta, phi, g):
        """y = A g (B, h, Cv/h, N) without materialising A."""
        cfg, m = self.spec, phi.shape[-1]
        scale = 1.0 if cfg.scale is None else float(cfg.scale)
        if cfg.mode == "dot_product":                      # θᵀ(φ gᵀ)·s/M: linear in N
            kv = torch.einsum("bhcm,bhdm->bhcd", phi, g)
            return torch.einsum("bhcd,bhcn->bhdn", kv, theta) * (scale / m)
        if cfg.mode == "concatenation":
            return _sorted_relu_sum(*self._concat_terms(theta, phi), g) / m
        return attend(theta, phi, g, scale)


def _sorted_relu_sum(a, k, g):
    """Σⱼ ReLU(aᵢ + kⱼ) g[:, j] for a (B, h, N), k (B, h, M), g (B, h, C, M) -> (B, h, C, N).

    With keys sorted by k descending, the j with kⱼ > −aᵢ are a prefix of length nᵢ, so the sum is
    aᵢ·G[nᵢ] + KG[nᵢ] with G, KG the prefix sums of g and k·g (float32 or wider).
    """
    dtype = g.dtype
    a, k, g = (t.to(work_dtype(dtype)) for t in (a, k, g))
    k_sorted, order = torch.sort(k, dim=-1, descending=True)
    g_sorted = torch.gather(g, -1, order[..., None, :].expand_as(g))
    zero = g.new_zeros(*g.shape[:-1], 1)
    prefix_g = torch.cat([zero, g_sorted.cumsum(-1)], -1)                          # (B, h, C, M+1)
    prefix_kg = torch.cat([zero, (g_sorted * k_sorted[..., None, :]).cumsum(-1)], -1)
    # n_i = #{j : kⱼ > −aᵢ} = #{j : −kⱼ < aᵢ}, and −k_sorted is ascending
    count = torch.searchsorted((-k_sorted).contiguous(), a.contiguous(), side="left")
    index = count[..., None, :].expand(*g.shape[:-1], count.shape[-1])
    y = a[..., None, :] * torch.gather(prefix_g, -1, index) + torch.gather(prefix_kg, -1, index)
    return y.to(dtype)


class NonLocalBlock1D(_NonLocal):
    __doc__ = _NonLocal.__doc__.replace("(B, C, *S)", "(B, C, L)", 1)
    config_class = NonLocalBlock1DConfig


class NonLocalBlock2D(_NonLocal):
    __doc__ = _NonLocal.__doc__.replace("(B, C, *S)", "(B, C, H, W)", 1)
    config_class = NonLocalBlock2DConfig


class NonLocalBlock3D(_NonLocal):
    __doc__ = _NonLocal.__doc__.replace("(B, C, *S)", "(B, C, T, H, W)", 1) + \
        "    Sub-sampling max-pools (1, 2, 2).\n"
    config_class = NonLocalBlock3DConfig
