"""What every Flax block shares: the config, schema-driven sub-modules, input checks, pooling.

Blocks are channels-last (``(B, L, C)``, ``(B, H, W, C)``, ``(B, T, H, W, C)``) like every Flax
layer. Their sub-modules are built from ``spec.schema()`` and sit at the canonical prefixes
(``block.theta``, ``block.lvc.conv_1.conv1``; indexed names such as ``W_spatial.3`` live in an
``nnx.List``, with ``None`` where the published ``nn.Sequential`` has a weightless layer), so the
canonical weight names map one to one onto ``nnx.state`` paths (see ``_weights.py``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from ..errors import ConfigError, InputError
from ..specs import BatchNorm, BlockConfig, Conv, Dense, GroupNorm, Param, check_float_dtype, make_config

_LAYOUT = {1: "(B, L, C)", 2: "(B, H, W, C)", 3: "(B, T, H, W, C)"}

#: ``implementation=`` values: "auto" runs the fast path where the block has one, "naive" the
#: readable path that materialises the relation map (always used for ``return_attention=True``)
IMPLEMENTATIONS = ("auto", "naive")


class Group(nnx.Module):
    """A weightless container, so that dotted canonical prefixes become attribute paths."""


def path_of(name: str) -> tuple[str | int, ...]:
    """Canonical dotted name -> nnx path (digits index an ``nnx.List``)."""
    return tuple(int(p) if p.isdigit() else p for p in name.split("."))


def make_layer(layer, rngs: nnx.Rngs, dtype, param_dtype, override: Any = None):
    """The Flax module (or ``nnx.Param``) of one schema layer.

    ``override``: extra keywords for the Flax layer (e.g. ``scale_init``), or for a ``Param`` an
    initializer ``f(key, shape, dtype)``.
    """
    kw = dict(override or {}) if not isinstance(layer, Param) else {}
    common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if isinstance(layer, Conv):
        padding = "VALID" if layer.padding is None else tuple((p, p) for p in layer.padding)
        return nnx.Conv(layer.in_channels, layer.out_channels, layer.kernel_size, padding=padding,
                        feature_group_count=layer.groups, use_bias=layer.bias, **common, **kw)
    if isinstance(layer, BatchNorm):
        # Flax momentum is the weight of the old running value: torch 0.1 == Flax 0.9
        return nnx.BatchNorm(layer.num_features, momentum=1.0 - layer.momentum, epsilon=layer.eps,
                             use_fast_variance=False, **common, **kw)
    if isinstance(layer, Dense):
        return nnx.Linear(layer.in_features, layer.out_features, use_bias=layer.bias, **common, **kw)
    if isinstance(layer, GroupNorm):
        return nnx.GroupNorm(layer.num_channels, num_groups=layer.num_groups, epsilon=layer.eps,
                             use_fast_variance=False, **common, **kw)
    if isinstance(layer, Param):
        if override is not None:
            return nnx.Param(override(rngs.params(), layer.shape, param_dtype))
        if layer.init is None:
            raise ValueError(f"parameter {layer.name!r} has no constant init; give an initializer")
        return nnx.Param(jnp.full(layer.shape, layer.init, dtype=param_dtype))
    raise TypeError(f"unknown schema layer {layer!r}")


def install_schema(root: nnx.Module, schema, rngs: nnx.Rngs, dtype, param_dtype,
                   overrides: dict[str, Any] | None = None) -> None:
    """Create every layer of ``schema`` and attach it to ``root`` at its canonical prefix."""
    overrides = overrides or {}
    tree: dict = {}
    for layer in schema:
        name = getattr(layer, "prefix", None) or layer.name
        *parents, leaf = path_of(name)
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = make_layer(layer, rngs, dtype, param_dtype, overrides.get(name))

    def materialise(node):
        if not isinstance(node, dict):
            return node
        if all(isinstance(k, int) for k in node):   # an nn.Sequential: None for weightless layers
            return nnx.List([materialise(node[i]) if i in node else None for i in range(max(node) + 1)])
        group = Group()
        for k, v in node.items():
            setattr(group, k, materialise(v))
        return group

    for k, v in tree.items():
        setattr(root, k, materialise(v))


class Block(nnx.Module):
    """Base of every nlattn Flax block: keeps the validated config as ``spec``.

    Constructor: the config's fields (positionally in their documented order, or as keywords),
    plus ``implementation="auto" | "naive"`` and the NNX keywords ``rngs`` (default
    ``nnx.Rngs(0)``), ``dtype`` (computation dtype of the Flax layers, None: inferred) and
    ``param_dtype`` (default float32).

    ``implementation``: "auto" takes the block's fast path (it never materialises the N×M relation
    matrix; an exact re-formulation) where it has one, and the readable materialising path for
    ``return_attention=True``; "naive" always takes the materialising path. ``block.implementation``
    is the path the block runs: blocks without a fast path (CAM, CCNet, RGA, EVC, NonLocalMeans,
    Scale) accept both values and resolve them to "naive".

    Like ``nnx.BatchNorm``, a block with batch norm starts in *training* mode (batch statistics,
    running statistics updated on every call); call ``block.eval()`` for inference with the running
    statistics and ``block.train()`` to switch back.
    """

    config_class: ClassVar[type[BlockConfig]]
    #: whether ``implementation="auto"`` has a path of its own
    has_fast_path: ClassVar[bool] = False

    def __init__(self, *args, implementation: str = "auto", rngs: nnx.Rngs | None = None, dtype=None,
                 param_dtype=jnp.float32, **config):
        names = [f.name for f in dataclasses.fields(self.config_class)]
        block = self.config_class.block
        if len(args) > len(names):
            raise TypeError(f"{block}() takes at most {len(names)} positional arguments ({len(args)} given)")
        for name, value in zip(names, args):
            if name in config:
                raise TypeError(f"{block}() got multiple values for argument {name!r}")
            config[name] = value
        self.spec = make_config(block, **config)
        if implementation not in IMPLEMENTATIONS:
            raise ConfigError(f"{block}: implementation must be one of {IMPLEMENTATIONS}, "
                              f"got {implementation!r}")
        self.implementation = implementation if self.has_fast_path else "naive"
        self.param_dtype = jnp.dtype(param_dtype)
        self.build(nnx.Rngs(0) if rngs is None else rngs, dtype, param_dtype)

    def build(self, rngs: nnx.Rngs, dtype, param_dtype) -> None:
        install_schema(self, self.spec.schema(), rngs, dtype, param_dtype, self.overrides())

    def overrides(self) -> dict[str, Any]:
        """Per-layer init overrides (published inits); the framework's usual init otherwise."""
        return {}

    def check_input(self, x) -> jax.Array:
        """Validate a channels-last input (rank, channels, spatial size, float dtype)."""
        x = jnp.asarray(x)
        spec = self.spec
        check_float_dtype(spec.block, x.dtype)
        rank = 2 + spec.spatial_dims
        if x.ndim != rank:
            raise InputError(f"{spec.block}: expected a rank-{rank} channels-last input "
                             f"{_LAYOUT[spec.spatial_dims]}, got shape {tuple(x.shape)}")
        channels_first = (x.shape[0], x.shape[-1], *x.shape[1:-1])
        try:
            spec.check_input_shape(channels_first)
        except InputError as e:
            raise InputError(f"{e} [channels-last input {_LAYOUT[spec.spatial_dims]}: "
                             f"shape {tuple(x.shape)}]") from None
        return x


def max_pool(x: jax.Array, window: tuple[int, ...], stride: tuple[int, ...] | None = None,
             padding: int = 0) -> jax.Array:
    """Channels-last max pool over the spatial axes, floor mode; padding never wins (-inf)."""
    nd = len(window)
    pads = [(0, 0)] + [(padding, padding)] * nd + [(0, 0)]
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, *window, 1),
                                 (1, *(stride or window), 1), pads)


def check_chunk_size(block: str, value) -> int:
    """Validate ``query_chunk_size`` (queries per step of the chunked softmax attention)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{block}: query_chunk_size must be an integer >= 1, got {value!r}")
    return value


def chunked_softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, chunk: int,
                              scale: float | None = None) -> jax.Array:
    """softmax(q kᵀ [· scale]) v without the (N, M) matrix: queries go ``chunk`` at a time.

    q (B, N, h, c), k (B, M, h, c), v (B, M, h, cv) -> (B, N, h, cv). Each query row's softmax is
    the naive one, so the result is the same computation row by row. N is zero-padded to a multiple
    of ``chunk`` (the padded rows are dropped); the step is rematerialised under differentiation, so
    training memory stays O(chunk · M) too. Heads lead inside (B, h, ·, ·): faster dots on CPU.
    """
    k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)                 # (B, h, M, ·)

    def rows(qc):                        # (B, h, cq, c) -> (B, h, cq, cv)
        e = jnp.einsum("bhnc,bhmc->bhnm", qc, k)
        if scale is not None:
            e = e * scale
        return jnp.einsum("bhnm,bhmc->bhnc", jax.nn.softmax(e, -1), v)

    b, n, h = q.shape[:3]
    q = jnp.swapaxes(q, 1, 2)                                              # (B, h, N, c)
    if n <= chunk:
        return jnp.swapaxes(rows(q), 1, 2)
    steps = -(-n // chunk)
    q = jnp.pad(q, ((0, 0), (0, 0), (0, steps * chunk - n), (0, 0)))
    q = jnp.moveaxis(q.reshape(b, h, steps, chunk, q.shape[-1]), 2, 0)   # (steps, B, h, chunk, c)
    out = jax.lax.map(jax.checkpoint(rows), q)                             # (steps, B, h, chunk, cv)
    out = jnp.moveaxis(out, 0, 2).reshape(b, h, steps * chunk, -1)[:, :, :n]
    return jnp.swapaxes(out, 1, 2)


def zeros_init(key, shape, dtype=jnp.float32):
    return jnp.zeros(shape, dtype)


Init = Callable[[jax.Array, tuple[int, ...], Any], jax.Array]
