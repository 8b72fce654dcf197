"""Float64 building blocks of the reference: convs, norms, pooling, softmax (channels-first)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..specs import WEIGHT_NORM_G, WEIGHT_NORM_V, BatchNorm, Conv, GroupNorm, weight_norm_kernel


@dataclass
class RunningStats:
    """Collects BatchNorm running-statistic updates of a train-mode reference call.

    ``unbiased=True`` is PyTorch's update (running_var takes the n/(n-1)-corrected batch
    variance); Keras and Flax update with the biased variance, so their adapters ask for
    ``unbiased=False``. The normalisation itself always uses the biased variance.
    """

    unbiased: bool = True
    updates: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class Context:
    """What a reference call needs besides x: the weights (float64) and the mode."""

    weights: dict[str, np.ndarray]
    training: bool = False
    stats: RunningStats | None = None

    def __getitem__(self, name: str) -> np.ndarray:
        return self.weights[name]


def conv(ctx: Context, x: np.ndarray, layer: Conv) -> np.ndarray:
    """N-d convolution (cross-correlation) of x (B, C, *S), stride 1, zero padding ``layer.padding``;
    a weight-normalised conv's kernel is g·v/‖v‖."""
    if layer.weight_norm:
        w = weight_norm_kernel(ctx[f"{layer.prefix}.{WEIGHT_NORM_G}"], ctx[f"{layer.prefix}.{WEIGHT_NORM_V}"])
    else:
        w = ctx[f"{layer.prefix}.weight"]
    k = w.shape[2:]
    if layer.padding is not None:
        x = np.pad(x, [(0, 0), (0, 0)] + [(p, p) for p in layer.padding])
    g = layer.groups
    b, c = x.shape[:2]
    if all(s == 1 for s in k):
        xg = x.reshape(b, g, c // g, *x.shape[2:])
        wg = w.reshape(g, w.shape[0] // g, c // g)
        y = np.einsum("goi,bgi...->bgo...", wg, xg).reshape(b, w.shape[0], *x.shape[2:])
    else:
        if g != 1:
            raise NotImplementedError("grouped convolutions are only needed with 1x1 kernels")
        win = sliding_window_view(x, k, axis=tuple(range(2, x.ndim)))  # (B, C, *S', *k)
        nd = len(k)
        letters = "xyz"[:nd]
        kl = "uvw"[:nd]
        y = np.einsum(f"bi{letters}{kl},oi{kl}->bo{letters}", win, w, optimize=True)
    if layer.bias:
        y = y + ctx[f"{layer.prefix}.bias"].reshape(1, -1, *([1] * (y.ndim - 2)))
    return y


def dense(ctx: Context, x: np.ndarray, prefix: str) -> np.ndarray:
    return x @ ctx[f"{prefix}.weight"].T + ctx[f"{prefix}.bias"]


def batch_norm(ctx: Context, x: np.ndarray, layer: BatchNorm) -> np.ndarray:
    """BatchNorm over axis 1. Eval: running statistics. Train: batch statistics, and the update."""
    p = layer.prefix
    shape = (1, -1) + (1,) * (x.ndim - 2)
    if ctx.training:
        axes = (0,) + tuple(range(2, x.ndim))
        mean = x.mean(axis=axes)
        var = x.var(axis=axes)
        if ctx.stats is not None:
            n = x.size // x.shape[1]
            update_var = var * n / (n - 1) if ctx.stats.unbiased and n > 1 else var
            m = layer.momentum
            ctx.stats.updates[f"{p}.running_mean"] = (1 - m) * ctx[f"{p}.running_mean"] + m * mean
            ctx.stats.updates[f"{p}.running_var"] = (1 - m) * ctx[f"{p}.running_var"] + m * update_var
    else:
        mean, var = ctx[f"{p}.running_mean"], ctx[f"{p}.running_var"]
    inv = ctx[f"{p}.weight"] / np.sqrt(var + layer.eps)
    return (x - mean.reshape(shape)) * inv.reshape(shape) + ctx[f"{p}.bias"].reshape(shape)


def group_norm(ctx: Context, x: np.ndarray, layer: GroupNorm) -> np.ndarray:
    b, c = x.shape[:2]
    xg = x.reshape(b, layer.num_groups, -1)
    xg = (xg - xg.mean(-1, keepdims=True)) / np.sqrt(xg.var(-1, keepdims=True) + layer.eps)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return xg.reshape(x.shape) * ctx[f"{layer.prefix}.weight"].reshape(shape) + ctx[f"{layer.prefix}.bias"].reshape(
        shape
    )


def max_pool(
    x: np.ndarray, window: tuple[int, ...], stride: tuple[int, ...] | None = None, padding: int = 0
) -> np.ndarray:
    """Max pool over the trailing len(window) axes, floor mode; padding uses -inf."""
    stride = stride or window
    nd = len(window)
    if padding:
        x = np.pad(x, [(0, 0)] * (x.ndim - nd) + [(padding, padding)] * nd, constant_values=-np.inf)
    axes = tuple(range(x.ndim - nd, x.ndim))
    win = sliding_window_view(x, window, axis=axes)
    index = (Ellipsis,) + tuple(slice(None, None, s) for s in stride) + (slice(None),) * nd
    return win[index].max(axis=tuple(range(-nd, 0)))


def softmax(e: np.ndarray, axis: int = -1) -> np.ndarray:
    """Max-subtracted softmax: no overflow for large energies; -inf entries get weight 0."""
    z = np.exp(e - e.max(axis=axis, keepdims=True))
    return z / z.sum(axis=axis, keepdims=True)


def relu(x):
    return np.maximum(x, 0.0)


def sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free form


def silu(x):
    return x * sigmoid(x)


def gelu(x):
    """Exact (erf) GELU, as torch.nn.GELU() and the EVC anchor use."""
    from math import erf

    return 0.5 * x * (1.0 + np.vectorize(erf, otypes=[np.float64])(x / math.sqrt(2.0)))


def as_float64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)
