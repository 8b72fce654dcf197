"""What every Flax block shares: argument binding, input checks, and ``make``, which builds the
Flax layer of one schema layer with the spec's initialisation.

The same file in ``nlattn/torch`` and ``nlattn/tf`` has the same names: ``Block`` (with
``build_layers(make)``, ``fast``, ``check_input``) and ``make``. Flax blocks are channels-last
(``(B, L, C)``, ``(B, H, W, C)``, ``(B, T, H, W, C)``) like every Flax layer; their sub-modules sit
at the canonical prefixes (``block.theta``, ``block.lvc.conv_1.conv1``, ``block.W_spatial[3]``), so
the canonical weight names map one to one onto ``nnx.state`` paths (docs/design.md §3).
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..errors import InputError
from ..specs import (
    DEFAULT_QUERY_CHUNK_SIZE,
    BatchNorm,
    BlockConfig,
    Conv,
    Dense,
    GroupNorm,
    Layer,
    Param,
    Uniform,
    check_float_dtype,
    config_signature,
    parse_arguments,
)

_LAYOUT = {1: "(B, L, C)", 2: "(B, H, W, C)", 3: "(B, T, H, W, C)"}

#: dtypes whose attention cores (energies, softmax, sorted sums, codeword distances) run in float32
REDUCED = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def work_dtype(dtype) -> jnp.dtype:
    """float32 for bfloat16/float16, the dtype itself otherwise."""
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.float32) if dtype in REDUCED else dtype


def in_dtype(value: jax.Array, dtype) -> jax.Array:
    """A parameter's value in the computation dtype, None leaving it to type promotion (as
    ``nnx.nn.dtypes.promote_dtype`` treats the Flax layers' parameters)."""
    return value if dtype is None else value.astype(dtype)


class Block(nnx.Module):
    """Base of every nlattn Flax block: ``self.spec`` holds the validated config.

    Positional and keyword arguments are the config's fields (docs/design.md §2);
    ``implementation`` is "auto" (a fast path where the block has one; the materialising one for
    ``return_attention``) or "naive" (always the readable materialising path), kept as given;
    blocks whose path is chunked softmax attention (``spec.query_chunked``) also take
    ``query_chunk_size`` (queries per step). The NNX keywords: ``rngs`` (default ``nnx.Rngs(0)``),
    ``dtype`` (the computation dtype: inputs and parameters are cast to it and the output has it;
    None: inferred from the input and the parameters, as ``nnx.Linear`` does) and ``param_dtype``
    (the parameters' dtype, default float32). ``dtype=jnp.bfloat16, param_dtype=jnp.float32`` is
    mixed precision. In any dtype the attention cores (energies, softmax, sorted sums, CAM's C×C
    energies, EVC's codeword distances, non-local means) run in float32 (``work_dtype``), and
    EVC's codebook stays float32. Blocks with BatchNorm layers (``has_batch_norm``: the non-local
    blocks, RGA, EVC) also take ``bn_axis_name`` (default None), the ``axis_name`` of every
    ``nnx.BatchNorm`` inside: the mesh axis (``shard_map``) over which training statistics are
    averaged, for data parallelism (``nlattn.jax.distributed``). Subclasses set ``config_class``
    and create their layers in ``build_layers(make)``.

    Like ``nnx.BatchNorm``, a block with batch norm starts in *training* mode (batch statistics,
    running statistics updated on every call); call ``block.eval()`` for inference with the running
    statistics and ``block.train()`` to switch back.
    """

    config_class: ClassVar[type[BlockConfig]]
    #: whether the block's schema can hold BatchNorm layers (and the block takes ``bn_axis_name``)
    has_batch_norm: ClassVar[bool] = False
    spec: Any  # an instance of config_class, whose fields the block reads

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if "config_class" in cls.__dict__:  # a user-facing block: show the config's keywords
            chunk = (("query_chunk_size", DEFAULT_QUERY_CHUNK_SIZE),) if cls.config_class.query_chunked else ()
            axis = (("bn_axis_name", None),) if cls.has_batch_norm else ()
            cls.__signature__ = config_signature(
                cls.config_class, *chunk, ("rngs", None), ("dtype", None), ("param_dtype", jnp.float32), *axis
            )

    def __init__(self, *args, rngs: nnx.Rngs | None = None, dtype=None, param_dtype=jnp.float32, **kwargs):
        # a block without BatchNorm does not take it: an unknown option below
        bn_axis_name = kwargs.pop("bn_axis_name", None) if self.has_batch_norm else None
        arguments = parse_arguments(self.config_class, args, kwargs, chunked=True)
        self.implementation = arguments.implementation
        if arguments.query_chunk_size is not None:
            self.query_chunk_size = arguments.query_chunk_size
        # keywords that are neither config fields nor Flax's: ConfigError naming the known ones
        self.spec = self.config_class.from_dict({**arguments.config, **arguments.rest})
        self.param_dtype = jnp.dtype(param_dtype)
        self.dtype = None if dtype is None else jnp.dtype(dtype)
        if self.has_batch_norm:
            self.bn_axis_name = bn_axis_name
        rngs = nnx.Rngs(0) if rngs is None else rngs
        self.build_layers(
            functools.partial(make, rngs=rngs, dtype=dtype, param_dtype=param_dtype, bn_axis_name=bn_axis_name)
        )

    def build_layers(self, make) -> None:
        """Create the block's layers as attributes named after the schema (``self.theta = ...``)."""

    def fast(self, return_attention: bool = False) -> bool:
        """Whether this call takes the fast path: "auto", and no attention map asked for."""
        return self.implementation == "auto" and not return_attention

    def param(self, p: nnx.Param) -> jax.Array:
        """The value of one of the block's own parameters (a gate, a layer scale) in the
        computation dtype, as the Flax layers cast theirs (``nnx.nn.dtypes.promote_dtype``)."""
        return in_dtype(p[...], self.dtype)

    def check_input(self, x) -> jax.Array:
        """x as a jax array in the computation dtype (if one was given); InputError unless it is
        floating and of the expected channels-last shape."""
        spec = self.spec
        check_float_dtype(spec.block, x.dtype if hasattr(x, "dtype") else jnp.asarray(x).dtype)  # as given
        x = jnp.asarray(x)
        rank = 2 + spec.spatial_dims
        if x.ndim != rank:
            raise InputError(
                f"{spec.block}: expected a rank-{rank} channels-last input "
                f"{_LAYOUT[spec.spatial_dims]}, got shape {tuple(x.shape)}"
            )
        try:
            spec.check_input_shape((x.shape[0], x.shape[-1], *x.shape[1:-1]))  # channels-first order
        except InputError as e:
            raise InputError(
                f"{e} [channels-last input {_LAYOUT[spec.spatial_dims]}: shape {tuple(x.shape)}]"
            ) from None
        return x if self.dtype is None else x.astype(self.dtype)


class Sequential(nnx.List):
    """``nn.Sequential``'s Flax twin: an ``nnx.List`` of layers called in order, weightless ones
    (activations) included as plain functions. Unlike ``nnx.Sequential`` (which holds its layers
    under ``.layers``) the layers sit at the indices themselves, as the canonical names say
    (``W_spatial.3`` is ``block.W_spatial[3]``)."""

    def __init__(self, *layers):
        super().__init__(layers)

    def __call__(self, x):
        for layer in self:
            x = layer(x)
        return x


def max_pool(
    x: jax.Array, window: tuple[int, ...], stride: tuple[int, ...] | None = None, padding: int = 0
) -> jax.Array:
    """Channels-last max pool over the spatial axes, floor mode; padding never wins (-inf)."""
    nd = len(window)
    pads = [(0, 0)] + [(padding, padding)] * nd + [(0, 0)]
    init = np.array(-np.inf, x.dtype)  # concrete (a monoid: differentiable); XLA's max propagates NaN
    return jax.lax.reduce_window(x, init, jax.lax.max, (1, *window, 1), (1, *(stride or window), 1), pads)


def make(
    layer: Layer, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32, bn_axis_name=None
) -> nnx.Module | nnx.Param:
    """The Flax layer of a schema layer, initialised as the spec says (Flax's init otherwise);
    conv rank follows the kernel. ``Block`` passes its ``rngs``, ``dtype``, ``param_dtype`` and
    ``bn_axis_name`` (BatchNorm's ``axis_name``)."""
    common: dict[str, Any] = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    zeros = jax.nn.initializers.zeros
    init: dict[str, Any]
    if isinstance(layer, Conv):
        padding = "VALID" if layer.padding is None else tuple((p, p) for p in layer.padding)
        if layer.weight_norm:
            if layer.groups != 1:
                raise NotImplementedError(f"{layer.prefix}: weight-normalised grouped convs")
            return WeightNormConv(
                layer.in_channels,
                layer.out_channels,
                layer.kernel_size,
                padding=padding,
                use_bias=layer.bias,
                zero_init=layer.zero_init,
                **common,
            )
        init = dict(kernel_init=zeros, bias_init=zeros) if layer.zero_init else {}
        pointwise = set(layer.kernel_size) == {1} and layer.groups == 1 and padding == "VALID"
        return (PointwiseConv if pointwise else nnx.Conv)(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            padding=padding,
            feature_group_count=layer.groups,
            use_bias=layer.bias,
            **init,
            **common,
        )
    if isinstance(layer, BatchNorm):
        init = dict(scale_init=zeros, bias_init=zeros) if layer.zero_init else {}
        # Flax momentum is the weight of the old running value: torch 0.1 == Flax 0.9
        return nnx.BatchNorm(
            layer.num_features,
            momentum=1.0 - layer.momentum,
            epsilon=layer.eps,
            use_fast_variance=False,
            axis_name=bn_axis_name,
            **init,
            **common,
        )
    if isinstance(layer, Dense):
        return nnx.Linear(layer.in_features, layer.out_features, use_bias=layer.bias, **common)
    if isinstance(layer, GroupNorm):
        return nnx.GroupNorm(
            layer.num_channels, num_groups=layer.num_groups, epsilon=layer.eps, use_fast_variance=False, **common
        )
    if isinstance(layer, Param):  # Gate included: a plain parameter here
        return nnx.Param(initial(layer.init, layer.shape, rngs, param_dtype))
    raise TypeError(f"unknown schema layer {layer!r}")  # pragma: no cover


class PointwiseConv(nnx.Conv):
    """A 1×1, stride-1, ungrouped ``nnx.Conv`` (the same parameters, init and dtype rules) run as
    the matmul it is: XLA's CPU backend takes ~9× longer for the kernel gradient of a 1×1
    ``lax.conv_general_dilated`` than for the same product as a dot (128², C = 256)."""

    def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
        if out_sharding is not None:
            return super().__call__(inputs, out_sharding)
        bias = None if self.bias is None else self.bias[...]
        x, kernel, bias = self.promote_dtype((inputs, self.kernel[...], bias), dtype=self.dtype)
        y = jnp.einsum("...c,cd->...d", x, kernel.reshape(kernel.shape[-2:]), precision=self.precision)
        return y if bias is None else y + bias


class WeightNormConv(nnx.Module):
    """A channels-last convolution trained as g·v/‖v‖ (weight normalisation): ``kernel`` is the
    direction v (*k, I, O), ``g`` (O,) the magnitude of each output channel's kernel, as torch's
    ``parametrizations.weight_norm(dim=0)``; g starts at ‖v‖ (the kernel starts as v, ``nnx.Conv``'s
    init), or at 0 with ``zero_init`` (and the bias: the layer starts at 0 while v keeps a
    direction). The kernel is formed in float32 (or wider), then cast as ``nnx.Conv`` casts its own."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: tuple[int, ...],
        *,
        padding: Any = "VALID",
        use_bias: bool = True,
        zero_init: bool = False,
        dtype=None,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        shape = (*kernel_size, in_features, out_features)
        v = nnx.initializers.lecun_normal()(rngs.params(), shape, param_dtype)
        self.kernel = nnx.Param(v)
        self.g = nnx.Param(jnp.zeros((out_features,), param_dtype) if zero_init else self.norm(v).astype(param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None
        self.padding, self.dtype = padding, dtype

    @staticmethod
    def norm(v: jax.Array) -> jax.Array:
        """‖v‖ of each output channel's kernel (all axes but the last)."""
        return jnp.sqrt(jnp.sum(jnp.square(v), axis=tuple(range(v.ndim - 1))))

    def __call__(self, x: jax.Array) -> jax.Array:
        bias = None if self.bias is None else self.bias[...]
        x, v, g, bias = nnx.nn.dtypes.promote_dtype((x, self.kernel[...], self.g[...], bias), dtype=self.dtype)
        work = work_dtype(v.dtype)
        kernel = (g.astype(work) * (v.astype(work) / self.norm(v.astype(work)))).astype(v.dtype)
        nd = kernel.ndim - 2
        spatial = "".join("DHW"[3 - nd :])
        y = jax.lax.conv_general_dilated(
            x, kernel, (1,) * nd, self.padding, dimension_numbers=(f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")
        )
        return y if bias is None else y + bias


def initial(init: float | Uniform, shape: tuple[int, ...], rngs: nnx.Rngs, dtype) -> jax.Array:
    """An array initialised by a spec's init rule: a constant or U(low, high)."""
    if isinstance(init, Uniform):
        return jax.random.uniform(rngs.params(), shape, dtype, init.low, init.high)
    return jnp.full(shape, float(init), dtype=dtype)
