"""What every Keras block shares: argument binding, data format, input checks, and ``make``, which
builds the Keras layer of one schema layer with the spec's initialisation.

The same file in ``nlattn/torch`` and ``nlattn/jax`` has the same names: ``Block`` (with
``build_layers(make)``, ``fast``, ``check_input``) and ``make``. Keras blocks create their layers in
``build(input_shape)`` (the Keras idiom: ``in_channels`` may be read from the input there) as
attributes at the canonical prefixes (``block.theta``, ``block.lvc.conv_1.conv1``,
``block.W_spatial[3]``); Keras names never contain a dot, so ``lvc.LVC.3.codewords`` is the weight
``lvc_LVC_3_codewords`` (docs/design.md §3).

Blocks run on every Keras backend (tensorflow, jax, torch) and with symbolic sizes: shapes are read
with ``ops.shape`` (an int where known, a scalar tensor where not), never ``int()`` of a dimension.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Any, ClassVar

import keras
from keras import ops, tree

from ..errors import ConfigError, InputError
from ..specs import (
    DEFAULT_QUERY_CHUNK_SIZE,
    BatchNorm,
    BlockConfig,
    Conv,
    Dense,
    Gate,
    GroupNorm,
    Layer,
    Param,
    Uniform,
    check_float_dtype,
    config_signature,
    layer_name,
    parse_arguments,
)

#: keywords that go to ``keras.layers.Layer`` rather than to the block's config
LAYER_KEYWORDS = frozenset(
    {
        "name",
        "dtype",
        "trainable",
        "autocast",
        "input_shape",
        "input_dim",
        "batch_size",
        "batch_input_shape",
        "activity_regularizer",
    }
)

DATA_FORMATS = ("channels_last", "channels_first")

#: dtypes whose attention cores (energies, softmax, sorted sums) run in float32
REDUCED = ("bfloat16", "float16")


def work_dtype(dtype) -> str:
    """ "float32" for bfloat16/float16 tensors, the tensor's own dtype otherwise."""
    dtype = keras.backend.standardize_dtype(dtype)
    return "float32" if dtype in REDUCED else dtype


def standardize_data_format(block: str, data_format) -> str:
    df = keras.config.image_data_format() if data_format is None else str(data_format).lower()
    if df not in DATA_FORMATS:
        raise ConfigError(
            f"{block}: data_format must be None, 'channels_last' or 'channels_first', got {data_format!r}"
        )
    return df


#: the input layout of each spatial rank, channels_last and channels_first
LAYOUTS = {
    "channels_last": {1: "(B, L, C)", 2: "(B, H, W, C)", 3: "(B, T, H, W, C)"},
    "channels_first": {1: "(B, C, L)", 2: "(B, C, H, W)", 3: "(B, C, T, H, W)"},
}


def static_shape(shape) -> tuple:
    """A shape's known sizes as ints, None for the unknown ones (None, or a symbolic dimension such
    as jax's while Keras traces a call)."""
    return tuple(int(s) if isinstance(s, numbers.Integral) else None for s in shape)


def check_shape(spec: BlockConfig, shape, data_format: str) -> None:
    """InputError unless ``shape`` (in ``data_format``, None where unknown) fits the block; the
    message shows the shape as the user passed it, in their layout."""
    shape = static_shape(shape)
    rank = 2 + spec.spatial_dims
    if len(shape) != rank:
        raise InputError(
            f"{spec.block}: expected a rank-{rank} input {LAYOUTS[data_format][spec.spatial_dims]} "
            f"({data_format}), got shape {shape}"
        )
    last = data_format == "channels_last"
    c, spatial = (shape[-1], shape[1:-1]) if last else (shape[1], shape[2:])
    expected = spec.expected_channels()
    if expected is not None and c is not None and c != expected:
        raise InputError(f"{spec.block}: expected {expected} channels, got {c} (input shape {shape}, {data_format})")
    fixed = spec.fixed_spatial_size
    # an unknown size is checked when it is known (at call time); until then it stands for a valid
    # one: the fixed size where the block has one, else a size no lower bound excludes
    spec.check_spatial(tuple(s if s is not None else (fixed[i] if fixed else 2**20) for i, s in enumerate(spatial)))


class Block(keras.layers.Layer):
    """Base of every nlattn Keras layer: ``self.spec`` holds the validated config.

    Positional and keyword arguments are the config's fields (docs/design.md §2); ``in_channels``
    may be left out and is then read from the input in ``build`` (``spec`` is None until then).
    ``implementation`` is "auto" (a fast path where the block has one; the materialising one for
    ``return_attention``) or "naive" (always the readable materialising path), kept as given;
    blocks whose fast path is softmax attention (``spec.query_chunked``) also take
    ``query_chunk_size`` (queries per step). ``data_format`` is None (``keras.config.
    image_data_format()``), "channels_last" or "channels_first"; the other keywords are Keras's
    (``name``, ``dtype``, ...). Blocks with BatchNorm layers (``has_batch_norm``: the non-local
    blocks, RGA, EVC) also take ``synchronized=False``: True gives their BatchNorms the statistics
    of the global batch under data parallelism (``nlattn.tf.distributed``). Subclasses set
    ``config_class``, create their layers in ``build_layers(make)`` and compute in
    ``call_channels_last(x, training, return_attention)``.
    """

    config_class: ClassVar[type[BlockConfig]]
    #: whether the block's schema can hold BatchNorm layers (and the block takes ``synchronized``)
    has_batch_norm: ClassVar[bool] = False

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if "config_class" in cls.__dict__:  # a user-facing block: show the config's keywords
            chunk = (("query_chunk_size", DEFAULT_QUERY_CHUNK_SIZE),) if cls.config_class.query_chunked else ()
            sync = (("synchronized", False),) if cls.has_batch_norm else ()
            cls.__signature__ = config_signature(
                cls.config_class, *chunk, ("data_format", None), *sync, ("name", None), ("dtype", None)
            )

    def __init__(self, *args, data_format=None, **kwargs):
        cls = self.config_class
        # a block without BatchNorm does not take it: an unknown option below
        synchronized = kwargs.pop("synchronized", False) if self.has_batch_norm else False
        arguments = parse_arguments(cls, args, kwargs, chunked=True)
        fields = dataclasses.fields(cls)
        unknown = sorted(set(arguments.rest) - LAYER_KEYWORDS)
        if unknown:
            raise ConfigError(f"{cls.block}: unknown option(s) {unknown}; known: {[f.name for f in fields]}")
        missing = [
            f.name
            for f in fields
            if f.name != "in_channels"
            and f.name not in arguments.config
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise ConfigError(f"{cls.block}: missing required option(s) {missing}")
        super().__init__(**arguments.rest)
        self.implementation = arguments.implementation
        if arguments.query_chunk_size is not None:
            self.query_chunk_size = arguments.query_chunk_size
        self.data_format = standardize_data_format(cls.block, data_format)
        self._synchronized = check_synchronized(cls.block, synchronized)
        self._config = arguments.config
        # the spec is built now when it can be, else in build() from the input's channel count
        field = cls.__dataclass_fields__.get("in_channels")
        deferred = (
            field is not None and field.default is dataclasses.MISSING and arguments.config.get("in_channels") is None
        )
        self._spec: Any = None if deferred else cls.from_dict(arguments.config)

    @property
    def spec(self) -> Any:
        """The validated config; a ConfigError while ``in_channels`` is still unknown (the layer was
        made without it and has not been built or called yet)."""
        if self._spec is None:
            raise ConfigError(
                f"{self.config_class.block}: in_channels is unknown until the layer is built; pass "
                "in_channels=..., or call or build the layer on an input first"
            )
        return self._spec

    @property
    def synchronized(self) -> bool:
        """Whether the block's BatchNorms normalise with the global batch's statistics under data
        parallelism (``nlattn.tf.distributed``); settable, also once the layer is built (before a
        model is compiled or traced: a traced step keeps the statistics it was traced with)."""
        return self._synchronized

    @synchronized.setter
    def synchronized(self, value) -> None:
        if not self.has_batch_norm:
            raise ConfigError(f"{self.config_class.block} has no BatchNorm to synchronise")
        self._synchronized = check_synchronized(self.config_class.block, value)
        if self.built:
            for bn in self.batch_norms():
                bn.synchronized = keras_synchronized(self._synchronized)

    def batch_norms(self) -> list[keras.layers.BatchNormalization]:
        """The block's BatchNorm layers (built), in schema order."""
        from ..weights.access import walk

        if not self.built:
            self.build(self.default_input_shape())
        return [walk(self, layer_name(layer)) for layer in self.spec.schema() if isinstance(layer, BatchNorm)]

    def build_layers(self, make) -> None:
        """Create the block's layers as attributes named after the schema (``self.theta = ...``)."""

    def fast(self, return_attention: bool = False) -> bool:
        """Whether this call takes the fast path: "auto", and no attention map asked for."""
        return self.implementation == "auto" and not return_attention

    def check_input(self, x) -> None:
        """InputError unless x is floating and of the expected shape (in this layer's data format)."""
        check_float_dtype(self.spec.block, keras.backend.standardize_dtype(x.dtype))
        self.check_shape(x.shape)

    def check_shape(self, shape) -> None:
        """InputError unless ``shape`` (this layer's data format; None where unknown) fits."""
        check_shape(self.spec, shape, self.data_format)

    # -- layout -------------------------------------------------------------------------------
    @property
    def channels_last(self) -> bool:
        return self.data_format == "channels_last"

    def channels_axis(self, rank: int) -> int:
        return rank - 1 if self.channels_last else 1

    def default_input_shape(self) -> tuple:
        """The input shape (in this layer's data format) that ``build`` uses when none is given;
        a ConfigError while ``in_channels`` is unknown."""
        spatial = self.spec.fixed_spatial_size or (None,) * self.spec.spatial_dims
        c = self.spec.expected_channels()
        return (None, *spatial, c) if self.channels_last else (None, c, *spatial)

    # -- Keras API ----------------------------------------------------------------------------
    def build(self, input_shape):
        shape = static_shape(input_shape)
        if self._spec is None:  # in_channels from the input
            cls = self.config_class
            rank = 2 + cls.spatial_dims
            if len(shape) != rank:
                raise InputError(
                    f"{cls.block}: expected a rank-{rank} input {LAYOUTS[self.data_format][cls.spatial_dims]} "
                    f"({self.data_format}), got shape {shape}"
                )
            channels = shape[self.channels_axis(rank)]
            if channels is None:
                raise InputError(
                    f"{cls.block}: the channel dimension of the input must be known to "
                    f"build the layer, got shape {shape}"
                )
            self._spec = cls.from_dict({**self._config, "in_channels": channels})
        self.check_shape(shape)
        self.build_layers(functools.partial(make, dtype=self.dtype_policy, synchronized=self._synchronized))

    def call(self, x, training=None, return_attention=False):
        """x (B, *S, C) or (B, C, *S) -> the same shape [, the attention map]: the checks and the
        data format here, the block's computation in ``call_channels_last``."""
        self.check_input(x)
        if return_attention and self.spec.attention is None:
            raise ValueError(f"{self.spec.block} has no attention map to return")
        if static_shape(x.shape)[0] == 0:
            # an empty batch gives an empty output (and map), as a convolution does; TF's
            # convolutions fail on one, so one zero sample runs (inference: the statistics stay)
            one = ops.zeros((1, *ops.shape(x)[1:]), x.dtype)
            result = self.call(one, training=False, return_attention=return_attention)
            return tree.map_structure(lambda t: t[:0], result)
        move = not self.channels_last and len(x.shape) > 2
        if move:
            x = ops.moveaxis(x, 1, -1)
        result = self.call_channels_last(x, bool(training), bool(return_attention))
        out, attention = result if return_attention else (result, None)
        if move:
            out = ops.moveaxis(out, -1, 1)
        return (out, attention) if return_attention else out

    def compute_output_shape(self, input_shape):
        """The output has the input's shape (every block is residual or a filter)."""
        self.check_shape(input_shape)
        return tuple(input_shape)

    def compute_output_spec(self, x, training=None, return_attention=False):
        if return_attention:  # the map's shape is the block's own: trace the call symbolically
            return keras.Operation.compute_output_spec(self, x, training=training, return_attention=True)
        return super().compute_output_spec(x, training=training)

    def call_channels_last(self, x, training: bool, return_attention: bool):  # pragma: no cover - abstract
        raise NotImplementedError

    def get_config(self):
        config = self._spec.to_dict() if self._spec is not None else dict(self._config)
        chunk = {"query_chunk_size": self.query_chunk_size} if self.config_class.query_chunked else {}
        sync = {"synchronized": self._synchronized} if self.has_batch_norm else {}
        return {
            **super().get_config(),
            **config,
            "data_format": self.data_format,
            "implementation": self.implementation,
            **chunk,
            **sync,
        }


def check_synchronized(block: str, value) -> bool:
    """``synchronized`` as a bool; a ConfigError for a non-bool, and for True on a backend whose
    Keras has no data parallelism to synchronise over (torch)."""
    if not isinstance(value, bool):
        raise ConfigError(f"{block}: synchronized must be a bool, got {value!r}")
    if value and keras.backend.backend() not in ("tensorflow", "jax"):
        raise ConfigError(
            f"{block}: synchronized=True needs the tensorflow backend (tf.distribute) or jax "
            f"(keras.distribution); Keras on {keras.backend.backend()} has no data-parallel engine"
        )
    return value


def keras_synchronized(synchronized: bool) -> bool:
    """The ``synchronized`` flag a Keras BatchNormalization gets: Keras implements it on tensorflow
    (an all-reduce of the batch moments over the replicas of a ``tf.distribute`` strategy). On jax
    ``keras.distribution`` compiles one program over the global batch, whose moments are always
    the global batch's: synchronised either way, and Keras refuses the flag there."""
    return synchronized and keras.backend.backend() == "tensorflow"


# ---------------------------------------------------------------------------------------------
# make: one schema layer -> its Keras layer or variable
# ---------------------------------------------------------------------------------------------


def keras_name(prefix: str) -> str:
    """A canonical prefix as a Keras layer or weight name (no dots: Keras on torch forbids them)."""
    return prefix.replace(".", "_")


def dtype_of(make) -> Any:
    """The block's dtype policy that ``make`` gives its layers, for the layers a block adds itself
    (activations, EVC's containers)."""
    return make.keywords["dtype"]


class BatchNormNd(keras.layers.BatchNormalization):
    """``BatchNormalization`` over the last axis of an input of any rank >= 2, as torch's
    ``BatchNormNd``: the schema's BatchNorm does not say the rank, and the statistics do not
    depend on it."""

    def build(self, input_shape):
        super().build(input_shape)
        self.input_spec = None

    def call(self, inputs, training=None, mask=None):
        self._reduction_axes = list(range(len(inputs.shape) - 1))
        return super().call(inputs, training=training, mask=mask)


class GroupNormNd(keras.layers.GroupNormalization):
    """``GroupNormalization`` over the last axis of an input of any rank >= 2."""

    def build(self, input_shape):
        super().build(input_shape)
        self.input_spec = None


def make(
    layer: Layer, *, dtype=None, wide: bool = False, synchronized: bool = False
) -> keras.layers.Layer | keras.Variable:
    """The Keras layer (built) or variable of a schema layer, initialised as the spec says (Keras's
    init otherwise), named after its canonical prefix; conv rank follows the kernel. A ``Gate``
    becomes a ``Scale`` layer. ``Block.build`` passes its dtype policy and ``synchronized`` (for
    BatchNorms). ``wide``: a ``Param`` kept in float32 (or wider) and never autocast, whatever the
    policy (EVC's codebook)."""
    name = keras_name(layer_name(layer))
    if isinstance(layer, Gate):
        from .scale import Scale

        gate = Scale(init=layer.init, data_format="channels_last", name=name, dtype=dtype)
        gate.build(layer.shape)
        return gate
    if isinstance(layer, Param):
        policy = keras.dtype_policies.get(dtype if dtype is not None else keras.config.dtype_policy())
        variable_dtype = work_dtype(policy.variable_dtype) if wide else policy.variable_dtype
        return keras.Variable(
            initializer(layer.init), shape=layer.shape, name=name, dtype=variable_dtype, autocast=not wide
        )
    zero = getattr(layer, "zero_init", False)
    if isinstance(layer, Conv):
        nd = len(layer.kernel_size)
        if layer.padding is not None and any(2 * p + 1 != k for p, k in zip(layer.padding, layer.kernel_size)):
            raise NotImplementedError(f"{layer.prefix}: only 'same' or no padding is supported")
        common = dict(
            kernel_size=layer.kernel_size,
            use_bias=layer.bias,
            data_format="channels_last",
            padding="valid" if layer.padding is None else "same",
            name=name,
            dtype=dtype,
        )
        init = dict(kernel_initializer="zeros", bias_initializer="zeros") if zero else {}
        if layer.weight_norm:
            if layer.groups != 1:
                raise NotImplementedError(f"{layer.prefix}: weight-normalised grouped convs")
            module = WeightNormConv(layer.out_channels, zero_init=zero, **common)
        elif layer.groups == 1:
            module = getattr(keras.layers, f"Conv{nd}D")(layer.out_channels, **common, **init)
        elif layer.groups == layer.in_channels == layer.out_channels:
            init = {k.replace("kernel_", "depthwise_"): v for k, v in init.items()}
            module = getattr(keras.layers, f"DepthwiseConv{nd}D")(depth_multiplier=1, **common, **init)
        else:
            raise NotImplementedError(f"{layer.prefix}: grouped convs other than depthwise")
        module.build((None,) * (nd + 1) + (layer.in_channels,))
    elif isinstance(layer, BatchNorm):
        init = dict(gamma_initializer="zeros", beta_initializer="zeros") if zero else {}
        # Keras momentum is the weight of the old running value: torch 0.1 == Keras 0.9
        module = BatchNormNd(
            axis=-1,
            epsilon=layer.eps,
            momentum=1.0 - layer.momentum,
            synchronized=keras_synchronized(synchronized),
            name=name,
            dtype=dtype,
            **init,
        )
        module.build((None, layer.num_features))
    elif isinstance(layer, Dense):
        module = keras.layers.Dense(layer.out_features, use_bias=layer.bias, name=name, dtype=dtype)
        module.build((None, layer.in_features))
    elif isinstance(layer, GroupNorm):
        module = GroupNormNd(groups=layer.num_groups, axis=-1, epsilon=layer.eps, name=name, dtype=dtype)
        module.build((None, layer.num_channels))
    else:  # pragma: no cover
        raise TypeError(f"unknown schema layer {layer!r}")
    return module


class WeightNormConv(keras.layers.Layer):
    """A channels-last convolution trained as g·v/‖v‖ (weight normalisation): ``kernel`` is the
    direction v (*k, I, O), ``g`` (O,) the magnitude of each output channel's kernel, as torch's
    ``parametrizations.weight_norm(dim=0)``; g starts at ‖v‖ (the kernel starts as v), or at 0 with
    ``zero_init`` (and the bias: the layer starts at 0 while v keeps a direction). The kernel is
    formed in float32 (or wider) and cast to the compute dtype."""

    def __init__(self, filters, kernel_size, use_bias=True, padding="valid", zero_init=False, data_format=None, **kw):
        super().__init__(**kw)
        self.filters, self.kernel_size, self.use_bias = filters, tuple(kernel_size), use_bias
        self.padding, self.zero_init = padding, zero_init

    def build(self, input_shape):
        self.kernel = self.add_weight(
            name="kernel", shape=(*self.kernel_size, input_shape[-1], self.filters), initializer="glorot_uniform"
        )
        self.g = self.add_weight(name="g", shape=(self.filters,), initializer="zeros")
        if not self.zero_init:
            self.g.assign(ops.cast(ops.sqrt(ops.sum(ops.square(self.kernel), axis=self.norm_axes)), self.g.dtype))
        self.bias = self.add_weight(name="bias", shape=(self.filters,), initializer="zeros") if self.use_bias else None

    @property
    def norm_axes(self) -> tuple[int, ...]:
        return tuple(range(len(self.kernel_size) + 1))  # all but the output channels

    def call(self, x):
        work = work_dtype(x.dtype)
        v = ops.cast(self.kernel, work)
        norm = ops.sqrt(ops.sum(ops.square(v), axis=self.norm_axes, keepdims=True))
        kernel = ops.cast(ops.cast(self.g, work) * (v / norm), x.dtype)
        y = ops.conv(x, kernel, strides=1, padding=self.padding, data_format="channels_last")
        return y if self.bias is None else y + ops.cast(self.bias, x.dtype)

    def compute_output_shape(self, input_shape):
        if self.padding == "same":
            return (*input_shape[:-1], self.filters)
        spatial = [None if s is None else s - k + 1 for s, k in zip(input_shape[1:-1], self.kernel_size)]
        return (input_shape[0], *spatial, self.filters)


def initializer(init: float | Uniform) -> keras.initializers.Initializer:
    """The Keras initializer of a spec's init rule: a constant or U(low, high)."""
    if isinstance(init, Uniform):
        return keras.initializers.RandomUniform(init.low, init.high)
    return keras.initializers.Constant(float(init))


def sequential(layers, x, training: bool = False):
    """Apply a list of layers in order (``nn.Sequential``'s call; norms get ``training``)."""
    for layer in layers:
        x = layer(x, training=training)
    return x


def flat(x):
    """(B, *S, C) -> (B, N, C), N = prod(S); sizes may be symbolic."""
    shape = ops.shape(x)
    return ops.reshape(x, (shape[0], num_positions(x), shape[-1]))


def num_positions(x):
    """prod(S) of x (B, *S, C): an int, or a scalar tensor where a size is symbolic."""
    return math.prod(ops.shape(x)[1:-1])


def count(m, dtype):
    """A number of positions as a divisor in ``dtype``: a Python int as is, a symbolic size cast."""
    return m if isinstance(m, int) else ops.cast(m, dtype)


def max_pool(x, window: tuple[int, ...]):
    """Max pool of x (B, *S, C) with kernel = stride = ``window``, floor mode, by a reshape and a
    max, which propagates NaN as NumPy's max does (TF's MaxPool drops it; and has no CPU float16
    kernel in 3D). Sizes may be symbolic."""
    shape = ops.shape(x)
    out = [s // k for s, k in zip(shape[1:-1], window)]
    x = x[(slice(None), *(slice(0, o * k) for o, k in zip(out, window)), slice(None))]  # floor: crop
    split = [shape[0]]
    for o, k in zip(out, window):
        split += [o, k]
    x = ops.reshape(x, (*split, shape[-1]))  # (B, S1/k1, k1, S2/k2, k2, ..., C)
    return ops.max(x, axis=tuple(2 + 2 * i for i in range(len(window))))
