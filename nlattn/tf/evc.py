"""Explicit visual center (CFPNet): stem, LVC codebook branch and LightMLP branch, fused by a 1×1 conv.

Layers carry the published EVCBlock's names (``block.lvc.conv_1.conv1``, ``block.lvc.LVC[3].codewords``),
so the canonical weight names are their attribute paths. Each sub-module is a Keras layer named
after its canonical prefix (dots as underscores), in the block's dtype policy.
"""

from __future__ import annotations

import keras
from keras import ops

from ..specs import ExplicitVisualCenterConfig
from ._base import Block, dtype_of, flat, keras_name, sequential, work_dtype


class _Part(keras.layers.Layer):
    """An EVC sub-module: named after its canonical prefix, in the block's dtype policy; its layers
    are made (and built) by its constructor."""

    def __init__(self, make, p):
        super().__init__(name=keras_name(p), dtype=dtype_of(make))


class _Encoding(_Part):
    """Encoding layer: soft-assigns each position to K codewords d_k (K, C) by
    softmax_k(s_k‖x − d_k‖²) and returns the assigned residuals summed over positions.

    The codebook (``codewords``, ``scale``) stays float32 (never autocast) when the block is in
    bfloat16 or float16, and the distances and softmax run in float32: the logits s_k‖x − d_k‖²
    are large, so a half-precision ``scale`` alone moves the assignments by several percent."""

    def __init__(self, make, L, p):
        super().__init__(make, p)
        self.codewords = make(L[f"{p}.codewords"], wide=True)
        self.scale = make(L[f"{p}.scale"], wide=True)

    def call(self, x):
        """x (B, H, W, C) -> (encoded (B, C, K), assignment (B, N, K)) in x's dtype; the codes are
        last, as the channels of the BatchNorm that follows."""
        dtype = x.dtype
        wide = work_dtype(dtype)
        pos = ops.cast(flat(x), wide)  # (B, N, C)
        d = ops.cast(self.codewords, wide)
        # ‖x − d‖² = ‖x‖² − 2 x·d + ‖d‖², without the (B, N, K, C) residual tensor
        dist = (
            ops.sum(pos * pos, axis=-1, keepdims=True) - 2 * ops.matmul(pos, ops.transpose(d)) + ops.sum(d * d, axis=-1)
        )
        assign = ops.softmax(ops.cast(self.scale, wide) * dist, axis=-1)  # (B, N, K)
        # Σ_n a_nk (x_n − d_k) = (Aᵀ X)_k − (Σ_n a_nk) d_k, as (B, C, K)
        encoded = ops.matmul(ops.swapaxes(pos, 1, 2), assign) - ops.transpose(d) * ops.sum(assign, axis=1)[:, None]
        return ops.cast(encoded, dtype), ops.cast(assign, dtype)


class _Mean(keras.layers.Layer):
    def __init__(self, axis, **kwargs):
        super().__init__(**kwargs)
        self.axis = axis

    def call(self, x):
        return ops.mean(x, axis=self.axis)


class _ConvBlock(_Part):
    """Bottleneck 1×1 -> 3×3 -> 1×1 (each conv + BN) with a projected residual, then ReLU."""

    def __init__(self, make, L, p):
        super().__init__(make, p)
        self.conv1, self.bn1 = make(L[f"{p}.conv1"]), make(L[f"{p}.bn1"])
        self.conv2, self.bn2 = make(L[f"{p}.conv2"]), make(L[f"{p}.bn2"])
        self.conv3, self.bn3 = make(L[f"{p}.conv3"]), make(L[f"{p}.bn3"])
        self.residual_conv, self.residual_bn = make(L[f"{p}.residual_conv"]), make(L[f"{p}.residual_bn"])

    def call(self, x, training=None):
        t = ops.relu(self.bn1(self.conv1(x), training=training))
        t = ops.relu(self.bn2(self.conv2(t), training=training))
        return ops.relu(
            self.bn3(self.conv3(t), training=training) + self.residual_bn(self.residual_conv(x), training=training)
        )


class _LVC(_Part):
    """Learnable visual center: ConvBlock, encoding [conv, BN, ReLU, Encoding, BN over the codes,
    ReLU, mean over the codes], and a sigmoid channel gate: y = ReLU(t + t·gate)."""

    def __init__(self, make, L, p):
        super().__init__(make, p)
        dtype = dtype_of(make)
        self.conv_1 = _ConvBlock(make, L, f"{p}.conv_1")
        self.LVC = [
            make(L[f"{p}.LVC.0"]),
            make(L[f"{p}.LVC.1"]),
            keras.layers.ReLU(name=keras_name(f"{p}.LVC.2"), dtype=dtype),
            _Encoding(make, L, f"{p}.LVC.3"),
            make(L[f"{p}.LVC.4"]),
            keras.layers.ReLU(name=keras_name(f"{p}.LVC.5"), dtype=dtype),
            _Mean(-1, name=keras_name(f"{p}.LVC.6"), dtype=dtype),
        ]
        self.fc = [make(L[f"{p}.fc.0"]), keras.layers.Activation("sigmoid", name=keras_name(f"{p}.fc.1"), dtype=dtype)]

    def call(self, x, training=None):
        local = self.conv_1(x, training=training)
        encoder = self.LVC
        encoded, assign = encoder[3](sequential(encoder[:3], local, training))
        encoded = sequential(encoder[4:], encoded, training)  # BN over K, ReLU, mean over K
        gate = sequential(self.fc, encoded)[:, None, None, :]
        return ops.relu(local + local * gate), assign


class _BaseConv(_Part):
    """conv + BN + SiLU."""

    def __init__(self, make, L, p):
        super().__init__(make, p)
        self.conv = make(L[f"{p}.conv"])
        self.bn = make(L[f"{p}.bn"])

    def call(self, x, training=None):
        return ops.silu(self.bn(self.conv(x), training=training))


class _DWConv(_Part):
    def __init__(self, make, L, p):
        super().__init__(make, p)
        self.dconv = _BaseConv(make, L, f"{p}.dconv")
        self.pconv = _BaseConv(make, L, f"{p}.pconv")

    def call(self, x, training=None):
        return self.pconv(self.dconv(x, training=training), training=training)


class _Mlp(_Part):
    """1×1 conv, exact GELU, 1×1 conv."""

    def __init__(self, make, L, p):
        super().__init__(make, p)
        self.fc1 = make(L[f"{p}.fc1"])
        self.fc2 = make(L[f"{p}.fc2"])

    def call(self, x):
        return self.fc2(ops.gelu(self.fc1(x), approximate=False))


class _LightMLP(_Part):
    """x + s₁·DW(GN(x)), then + s₂·MLP(GN(·)), with per-channel layer scales s₁, s₂."""

    def __init__(self, make, L, p):
        super().__init__(make, p)
        self.dw = _DWConv(make, L, f"{p}.dw")
        self.norm1 = make(L[f"{p}.norm1"])
        self.norm2 = make(L[f"{p}.norm2"])
        self.mlp = _Mlp(make, L, f"{p}.mlp")
        self.layer_scale_1 = make(L[f"{p}.layer_scale_1"])
        self.layer_scale_2 = make(L[f"{p}.layer_scale_2"])

    def call(self, x, training=None):
        x = x + self.layer_scale_1 * self.dw(self.norm1(x), training=training)
        return x + self.layer_scale_2 * self.mlp(self.norm2(x))


@keras.saving.register_keras_serializable(package="nlattn")
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
        self.lvc = _LVC(make, L, "lvc")
        self.l_MLP = _LightMLP(make, L, "l_MLP")
        self.cnv1 = make(L["cnv1"])

    def call_channels_last(self, x, training, return_attention):
        stem = ops.max_pool(
            ops.relu(self.bn1(self.conv1(x), training=training)),
            3,
            strides=1,
            padding="same",
            data_format="channels_last",
        )
        lvc, assign = self.lvc(stem, training=training)
        out = self.cnv1(ops.concatenate([lvc, self.l_MLP(stem, training=training)], axis=-1))
        return (out, assign) if return_attention else out
