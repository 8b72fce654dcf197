"""Explicit visual center (CFPNet): stem, LVC codebook branch and LightMLP branch, fused by a 1×1 conv.

Submodules carry the published EVCBlock's names, so ``state_dict()`` keys are the canonical ones.
"""

from __future__ import annotations

import torch
from torch import nn

from ..specs import ExplicitVisualCenterConfig
from ._base import REDUCED, Block, without_autocast, work_dtype


class _Encoding(nn.Module):
    """Encoding layer: soft-assigns each position to K codewords d_k (K, C) by
    softmax_k(s_k‖x − d_k‖²) and returns the assigned residuals summed over positions (B, K, C).

    The codebook (``codewords``, ``scale``) stays float32 when the block is cast to bfloat16 or
    float16, and the distances and softmax run in float32: the logits s_k‖x − d_k‖² are large, so a
    bfloat16 ``scale`` alone (relative error 2⁻⁹) moves the assignments by several percent.
    """

    def __init__(self, make, L, p):
        super().__init__()
        self.codewords = make(L[f"{p}.codewords"])
        self.scale = make(L[f"{p}.scale"])

    def _apply(self, fn, recurse=True):
        def keep_wide(t):  # .to(bfloat16) / .half() move the codebook's device, not its precision
            out = fn(t)
            if out.dtype in REDUCED:
                return t.to(device=out.device, dtype=torch.float32)
            return out

        return super()._apply(keep_wide, recurse)

    def forward(self, x):
        """x (B, C, H, W) -> (encoded (B, K, C), assignment (B, N, K))."""
        dtype = x.dtype
        with without_autocast(x.device):
            pos = x.flatten(2).transpose(1, 2).to(work_dtype(dtype))  # (B, N, C)
            d = self.codewords.to(pos.dtype)
            # ‖x − d‖² = ‖x‖² − 2 x·d + ‖d‖², without the (B, N, K, C) residual tensor
            dist = (pos * pos).sum(-1, keepdim=True) - 2 * pos @ d.T + (d * d).sum(-1)
            assign = torch.softmax(self.scale.to(pos.dtype) * dist, dim=-1)  # (B, N, K)
            # Σ_n a_nk (x_n − d_k) = (Aᵀ X)_k − (Σ_n a_nk) d_k
            encoded = assign.transpose(1, 2) @ pos - assign.sum(1)[..., None] * d
        return encoded.to(dtype), assign.to(dtype)


class _Mean(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, x):
        return x.mean(self.dim)


class _ConvBlock(nn.Module):
    """Bottleneck 1×1 -> 3×3 -> 1×1 (each conv + BN) with a projected residual, then ReLU."""

    def __init__(self, make, L, p):
        super().__init__()
        self.conv1, self.bn1 = make(L[f"{p}.conv1"]), make(L[f"{p}.bn1"])
        self.conv2, self.bn2 = make(L[f"{p}.conv2"]), make(L[f"{p}.bn2"])
        self.conv3, self.bn3 = make(L[f"{p}.conv3"]), make(L[f"{p}.bn3"])
        self.residual_conv, self.residual_bn = make(L[f"{p}.residual_conv"]), make(L[f"{p}.residual_bn"])

    def forward(self, x):
        t = torch.relu(self.bn1(self.conv1(x)))
        t = torch.relu(self.bn2(self.conv2(t)))
        return torch.relu(self.bn3(self.conv3(t)) + self.residual_bn(self.residual_conv(x)))


class _LVC(nn.Module):
    """Learnable visual center: ConvBlock, encoding (conv, BN, ReLU, Encoding, BN1d, ReLU, mean),
    and a sigmoid channel gate: y = ReLU(t + t·gate)."""

    def __init__(self, make, L, p):
        super().__init__()
        self.conv_1 = _ConvBlock(make, L, f"{p}.conv_1")
        self.LVC = nn.Sequential(
            make(L[f"{p}.LVC.0"]),
            make(L[f"{p}.LVC.1"]),
            nn.ReLU(),
            _Encoding(make, L, f"{p}.LVC.3"),
            make(L[f"{p}.LVC.4"]),
            nn.ReLU(),
            _Mean(1),
        )
        self.fc = nn.Sequential(make(L[f"{p}.fc.0"]), nn.Sigmoid())

    def forward(self, x):
        local = self.conv_1(x)
        encoder = self.LVC
        encoded, assign = encoder[3](encoder[2](encoder[1](encoder[0](local))))
        encoded = encoder[6](encoder[5](encoder[4](encoded)))  # BN over K, ReLU, mean over K
        gate = self.fc(encoded)[:, :, None, None]
        return torch.relu(local + local * gate), assign


class _BaseConv(nn.Module):
    """conv + BN + SiLU."""

    def __init__(self, make, L, p):
        super().__init__()
        self.conv = make(L[f"{p}.conv"])
        self.bn = make(L[f"{p}.bn"])

    def forward(self, x):
        return nn.functional.silu(self.bn(self.conv(x)))


class _DWConv(nn.Module):
    def __init__(self, make, L, p):
        super().__init__()
        self.dconv = _BaseConv(make, L, f"{p}.dconv")
        self.pconv = _BaseConv(make, L, f"{p}.pconv")

    def forward(self, x):
        return self.pconv(self.dconv(x))


class _Mlp(nn.Module):
    """1×1 conv, exact GELU, 1×1 conv."""

    def __init__(self, make, L, p):
        super().__init__()
        self.fc1 = make(L[f"{p}.fc1"])
        self.fc2 = make(L[f"{p}.fc2"])

    def forward(self, x):
        return self.fc2(nn.functional.gelu(self.fc1(x)))


class _LightMLP(nn.Module):
    """x + s₁·DW(GN(x)), then + s₂·MLP(GN(·)), with per-channel layer scales s₁, s₂."""

    def __init__(self, make, L, p):
        super().__init__()
        self.dw = _DWConv(make, L, f"{p}.dw")
        self.norm1 = make(L[f"{p}.norm1"])
        self.norm2 = make(L[f"{p}.norm2"])
        self.mlp = _Mlp(make, L, f"{p}.mlp")
        self.layer_scale_1 = make(L[f"{p}.layer_scale_1"])
        self.layer_scale_2 = make(L[f"{p}.layer_scale_2"])

    def forward(self, x):
        x = x + self.layer_scale_1[:, None, None] * self.dw(self.norm1(x))
        return x + self.layer_scale_2[:, None, None] * self.mlp(self.norm2(x))


class ExplicitVisualCenter(Block):
    """CFPNet EVC on x (B, C, H, W) -> (B, C, H, W).

    Stem 7×7 conv + BN + ReLU + 3×3 max-pool (stride 1); ``lvc`` (codebook of ``num_codes``
    codewords) and ``l_MLP`` (LightMLP) branches on the stem; ``cnv1`` fuses their concatenation.
    With ``return_attention=True`` also returns the soft assignment of positions to codewords (B, N, K).
    """

    config_class = ExplicitVisualCenterConfig

    def build_layers(self, make):
        L = self.spec.layers()
        self.conv1 = make(L["conv1"])
        self.bn1 = make(L["bn1"])
        self.lvc = _LVC(make, L, "lvc")
        self.l_MLP = _LightMLP(make, L, "l_MLP")
        self.cnv1 = make(L["cnv1"])

    def forward(self, x, return_attention: bool = False):
        self.check_input(x)
        stem = nn.functional.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 3, stride=1, padding=1)
        lvc, assign = self.lvc(stem)
        out = self.cnv1(torch.cat([lvc, self.l_MLP(stem)], 1))
        return (out, assign) if return_attention else out
