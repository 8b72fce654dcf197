"""Explicit visual center (CFPNet): stem, LVC codebook branch and LightMLP branch, fused by a 1×1 conv.

Submodules carry the published EVCBlock's names, so ``nnx.state`` paths are the canonical ones.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ..specs import ExplicitVisualCenterConfig
from ._base import Block, Sequential, in_dtype, max_pool, work_dtype


class _Encoding(nnx.Module):
    """Encoding layer: soft-assigns each position to K codewords d_k (K, C) by
    softmax_k(s_k‖x − d_k‖²) and returns the assigned residuals summed over positions.

    The codebook (``codewords``, ``scale``) is float32 whatever the block's ``param_dtype``, and
    the distances and softmax run in float32 whatever its ``dtype`` (as torch keeps it): the
    logits s_k‖x − d_k‖² are large, so a bfloat16 ``scale`` alone (relative error 2⁻⁹) moves the
    assignments by several percent.
    """

    def __init__(self, make, L, p):
        self.codewords = make(L[f"{p}.codewords"], param_dtype=jnp.float32)
        self.scale = make(L[f"{p}.scale"], param_dtype=jnp.float32)

    def __call__(self, x):
        """x (B, H, W, C) -> (encoded (B, C, K), assignment (B, N, K)), in x's dtype; the codes K
        are the channels of the encoding (its BatchNorm normalises them), so they come last."""
        b, h, w, c = x.shape
        pos = x.reshape(b, h * w, c).astype(work_dtype(x.dtype))  # (B, N, C)
        d = self.codewords[...].astype(pos.dtype)
        # ‖x − d‖² = ‖x‖² − 2 x·d + ‖d‖², without the (B, N, K, C) residual tensor
        dist = (pos * pos).sum(-1, keepdims=True) - 2 * pos @ d.T + (d * d).sum(-1)
        assign = jax.nn.softmax(self.scale[...].astype(pos.dtype) * dist, -1)  # (B, N, K)
        # Σ_n a_nk (x_n − d_k) = (Aᵀ X)_k − (Σ_n a_nk) d_k
        encoded = jnp.swapaxes(assign, 1, 2) @ pos - assign.sum(1)[..., None] * d
        return jnp.swapaxes(encoded, 1, 2).astype(x.dtype), assign.astype(x.dtype)


class _Mean(nnx.Module):
    def __init__(self, axis):
        self.axis = axis

    def __call__(self, x):
        return x.mean(self.axis)


class _ConvBlock(nnx.Module):
    """Bottleneck 1×1 -> 3×3 -> 1×1 (each conv + BN) with a projected residual, then ReLU."""

    def __init__(self, make, L, p):
        self.conv1, self.bn1 = make(L[f"{p}.conv1"]), make(L[f"{p}.bn1"])
        self.conv2, self.bn2 = make(L[f"{p}.conv2"]), make(L[f"{p}.bn2"])
        self.conv3, self.bn3 = make(L[f"{p}.conv3"]), make(L[f"{p}.bn3"])
        self.residual_conv, self.residual_bn = make(L[f"{p}.residual_conv"]), make(L[f"{p}.residual_bn"])

    def __call__(self, x):
        t = jax.nn.relu(self.bn1(self.conv1(x)))
        t = jax.nn.relu(self.bn2(self.conv2(t)))
        return jax.nn.relu(self.bn3(self.conv3(t)) + self.residual_bn(self.residual_conv(x)))


class _LVC(nnx.Module):
    """Learnable visual center: ConvBlock, encoding (conv, BN, ReLU, Encoding, BN1d, ReLU, mean),
    and a sigmoid channel gate: y = ReLU(t + t·gate).

    In half precision the encoding's input features (``LVC.0`` conv, ``LVC.1`` BN) are computed in
    float32 like the codeword distances they feed: their bfloat16 rounding alone moved the soft
    assignment by 2.3e-2 (tolerance 2e-2); in float32, 1.7e-2. The gate and the map come back in
    the block's dtype.
    """

    def __init__(self, make, L, p, dtype):
        wide = None if dtype is None else work_dtype(dtype)
        self.conv_1 = _ConvBlock(make, L, f"{p}.conv_1")
        self.LVC = Sequential(
            make(L[f"{p}.LVC.0"], dtype=wide),
            make(L[f"{p}.LVC.1"], dtype=wide),
            jax.nn.relu,
            _Encoding(make, L, f"{p}.LVC.3"),
            make(L[f"{p}.LVC.4"]),
            jax.nn.relu,
            _Mean(-1),
        )
        self.fc = Sequential(make(L[f"{p}.fc.0"]), jax.nn.sigmoid)

    def __call__(self, x):
        local = self.conv_1(x)
        encoder = self.LVC
        wide = local.astype(work_dtype(local.dtype))
        encoded, assign = encoder[3](encoder[2](encoder[1](encoder[0](wide))))
        encoded = encoder[6](encoder[5](encoder[4](encoded)))  # BN over K, ReLU, mean over K
        gate = self.fc(encoded)[:, None, None, :].astype(local.dtype)
        return jax.nn.relu(local + local * gate), assign.astype(local.dtype)


class _BaseConv(nnx.Module):
    """conv + BN + SiLU."""

    def __init__(self, make, L, p):
        self.conv = make(L[f"{p}.conv"])
        self.bn = make(L[f"{p}.bn"])

    def __call__(self, x):
        return jax.nn.silu(self.bn(self.conv(x)))


class _DWConv(nnx.Module):
    def __init__(self, make, L, p):
        self.dconv = _BaseConv(make, L, f"{p}.dconv")
        self.pconv = _BaseConv(make, L, f"{p}.pconv")

    def __call__(self, x):
        return self.pconv(self.dconv(x))


class _Mlp(nnx.Module):
    """1×1 conv, exact GELU, 1×1 conv."""

    def __init__(self, make, L, p):
        self.fc1 = make(L[f"{p}.fc1"])
        self.fc2 = make(L[f"{p}.fc2"])

    def __call__(self, x):
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))  # exact (erf), as torch's GELU


class _LightMLP(nnx.Module):
    """x + s₁·DW(GN(x)), then + s₂·MLP(GN(·)), with per-channel layer scales s₁, s₂ (cast to
    the block's computation ``dtype`` where it has one, as its layers cast their parameters)."""

    def __init__(self, make, L, p, dtype):
        self.dtype = dtype
        self.dw = _DWConv(make, L, f"{p}.dw")
        self.norm1 = make(L[f"{p}.norm1"])
        self.norm2 = make(L[f"{p}.norm2"])
        self.mlp = _Mlp(make, L, f"{p}.mlp")
        self.layer_scale_1 = make(L[f"{p}.layer_scale_1"])
        self.layer_scale_2 = make(L[f"{p}.layer_scale_2"])

    def __call__(self, x):
        s1, s2 = in_dtype(self.layer_scale_1[...], self.dtype), in_dtype(self.layer_scale_2[...], self.dtype)
        x = x + s1 * self.dw(self.norm1(x))
        return x + s2 * self.mlp(self.norm2(x))


class ExplicitVisualCenter(Block):
    """CFPNet EVC on x (B, H, W, C) -> (B, H, W, C).

    Stem 7×7 conv + BN + ReLU + 3×3 max-pool (stride 1); ``lvc`` (codebook of ``num_codes``
    codewords) and ``l_MLP`` (LightMLP) branches on the stem; ``cnv1`` fuses their concatenation.
    With ``return_attention=True`` also returns the soft assignment of positions to codewords (B, N, K).
    """

    config_class = ExplicitVisualCenterConfig
    has_batch_norm = True

    def build_layers(self, make):
        L = self.spec.layers()
        self.conv1 = make(L["conv1"])
        self.bn1 = make(L["bn1"])
        self.lvc = _LVC(make, L, "lvc", self.dtype)
        self.l_MLP = _LightMLP(make, L, "l_MLP", self.dtype)
        self.cnv1 = make(L["cnv1"])

    def __call__(self, x, return_attention: bool = False):
        x = self.check_input(x)
        stem = max_pool(jax.nn.relu(self.bn1(self.conv1(x))), (3, 3), (1, 1), padding=1)
        lvc, assign = self.lvc(stem)
        out = self.cnv1(jnp.concatenate([lvc, self.l_MLP(stem)], -1))
        return (out, assign) if return_attention else out
