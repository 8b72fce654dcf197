"""Attention maps you can look at, for a block of any framework.

The array functions take a torch, Keras or Flax block (or, for non-local means, its config) and a
channels-first NumPy input (B, C, *S), run the block in eval mode with ``return_attention=True``
(docs/design.md §2 lists each block's map) and return float64 NumPy arrays:

* ``query_maps(block, x, queries)`` -> (B, Q, *S): for each query position, where it looks, at input
  resolution. Non-local, SelfAttention, PositionAttention (and RelationAwareAttention's spatial
  relations) rows are reshaped to the key grid — the input grid, or with ``sub_sample`` the max-pooled
  one (H//2 × W//2; in 3D T × H//2 × W//2, time is not pooled) — and upsampled to the input by
  repeating each key over the pooling window it was taken from (the rows or columns floor pooling
  drops get 0). ``key_maps`` gives the rows on the key grid itself. CrissCrossAttention places each
  pass's column and row weights in the image; with ``recurrence`` R > 1 the passes compose into the
  effective map over positions, value path only: A_eff = A_R ⋯ A_2 · A_1 (the residual and the
  dependence of each pass's values on the previous output left out), so a pixel reaches the whole
  image after two passes. NonLocalMeans gives each query pixel's normalised patch weights
  (``nl_means_weights``).
* ``channel_map(block, x)`` -> (B, C, C): ChannelAttention's map (RelationAwareAttention's channel
  relations when it has no spatial branch).
* ``context_map(block, x)`` -> (B, *S): GlobalContext's pooling weights, one map per image.
* ``codeword_maps(block, x)`` -> (B, K, *S): ExplicitVisualCenter's soft assignment of every position
  to each of its K codewords, one map per code.

Softmax maps sum to 1 over keys (non-local embedded_gaussian and gaussian, DisentangledNonLocal,
GlobalContext with attention pooling, SelfAttention,
PositionAttention, CrissCrossAttention of any R, CAM rows, EVC over codes, non-local means);
dot_product and concatenation rows are the relation divided by M, RGA's raw relations.

``figure(image, maps, queries)`` draws the image with the queries marked and one overlay per query
(matplotlib, the ``viz`` extra, imported only there); ``matrix_figure`` a C×C map.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import ConfigError, InputError
from .specs import BlockConfig, NonLocalConfig

#: blocks whose map has one row per query position
POSITIONAL = (
    "NonLocalBlock1D",
    "NonLocalBlock2D",
    "NonLocalBlock3D",
    "SelfAttention",
    "PositionAttention",
    "DisentangledNonLocal1D",
    "DisentangledNonLocal2D",
    "DisentangledNonLocal3D",
)


# --------------------------------------------------------------------------------------------
# Running a block of any framework
# --------------------------------------------------------------------------------------------


def run(block, x) -> tuple[np.ndarray, np.ndarray]:
    """(output, attention map) of a torch / Keras / Flax block on a channels-first NumPy ``x``,
    in eval mode, as float64 NumPy (the output channels-first). The block is left as it was."""
    from .weights.frameworks import framework_of

    x = np.asarray(x)
    fw = framework_of(block)
    if fw == "torch":
        import torch

        first = next(iter(block.parameters()), None)
        device, dtype = (first.device, first.dtype) if first is not None else ("cpu", torch.float32)
        was_training = block.training
        block.eval()
        try:
            with torch.no_grad():
                result = block(torch.as_tensor(x, dtype=dtype, device=device), return_attention=True)
        finally:
            block.train(was_training)
        return tuple(t.detach().float().cpu().numpy().astype(np.float64) for t in result)
    if fw == "tf":
        import keras

        last = getattr(block, "data_format", "channels_last") != "channels_first"
        out, attn = block(
            keras.ops.convert_to_tensor(_to_last(x) if last else x), training=False, return_attention=True
        )
        out = np.asarray(keras.ops.convert_to_numpy(out), np.float64)
        return (_to_first(out) if last else out), np.asarray(keras.ops.convert_to_numpy(attn), np.float64)
    from flax import nnx

    clone = nnx.clone(block)  # eval mode on a copy: the caller's block keeps its mode
    clone.eval()
    out, attn = clone(_to_last(x), return_attention=True)
    return _to_first(np.asarray(out, np.float64)), np.asarray(attn, np.float64)


def attention(block, x) -> np.ndarray:
    """The block's attention map on ``x`` (channels-first), float64 NumPy, as the block returns it."""
    return run(block, x)[1]


def _to_last(x: np.ndarray) -> np.ndarray:
    return np.moveaxis(x, 1, -1).astype(np.float32)


def _to_first(x: np.ndarray) -> np.ndarray:
    return np.moveaxis(x, -1, 1)


def _spec(block) -> BlockConfig:
    spec = block if isinstance(block, BlockConfig) else getattr(block, "spec", None)
    if not isinstance(spec, BlockConfig):
        raise TypeError(f"viz: expected an nlattn block or config, got {type(block).__name__}")
    return spec


# --------------------------------------------------------------------------------------------
# Per-query maps
# --------------------------------------------------------------------------------------------


def check_queries(block: str, spatial: Sequence[int], queries) -> list[tuple[int, ...]]:
    """``queries`` as a list of in-range position tuples (one index per spatial axis)."""
    out = []
    for q in queries:
        q = tuple(int(i) for i in np.atleast_1d(q))
        if len(q) != len(spatial) or any(not 0 <= i < s for i, s in zip(q, spatial)):
            raise InputError(
                f"{block}: a query is a position {'(' + ', '.join('TYX'[-len(spatial) :]) + ')'} "
                f"inside the input's spatial size {tuple(spatial)}, got {q}"
            )
        out.append(q)
    if not out:
        raise InputError(f"{block}: give at least one query position")
    return out


def key_grid(spec: BlockConfig, spatial: Sequence[int]) -> tuple[int, ...]:
    """The spatial grid of the block's keys: the input's, or the max-pooled one (floor) with
    the non-local ``sub_sample``."""
    if isinstance(spec, NonLocalConfig) and spec.sub_sample:
        return tuple(s // p for s, p in zip(spatial, spec.pool_window))
    return tuple(spatial)


def upsample(maps: np.ndarray, spec: BlockConfig, spatial: Sequence[int]) -> np.ndarray:
    """Maps on the key grid (..., *grid) at input resolution (..., *spatial): each key repeated
    over the pooling window it was max-pooled from; positions no window covers (floor) are 0."""
    if not (isinstance(spec, NonLocalConfig) and spec.sub_sample):
        return maps
    lead = maps.ndim - len(spatial)
    for axis, p in enumerate(spec.pool_window):
        maps = np.repeat(maps, p, axis=lead + axis)
    pad = [(0, 0)] * lead + [(0, s - m) for s, m in zip(spatial, maps.shape[lead:])]
    return np.pad(maps, pad)


def key_maps(block, x, queries, *, head: int | None = None) -> np.ndarray:
    """(B, Q, *grid): the map rows of the queries on the key grid (``key_grid``), for the
    blocks whose map has a row per query. ``head``: one head of a multi-head non-local block
    (default: the mean over heads, still a distribution for softmax modes)."""
    spec = _spec(block)
    x = np.asarray(x)
    spatial = x.shape[2:]
    qs = check_queries(spec.block, spatial, queries)
    if spec.block not in POSITIONAL and not _rga_spatial(spec):
        raise ConfigError(
            f"{spec.block}: its map has no row per query position; "
            + (
                "use query_maps"
                if spec.block in ("CrissCrossAttention", "NonLocalMeans")
                else "see channel_map / codeword_maps"
            )
        )
    attn = attention(block, x)
    if attn.ndim == 4:  # (B, heads, N, M)
        attn = attn.mean(1) if head is None else attn[:, head]
    rows = attn[:, [int(np.ravel_multi_index(q, spatial)) for q in qs]]  # (B, Q, M)
    return rows.reshape(*rows.shape[:2], *key_grid(spec, spatial))


def query_maps(block, x, queries, *, head: int | None = None) -> np.ndarray:
    """(B, Q, *S): where each query position looks, at input resolution (see the module docstring).

    ``block``: a torch / Keras / Flax block with a per-position map (non-local 1D/2D/3D,
    SelfAttention, PositionAttention, CrissCrossAttention, RelationAwareAttention with its
    spatial branch) or a NonLocalMeans block or config. ``x``: channels-first (B, C, *S) NumPy.
    ``queries``: positions, one index per spatial axis ((y, x) in 2D).
    """
    spec = _spec(block)
    x = np.asarray(x)
    if spec.block == "NonLocalMeans":
        return nl_means_weights(x, queries, **spec.to_dict())
    if spec.block == "CrissCrossAttention":
        qs = check_queries(spec.block, x.shape[2:], queries)
        return criss_cross_maps(criss_cross_passes(block, x), qs)
    return upsample(key_maps(block, x, queries, head=head), spec, x.shape[2:])


def _rga_spatial(spec: BlockConfig) -> bool:
    return spec.block == "RelationAwareAttention" and bool(getattr(spec, "use_spatial", False))


def criss_cross_passes(block, x) -> list[np.ndarray]:
    """The (B, H, W, H + W) map of every pass of a CrissCrossAttention block, first to last.

    The block returns its last pass's map only; for R > 1 a one-pass block of the same framework
    with the same weights runs R times, each pass on the previous output."""
    spec: Any = _spec(block)
    if spec.recurrence == 1:
        return [attention(block, x)]
    from .weights.files import Checkpoint
    from .weights.frameworks import build, export_weights, framework_of

    config = {**spec.to_dict(), "recurrence": 1}
    one = build(Checkpoint(spec.block, config, export_weights(block)), framework_of(block))
    maps = []
    for _ in range(spec.recurrence):
        x, attn = run(one, x)
        maps.append(attn)
    return maps


def criss_cross_maps(passes: Sequence[np.ndarray], queries) -> np.ndarray:
    """(B, Q, H, W): the composed map A_R ⋯ A_1 of criss-cross passes (each (B, H, W, H + W),
    column then row) at the query pixels, over positions (value path only).

    A pass's map as an N×N matrix: A[(h, w), (g, w)] = column weight g (zero at g = h, the pixel
    is masked from its column), A[(h, w), (h, v)] += row weight v. A query's row e_qᵀ A_R ⋯ A_1 is
    pushed through the passes from the last to the first, never forming an N×N matrix."""
    b, hh, ww, _ = passes[-1].shape
    qs = check_queries("CrissCrossAttention", (hh, ww), queries)
    r = np.zeros((b, len(qs), hh, ww))
    for i, (qy, qx) in enumerate(qs):
        r[:, i, qy, qx] = 1.0
    for a in reversed(passes):
        col, row = a[..., :hh], a[..., hh:]  # (B, h, w, g) and (B, h, w, v)
        # (r A)[g, v] = Σ_h r[h, v]·col[h, v, g] + Σ_w r[g, w]·row[g, w, v]
        r = np.einsum("bqhv,bhvg->bqgv", r, col) + np.einsum("bqgw,bgwv->bqgv", r, row)
    return r


def nl_means_weights(x, queries, **config) -> np.ndarray:
    """(B, Q, H, W): the normalised weights non-local means gives every pixel when it filters each
    query pixel of x (B, C, H, W), float64, zero outside the search window; the filtered value
    at the query is Σ weight·x.

    The weights are those of the float64 reference (``nlattn.numpy_ref.nl_means``, pixelwise
    algorithm): the same Gaussian patch kernel, early cutoff and fast_exp, computed for the query
    pixels only. ``fast_mode=True`` (scikit-image's other algorithm) is not covered."""
    from .numpy_ref.nl_means import DISTANCE_CUTOFF, fast_exp
    from .specs import make_config

    spec: Any = make_config("NonLocalMeans", **config)
    if getattr(spec, "fast_mode", False):
        raise ConfigError("NonLocalMeans: nl_means_weights covers the pixelwise filter (fast_mode=False) only")
    x = np.asarray(x, np.float64)
    spec.check_input_shape(x.shape)
    b, c, height, width = x.shape
    qs = check_queries(spec.block, (height, width), queries)
    s, d, o = spec.patch_size, spec.patch_distance, spec.patch_size // 2
    kernel = spec.patch_kernel(c)
    noise = c * 2.0 * spec.sigma * spec.sigma
    padded = np.pad(x, ((0, 0), (0, 0), (o, o), (o, o)), mode="reflect")
    out = np.zeros((b, len(qs), height, width))
    for i, (r, col) in enumerate(qs):
        r0, r1, c0, c1 = max(0, r - d), min(height, r + d + 1), max(0, col - d), min(width, col + d + 1)
        centre = padded[:, :, r : r + s, col : col + s]  # (B, C, s, s)
        region = padded[:, :, r0 : r1 - 1 + s, c0 : c1 - 1 + s]
        windows = np.lib.stride_tricks.sliding_window_view(region, (s, s), axis=(2, 3))  # (B, C, h, w, s, s)
        sq = ((windows - centre[:, :, None, None]) ** 2).sum(1) - noise  # (B, h, w, s, s)
        partial = np.cumsum(np.einsum("bhwkl,kl->bhwk", sq, kernel), -1)
        cut = (partial[..., :-1] > DISTANCE_CUTOFF).any(-1)
        weight = np.where(cut, 0.0, fast_exp(-np.maximum(partial[..., -1], 0.0)))
        out[:, i, r0:r1, c0:c1] = weight / weight.sum((1, 2), keepdims=True)
    return out


def channel_map(block, x) -> np.ndarray:
    """(B, C, C): ChannelAttention's map (rows: output channels, a softmax over input channels),
    or RelationAwareAttention's channel relations when it has no spatial branch."""
    spec = _spec(block)
    if spec.block != "ChannelAttention" and not (spec.block == "RelationAwareAttention" and not _rga_spatial(spec)):
        raise ConfigError(f"{spec.block}: its map is not a channel × channel matrix")
    return attention(block, x)


def context_map(block, x) -> np.ndarray:
    """(B, *S): GlobalContext's pooling weights over positions, one query-independent map per
    image (a softmax over positions; 1/N everywhere for average pooling)."""
    spec = _spec(block)
    if spec.block != "GlobalContext":
        raise ConfigError(f"{spec.block}: only GlobalContext has one context map per image")
    x = np.asarray(x)
    return attention(block, x).reshape(x.shape[0], *x.shape[2:])


def codeword_maps(block, x) -> np.ndarray:
    """(B, K, *S): ExplicitVisualCenter's soft assignment of each position to each codeword
    (a softmax over the K codes at every position)."""
    spec = _spec(block)
    if spec.block != "ExplicitVisualCenter":
        raise ConfigError(f"{spec.block}: only ExplicitVisualCenter assigns positions to codewords")
    x = np.asarray(x)
    assign = attention(block, x)  # (B, N, K)
    return np.moveaxis(assign, -1, 1).reshape(assign.shape[0], assign.shape[2], *x.shape[2:])


# --------------------------------------------------------------------------------------------
# Figures (matplotlib)
# --------------------------------------------------------------------------------------------


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError(f"nlattn.viz figures need matplotlib ({e}); install it with: pip install nlattn[viz]") from e
    return plt


def display_image(x: np.ndarray) -> np.ndarray:
    """A (C, H, W) input as something ``imshow`` shows: RGB when C = 3, else the channel mean;
    scaled to [0, 1]."""
    x = np.asarray(x, np.float64)
    img = np.moveaxis(x, 0, -1) if x.shape[0] == 3 else x.mean(0)
    lo, hi = float(np.min(img)), float(np.max(img))
    return (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)


def figure(image, maps, queries=None, *, titles: Sequence[str] | None = None, ncols: int = 4, alpha: float = 0.6):
    """A matplotlib Figure: the image with the queries marked, then one overlay per map.

    ``image``: (H, W) or (H, W, 3) in [0, 1] (``display_image`` makes one from an input);
    ``maps``: (Q, H, W), e.g. ``query_maps(...)[0]`` or ``codeword_maps(...)[0]``; ``queries``:
    (y, x) per map, marked on the image and on its overlay. Each overlay is scaled to its own
    maximum. Many maps make a grid of ``ncols`` columns.
    """
    plt = _pyplot()
    image, maps = np.asarray(image, np.float64), np.asarray(maps, np.float64)
    if maps.ndim != 3 or maps.shape[1:] != image.shape[:2]:
        raise InputError(
            f"viz.figure: maps must be (Q, H, W) with the image's (H, W) = {image.shape[:2]}, got {maps.shape}"
        )
    queries = [tuple(q) for q in queries] if queries is not None else []
    panels = 1 + len(maps)
    cols = min(ncols, panels)
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    gray = image if image.ndim == 2 else image.mean(-1)
    axes.flat[0].imshow(image, cmap="gray" if image.ndim == 2 else None)
    axes.flat[0].set_title("input")
    for i, (qy, qx) in enumerate(queries):
        axes.flat[0].plot(qx, qy, "o", ms=8, mfc="none", mec="red", mew=2)
        axes.flat[0].annotate(str(i + 1), (qx, qy), xytext=(4, 4), textcoords="offset points", color="red")
    for i, m in enumerate(maps):
        ax = axes.flat[i + 1]
        ax.imshow(gray, cmap="gray")
        top = float(m.max())
        ax.imshow(m / top if top > 0 else m, cmap="jet", alpha=alpha, vmin=0.0, vmax=1.0)
        if i < len(queries):
            ax.plot(queries[i][1], queries[i][0], "x", ms=8, color="white", mew=2)
        ax.set_title(titles[i] if titles else f"query {i + 1} {queries[i]}" if i < len(queries) else f"map {i + 1}")
    fig.tight_layout()
    return fig


def matrix_figure(matrix, *, title: str = "channel attention"):
    """A matplotlib Figure of a (C, C) map (rows: output channels)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4, 4))
    shown = ax.imshow(np.asarray(matrix, np.float64), cmap="viridis")
    ax.set_xlabel("input channel")
    ax.set_ylabel("output channel")
    ax.set_title(title)
    fig.colorbar(shown, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


__all__ = [
    "POSITIONAL",
    "attention",
    "channel_map",
    "check_queries",
    "codeword_maps",
    "context_map",
    "criss_cross_maps",
    "criss_cross_passes",
    "display_image",
    "figure",
    "key_grid",
    "key_maps",
    "matrix_figure",
    "nl_means_weights",
    "query_maps",
    "run",
    "upsample",
]
