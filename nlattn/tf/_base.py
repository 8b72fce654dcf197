"""The base of every nlattn Keras layer: config handling, data format, input checks, and
schema-driven creation of the sublayers / variables (one per canonical schema layer)."""

from __future__ import annotations

import dataclasses
import math

import keras
from keras import ops

from ..errors import ConfigError, InputError
from ..specs import BatchNorm, Conv, Dense, GroupNorm, Param, check_float_dtype, config_class, make_config
from .scale import Scale

#: keywords that go to keras.layers.Layer rather than to the block's config
_LAYER_KWARGS = frozenset({"name", "dtype", "trainable", "autocast", "input_shape", "input_dim",
                           "batch_size", "batch_input_shape", "activity_regularizer"})

DATA_FORMATS = ("channels_last", "channels_first")

#: values of every layer's ``implementation`` keyword: "auto" takes the block's fast path (if it
#: has one) unless the attention map is asked for; "naive" always materialises the relation map
IMPLEMENTATIONS = ("auto", "naive")


def check_implementation(block: str, implementation) -> str:
    if not isinstance(implementation, str) or implementation not in IMPLEMENTATIONS:
        raise ConfigError(f"{block}: implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    return implementation


def check_chunk(block: str, size) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"{block}: query_chunk_size must be an integer >= 1, got {size!r}")
    return size


def standardize_data_format(block: str, data_format) -> str:
    df = keras.config.image_data_format() if data_format is None else str(data_format).lower()
    if df not in DATA_FORMATS:
        raise ConfigError(f"{block}: data_format must be None, 'channels_last' or 'channels_first', "
                          f"got {data_format!r}")
    return df


def check_shape(spec, shape_cf) -> None:
    """``spec.check_input_shape`` on a channels-first shape that may hold None (unknown) sizes."""
    shape = list(shape_cf)
    if shape and shape[0] is None:
        shape[0] = 1
    if len(shape) >= 2 and shape[1] is None:
        shape[1] = spec.expected_channels() or 1
    known = getattr(spec, "spatial_size", None)
    for i in range(2, len(shape)):
        if shape[i] is None:   # unknown now: check what can be checked
            shape[i] = known[i - 2] if known is not None and len(known) == len(shape) - 2 else 10 ** 6
    spec.check_input_shape(shape)


class Block(keras.layers.Layer):
    """Base of every nlattn block layer (not Scale).

    Subclasses set ``block`` (the class name of DESIGN §2) and implement ``forward(x, training,
    return_attention)`` on a channels-last tensor (B, *S, C). ``self.sub`` maps every canonical
    prefix of the schema to its Keras sublayer (``self.sub["W_spatial.3"]`` is a Conv2D);
    free parameters live in ``self.params`` (or in a ``Scale`` sublayer, for the residual gates
    named in ``gates``).

    Every block takes ``implementation="auto" | "naive"``: blocks with a fast path (the non-local
    blocks, SelfAttention, PositionAttention) take it under "auto" unless the attention map is asked
    for; the others (CAM is C×C already, CCNet stores only B·N·(H+W) energies, RGA, EVC, non-local
    means) have one path and accept the keyword for uniformity.
    """

    block: str = ""
    #: Param names realised as a Scale sublayer (the SAGAN / DANet / CCNet residual gate)
    gates: tuple[str, ...] = ()
    #: softmax blocks whose fast path is query-chunked attention take ``query_chunk_size``
    chunked: bool = False

    def __init__(self, *args, data_format=None, implementation="auto", **kwargs):
        cls = config_class(self.block)
        self.implementation = check_implementation(self.block, implementation)
        if self.chunked:
            self.query_chunk_size = check_chunk(self.block, kwargs.pop("query_chunk_size", 1024))
        fields = [f.name for f in dataclasses.fields(cls)]
        if len(args) > len(fields):
            raise TypeError(f"{self.block} takes at most {len(fields)} positional arguments")
        config = dict(zip(fields, args))
        for key in [k for k in kwargs if k in fields]:
            if key in config:
                raise TypeError(f"{self.block} got multiple values for argument {key!r}")
            config[key] = kwargs.pop(key)
        unknown = sorted(k for k in kwargs if k not in _LAYER_KWARGS)
        if unknown:
            raise ConfigError(f"{self.block}: unknown option(s) {unknown}; known: {sorted(fields)}")
        super().__init__(**kwargs)
        self.data_format = standardize_data_format(self.block, data_format)
        self._config = config
        self.sub = {}
        self.params = {}
        field = cls.__dataclass_fields__.get("in_channels")
        required = field is not None and field.default is dataclasses.MISSING
        missing = [f.name for f in dataclasses.fields(cls) if f.name != "in_channels" and f.name not in config
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ConfigError(f"{self.block}: missing required option(s) {missing}")
        # the spec is built now when it can be, else in build() from the input's channel count
        self.spec = None
        if not required or config.get("in_channels") is not None:
            self.spec = make_config(self.block, **config)

    # -- layout -----------------------------------------------------------------------------
    @property
    def _channels_last(self) -> bool:
        return self.data_format == "channels_last"

    def _cf_shape(self, shape) -> tuple:
        shape = tuple(None if s is None else int(s) for s in shape)
        if self._channels_last and len(shape) >= 2:
            return (shape[0], shape[-1], *shape[1:-1])
        return shape

    def _layer_shape(self, shape_cf) -> tuple:
        shape_cf = tuple(shape_cf)
        return (shape_cf[0], *shape_cf[2:], shape_cf[1]) if self._channels_last else shape_cf

    def default_input_shape(self) -> tuple:
        """The input shape (in this layer's data format) that ``build`` uses when none is given."""
        if self.spec is None:
            raise ValueError(f"{self.block}: in_channels is unknown; pass it or build the layer first")
        spatial = getattr(self.spec, "spatial_size", None) or (None,) * self.spec.spatial_dims
        return self._layer_shape((None, self.spec.expected_channels(), *spatial))

    # -- Keras API ----------------------------------------------------------------------------
    def build(self, input_shape):
        cf = self._cf_shape(input_shape)
        if self.spec is None:    # in_channels from the input
            rank = 2 + config_class(self.block).spatial_dims
            if len(cf) != rank:
                raise InputError(f"{self.block}: expected a rank-{rank} input, got shape {tuple(input_shape)}")
            if cf[1] is None:
                raise InputError(f"{self.block}: the channel dimension of the input must be known to "
                                 f"build the layer, got shape {tuple(input_shape)}")
            self.spec = make_config(self.block, **{**self._config, "in_channels": cf[1]})
        check_shape(self.spec, cf)
        for layer in self.spec.schema():
            self._create(layer)

    def call(self, x, training=None, return_attention=False):
        check_float_dtype(self.block, keras.backend.standardize_dtype(x.dtype))
        check_shape(self.spec, self._cf_shape(x.shape))
        if return_attention and self.spec.attention is None:
            raise ValueError(f"{self.block} has no attention map to return")
        if not self._channels_last:
            x = ops.moveaxis(x, 1, -1)
        result = self.forward(x, bool(training), bool(return_attention))
        out, attention = result if return_attention else (result, None)
        if not self._channels_last:
            out = ops.moveaxis(out, -1, 1)
        return (out, attention) if return_attention else out

    def forward(self, x, training: bool, return_attention: bool):  # pragma: no cover - abstract
        raise NotImplementedError

    def get_config(self):
        config = self.spec.to_dict() if self.spec is not None else dict(self._config)
        extra = {"query_chunk_size": self.query_chunk_size} if self.chunked else {}
        return {**super().get_config(), **config, "data_format": self.data_format,
                "implementation": self.implementation, **extra}

    def fast(self, return_attention: bool) -> bool:
        """Whether this call takes the fast path (never when the attention map is asked for)."""
        return self.implementation == "auto" and not return_attention

    # -- schema-driven variables ------------------------------------------------------------------
    #: rank of the tensors the block's norms see (channels-last, batch included)
    norm_rank = 4

    def initializers(self, layer) -> dict:
        """Keras initializer keywords for a schema layer (the framework's usual ones by default)."""
        return {}

    def _create(self, layer):
        kw = {"dtype": self.dtype_policy, **self.initializers(layer)}
        if isinstance(layer, Param):
            if layer.name in self.gates:
                sub = Scale(init=0.0 if layer.init is None else layer.init, name=layer.name, dtype=self.dtype_policy)
                sub.build(layer.shape)
                self.sub[layer.name] = sub
            else:
                init = kw.get("initializer") or (keras.initializers.Constant(layer.init)
                                                 if layer.init is not None else "glorot_uniform")
                self.params[layer.name] = self.add_weight(name=layer.name, shape=layer.shape, initializer=init)
            return
        if isinstance(layer, Conv):
            nd = len(layer.kernel_size)
            if layer.padding is not None and any(2 * p + 1 != k for p, k in zip(layer.padding, layer.kernel_size)):
                raise NotImplementedError(f"{layer.prefix}: only 'same' or no padding is supported")
            common = dict(kernel_size=layer.kernel_size, use_bias=layer.bias, data_format="channels_last",
                          padding="valid" if layer.padding is None else "same", name=layer.prefix)
            if layer.groups == 1:
                sub = getattr(keras.layers, f"Conv{nd}D")(layer.out_channels, **common, **kw)
            elif layer.groups == layer.in_channels == layer.out_channels:
                kw = {k.replace("kernel_", "depthwise_"): v for k, v in kw.items()}
                sub = getattr(keras.layers, f"DepthwiseConv{nd}D")(depth_multiplier=1, **common, **kw)
            else:
                raise NotImplementedError(f"{layer.prefix}: grouped convs other than depthwise")
            sub.build((None,) * (nd + 1) + (layer.in_channels,))
        elif isinstance(layer, BatchNorm):
            sub = keras.layers.BatchNormalization(axis=-1, epsilon=layer.eps, momentum=1.0 - layer.momentum,
                                                  name=layer.prefix, **kw)
            sub.build((None,) * (self.norm_rank - 1) + (layer.num_features,))
        elif isinstance(layer, Dense):
            sub = keras.layers.Dense(layer.out_features, use_bias=layer.bias, name=layer.prefix, **kw)
            sub.build((None, layer.in_features))
        elif isinstance(layer, GroupNorm):
            sub = keras.layers.GroupNormalization(groups=layer.num_groups, axis=-1, epsilon=layer.eps,
                                                  name=layer.prefix, **kw)
            sub.build((None,) * (self.norm_rank - 1) + (layer.num_channels,))
        else:  # pragma: no cover
            raise TypeError(f"unknown schema layer {layer!r}")
        self.sub[layer.prefix] = sub

    # -- helpers for forward ---------------------------------------------------------------------
    def apply(self, prefix, x, training=False):
        """Run the sublayer of a canonical prefix (norms get ``training``)."""
        sub = self.sub[prefix]
        if isinstance(sub, (keras.layers.BatchNormalization,)):
            return sub(x, training=training)
        return sub(x)


def flat(x, n: int, c: int):
    """(B, *S, C) -> (B, N, C)."""
    return ops.reshape(x, (-1, n, c))


def num_positions(x) -> int:
    return math.prod(int(s) for s in x.shape[1:-1])
