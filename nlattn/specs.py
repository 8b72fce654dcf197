"""One spec per block: a frozen, validated config and the canonical parameter schema.

A config holds exactly the constructor keywords of the block (docs/design.md §2) plus the numeric
conventions that frameworks disagree on (BN epsilon and momentum, always in PyTorch's convention:
``momentum=0.1`` means ``running = 0.9 * running + 0.1 * batch``).

A schema is a tuple of *layers* (``Conv``, ``BatchNorm``, ``Dense``, ``GroupNorm``, ``Param``,
``Gate``), each knowing its canonical tensor names (PyTorch ``state_dict`` keys), their shapes and
its published initialisation. Every framework builds its sublayers from the schema and maps each
tensor kind to its own variables, so no block needs a hand-written weight map or init code.

Also here, written once for every framework: the binding of a block constructor's arguments
(``parse_arguments``) and the constants of the non-local-means filter.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from .errors import ConfigError, InputError, WeightError

# --------------------------------------------------------------------------------------------
# Schema layers
# --------------------------------------------------------------------------------------------

#: Tensor kinds. Layout is PyTorch's: conv kernels (out, in/groups, *k), dense (out, in).
KINDS = (
    "conv_kernel",
    "conv_bias",
    "conv_g",  # a weight-normalised conv's magnitude g (out, 1, ..., 1); its direction v is a conv_kernel
    "dense_kernel",
    "dense_bias",
    "bn_weight",
    "bn_bias",
    "bn_mean",
    "bn_var",
    "norm_weight",
    "norm_bias",
    "param",
)


@dataclass(frozen=True)
class Uniform:
    """Initialise from U(low, high) (a published init the frameworks' defaults do not give)."""

    low: float
    high: float


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]
    kind: str


#: where torch's ``parametrizations.weight_norm`` keeps a conv's magnitude g and direction v
WEIGHT_NORM_G = "parametrizations.weight.original0"
WEIGHT_NORM_V = "parametrizations.weight.original1"


def weight_norm_kernel(g, v) -> np.ndarray:
    """The kernel g·v/‖v‖ of a weight-normalised conv in float64: v (out, in, *k), g (out, 1, ..., 1)
    or (out,); ‖v‖ per output channel (torch's ``dim=0``). The reference and the importers' fold."""
    v = np.asarray(v, np.float64)
    norm = np.sqrt(np.sum(v * v, axis=tuple(range(1, v.ndim)), keepdims=True))
    return np.asarray(g, np.float64).reshape(norm.shape) * (v / norm)


@dataclass(frozen=True)
class Conv:
    """Convolution, ``weight`` (out, in/groups, *kernel_size) and optional ``bias`` (out,)."""

    prefix: str
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    bias: bool = True
    groups: int = 1
    padding: tuple[int, ...] | None = None  # None: no padding ("valid")
    zero_init: bool = False  # kernel and bias start at 0 (else the framework's init)
    #: trained as g·v/‖v‖ (``weight_norm_kernel``), under the names torch's
    #: ``parametrizations.weight_norm(dim=0)`` gives g and v; ``zero_init`` then zeroes g and the
    #: bias and leaves v at the framework's init (a zero v would make the kernel 0/0)
    weight_norm: bool = False

    def tensors(self) -> Iterator[Tensor]:
        kernel = (self.out_channels, self.in_channels // self.groups, *self.kernel_size)
        if self.weight_norm:
            yield Tensor(f"{self.prefix}.{WEIGHT_NORM_G}", (self.out_channels,) + (1,) * (len(kernel) - 1), "conv_g")
            yield Tensor(f"{self.prefix}.{WEIGHT_NORM_V}", kernel, "conv_kernel")
        else:
            yield Tensor(f"{self.prefix}.weight", kernel, "conv_kernel")
        if self.bias:
            yield Tensor(f"{self.prefix}.bias", (self.out_channels,), "conv_bias")


@dataclass(frozen=True)
class BatchNorm:
    """Batch norm over axis 1 (channels-first); eps and momentum in PyTorch's convention."""

    prefix: str
    num_features: int
    eps: float = 1e-5
    momentum: float = 0.1
    zero_init: bool = False  # weight (γ) and bias (β) start at 0 (else 1 and 0)

    def tensors(self) -> Iterator[Tensor]:
        n = (self.num_features,)
        yield Tensor(f"{self.prefix}.weight", n, "bn_weight")
        yield Tensor(f"{self.prefix}.bias", n, "bn_bias")
        yield Tensor(f"{self.prefix}.running_mean", n, "bn_mean")
        yield Tensor(f"{self.prefix}.running_var", n, "bn_var")


@dataclass(frozen=True)
class Dense:
    """Linear layer, ``weight`` (out, in) and ``bias`` (out,)."""

    prefix: str
    in_features: int
    out_features: int
    bias: bool = True

    def tensors(self) -> Iterator[Tensor]:
        yield Tensor(f"{self.prefix}.weight", (self.out_features, self.in_features), "dense_kernel")
        if self.bias:
            yield Tensor(f"{self.prefix}.bias", (self.out_features,), "dense_bias")


@dataclass(frozen=True)
class GroupNorm:
    prefix: str
    num_channels: int
    num_groups: int = 1
    eps: float = 1e-5

    def tensors(self) -> Iterator[Tensor]:
        yield Tensor(f"{self.prefix}.weight", (self.num_channels,), "norm_weight")
        yield Tensor(f"{self.prefix}.bias", (self.num_channels,), "norm_bias")


@dataclass(frozen=True)
class Param:
    """A free tensor used as is (EVC's codewords, layer scales), with its published init."""

    name: str
    shape: tuple[int, ...]
    init: float | Uniform  # a constant, or a uniform range

    def tensors(self) -> Iterator[Tensor]:
        yield Tensor(self.name, self.shape, "param")


@dataclass(frozen=True)
class Gate(Param):
    """A residual gate γ of shape (1,): y = γ·out + x (SAGAN, DANet, CCNet); starts at ``init``.

    A ``Param`` to every framework but Keras, which realises it as a ``Scale`` sublayer.
    """

    shape: tuple[int, ...] = (1,)
    init: float | Uniform = 0.0


Layer = Conv | BatchNorm | Dense | GroupNorm | Param


def layer_name(layer: Layer) -> str:
    """A schema layer's canonical prefix (the name of its tensor, for a Param)."""
    return layer.name if isinstance(layer, Param) else layer.prefix


def tensors(schema: Sequence[Layer]) -> dict[str, Tensor]:
    """Every canonical tensor of a schema, by name, in schema order."""
    return {t.name: t for layer in schema for t in layer.tensors()}


def check_weights(block: str, schema: Sequence[Layer], weights: dict[str, Any], *, allow_missing: bool = False) -> None:
    """Raise one WeightError listing every missing, extra, mis-shaped, non-float or non-finite tensor."""
    expected = tensors(schema)
    problems = []
    if not allow_missing:
        problems += [f"missing {n!r} (expected shape {t.shape})" for n, t in expected.items() if n not in weights]
    problems += [f"unexpected {n!r}" for n in weights if n not in expected]
    for name, value in weights.items():
        if name not in expected:
            continue
        arr = np.asarray(value)
        if tuple(arr.shape) != expected[name].shape:
            problems.append(f"{name!r} has shape {tuple(arr.shape)}, expected {expected[name].shape}")
        elif not np.issubdtype(arr.dtype, np.floating):
            problems.append(f"{name!r} has dtype {arr.dtype}, expected a floating dtype")
        elif not np.all(np.isfinite(arr)):
            problems.append(f"{name!r} has non-finite values")
        elif expected[name].kind == "bn_var" and np.any(arr < 0):
            problems.append(f"{name!r} has negative values (a running variance is >= 0)")
    if problems:
        raise WeightError(block, problems)


def check_model_weights(
    name: str, blocks: Sequence[tuple[str, BlockConfig]], weights: dict[str, Any]
) -> list[dict[str, Any]]:
    """Each block's own weights out of a model's flat canonical dict, all checked before any is used.

    ``blocks`` lists (path, spec) of every nlattn block in the model (path "" for a lone block,
    whose names are unprefixed). Raises one WeightError (named ``name``) listing every problem of
    every block, tensors named by their full path, and every name no block claims; otherwise returns
    the blocks' unprefixed dicts in order.
    """
    problems, owned, claimed = [], [], set[str]()
    for path, spec in blocks:
        prefix = f"{path}." if path else ""
        own = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
        claimed.update(prefix + k for k in own)
        try:
            check_weights(spec.block, spec.schema(), own)
        except WeightError as e:
            problems += [_at_path(p, path, spec.block) for p in e.problems]
        owned.append(own)
    problems += [f"unexpected {k!r} (no nlattn block at that path)" for k in weights if k not in claimed]
    if problems:
        raise WeightError(name, problems)
    return owned


def _at_path(problem: str, path: str, block: str) -> str:
    """A block's weight problem with its tensor named by the full path in the model."""
    if not path:
        return problem
    import re

    named = re.sub(r"'([^']*)'", lambda m: repr(f"{path}.{m.group(1)}"), problem, count=1)
    return f"{named} ({block} at {path!r})"


def random_weights(schema: Sequence[Layer], rng) -> dict[str, np.ndarray]:
    """Random float64 weights of a schema, scaled so activations stay O(1) (for tests, not training).

    Nothing is zero: identity-at-init weights would make every conformance case trivial.
    """
    out = {}
    for layer in schema:
        if isinstance(layer, Conv):
            fan_in = layer.in_channels // layer.groups * math.prod(layer.kernel_size)
            for t in layer.tensors():
                if t.kind == "conv_g":  # a magnitude near a kernel's norm, either sign
                    out[t.name] = rng.uniform(0.5, 1.5, t.shape) * rng.choice([-1.0, 1.0], t.shape)
                    continue
                std = 1.0 / math.sqrt(fan_in) if t.kind == "conv_kernel" else 0.1
                out[t.name] = rng.normal(0.0, std, t.shape)
        elif isinstance(layer, Dense):
            for t in layer.tensors():
                std = 1.0 / math.sqrt(layer.in_features) if t.kind == "dense_kernel" else 0.1
                out[t.name] = rng.normal(0.0, std, t.shape)
        elif isinstance(layer, BatchNorm):
            n = layer.num_features
            out[f"{layer.prefix}.weight"] = rng.uniform(0.5, 1.5, n)
            out[f"{layer.prefix}.bias"] = rng.normal(0.0, 0.1, n)
            out[f"{layer.prefix}.running_mean"] = rng.normal(0.0, 0.1, n)
            out[f"{layer.prefix}.running_var"] = rng.uniform(0.5, 1.5, n)
        elif isinstance(layer, GroupNorm):
            out[f"{layer.prefix}.weight"] = rng.uniform(0.5, 1.5, layer.num_channels)
            out[f"{layer.prefix}.bias"] = rng.normal(0.0, 0.1, layer.num_channels)
        else:
            out[layer.name] = rng.uniform(0.3, 1.0, layer.shape) * rng.choice([-1.0, 1.0], layer.shape)
    return out


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


def _fail(block: str, message: str):
    raise ConfigError(f"{block}: {message}")


def _positive_int(block: str, name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(block, f"{name} must be an integer >= {minimum}, got {value!r}")


def _typed(block: str, name: str, annotation: str, value):
    """A config value checked against its field's annotation, as the plain Python type: strict
    bools (the string "False" is not False), NumPy integers and floats accepted as such, no
    NaN or infinity, tuples from lists."""
    if value is None and annotation.endswith("| None"):
        return None
    kind = annotation.removesuffix(" | None")
    if kind == "bool":
        if isinstance(value, (bool, np.bool_)):
            return bool(value)
        _fail(block, f"{name} must be True or False, got {value!r}")
    if kind == "int":
        if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
            return int(value)
        _fail(block, f"{name} must be an integer, got {value!r}")
    if kind == "float":
        if (
            isinstance(value, (int, float, np.integer, np.floating))
            and not isinstance(value, (bool, np.bool_))
            and math.isfinite(value)
        ):
            return value if isinstance(value, (int, float)) else value.item()
        _fail(block, f"{name} must be a finite number, got {value!r}")
    if kind == "str":
        if isinstance(value, str):
            return value
        _fail(block, f"{name} must be a string, got {value!r}")
    if kind.startswith("tuple["):
        if isinstance(value, (tuple, list)):
            return tuple(_typed(block, name, "int", v) for v in value)
        _fail(block, f"{name} must be a tuple, got {value!r}")
    return value


@dataclass(frozen=True)
class BlockConfig:
    """Base of every block config: validated on construction, immutable."""

    block: ClassVar[str]
    #: attention map returned by ``return_attention=True`` (None: the block has none)
    attention: ClassVar[str | None] = None
    #: spatial rank of the input (2 for images)
    spatial_dims: ClassVar[int] = 2
    #: whether ``implementation="auto"`` has a path of its own that never forms the N×M relation
    fast_path: ClassVar[bool] = False
    #: whether that path is softmax attention, which Keras and Flax run ``query_chunk_size``
    #: queries at a time (torch picks its chunk itself: ``query_chunk``)
    query_chunked: ClassVar[bool] = False

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = _typed(self.block, f.name, str(f.type), getattr(self, f.name))
            object.__setattr__(self, f.name, value)
        # BatchNorm / GroupNorm conventions, whichever block has them
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("eps") and not value > 0:
                _fail(self.block, f"{f.name} must be > 0, got {value!r}")
            if f.name.endswith("momentum") and not 0 <= value <= 1:
                _fail(self.block, f"{f.name} must be in [0, 1] (PyTorch's convention), got {value!r}")
        self.validate()

    def validate(self) -> None:  # pragma: no cover - overridden
        pass

    def schema(self) -> tuple[Layer, ...]:
        return ()

    def layers(self) -> dict[str, Layer]:
        """The schema's layers by canonical prefix (by name for a Param), in schema order."""
        return {layer_name(layer): layer for layer in self.schema()}

    @property
    def fixed_spatial_size(self) -> tuple[int, ...] | None:
        """The only spatial size the block accepts, where its weights fix one (None: any)."""
        return None

    def example_input_shape(self, channels: int = 8) -> tuple[int, ...]:
        """A small valid channels-first input shape (B = 1), e.g. to build a Keras layer."""
        c = self.expected_channels() or channels
        return (1, c, *(self.fixed_spatial_size or (4,) * self.spatial_dims))

    def to_dict(self) -> dict[str, Any]:
        """The constructor keywords (JSON-serialisable)."""
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BlockConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"{cls.block}: unknown option(s) {unknown}; known: {sorted(names)}")
        return cls(**d)

    def replace(self, **changes) -> BlockConfig:
        return dataclasses.replace(self, **changes)

    @property
    def has_batchnorm(self) -> bool:
        return any(isinstance(layer, BatchNorm) for layer in self.schema())

    # -- input validation, shared by every framework (shapes given channels-first) -----------
    def expected_channels(self) -> int | None:
        return getattr(self, "in_channels", None)

    def check_input_shape(self, shape: Sequence[int]) -> None:
        shape = tuple(int(s) for s in shape)
        rank = 2 + self.spatial_dims
        layout = {1: "(B, C, L)", 2: "(B, C, H, W)", 3: "(B, C, T, H, W)"}[self.spatial_dims]
        if len(shape) != rank:
            raise InputError(
                f"{self.block}: expected a rank-{rank} input {layout} (channels-first order), got shape {shape}"
            )
        c = self.expected_channels()
        if c is not None and shape[1] != c:
            raise InputError(f"{self.block}: expected {c} channels, got {shape[1]} (input shape {shape})")
        self.check_spatial(shape[2:])

    def check_spatial(self, spatial: tuple[int, ...]) -> None:
        if any(s < 1 for s in spatial):
            raise InputError(f"{self.block}: empty spatial size {spatial}")
        fixed = self.fixed_spatial_size
        if fixed is not None and tuple(spatial) != fixed:
            raise InputError(
                f"{self.block}: built for spatial size {fixed} (its weights mix the positions), got {tuple(spatial)}"
            )


def check_float_dtype(block: str, dtype) -> None:
    """Raise InputError unless ``dtype`` (anything numpy understands, or its name) is floating."""
    name = str(dtype).rsplit(".", 1)[-1].strip("'>")
    # checked by name first: once ml_dtypes is imported (by jax or tensorflow) numpy knows
    # "bfloat16", but not as a subtype of np.floating
    ok = name in ("bfloat16", "float16") or name.startswith("float8_")
    if not ok:
        try:
            ok = np.issubdtype(np.dtype(name), np.floating)
        except TypeError:
            ok = False
    if not ok:
        raise InputError(f"{block}: expected a floating-point input, got dtype {name}")


# --- constructor arguments, the same in every framework --------------------------------------

#: values of every block's ``implementation`` keyword: "auto" takes the block's fast path (never
#: forming the N×M relation) unless the attention map is asked for; "naive" always takes the
#: readable materialising path. Blocks without a fast path accept both.
IMPLEMENTATIONS = ("auto", "naive")

#: queries per step of the Keras / Flax chunked softmax attention
DEFAULT_QUERY_CHUNK_SIZE = 1024

#: elements of the (batch × heads, chunk, M) block of energies (float32: 16 MiB) that torch's chunked
#: softmax attention (nlattn/torch/kernels.py) holds at a time, forward and backward: the query chunk is this over
#: batch·heads·M, at least MIN_QUERY_CHUNK. Chosen by measurement (training step, SAGAN's widths
#: 32/256 at N = M = 16384, 2 loaded cores, same-run ratios to the materialising path, two runs):
#: 64 queries 0.77/0.80×, 128 0.59/0.69×, 256 (4 M elements) 0.39/0.57×, 512 0.82/0.64×. Fewer rows
#: starve the matmuls (K = c = 32 products are memory-bound); more leave the cache between the
#: softmax passes and the products.
CHUNK_ELEMENTS = 1 << 22
MIN_QUERY_CHUNK = 16


def query_chunk(groups: int, m: int) -> int:
    """Queries per step for M keys in ``groups`` (batch × heads) attentions: CHUNK_ELEMENTS / (groups·M),
    at least MIN_QUERY_CHUNK."""
    return max(MIN_QUERY_CHUNK, CHUNK_ELEMENTS // max(groups * m, 1))


@dataclass
class Arguments:
    """A block constructor's arguments, sorted: the config's fields and the framework's keywords."""

    config: dict[str, Any]
    implementation: str
    query_chunk_size: int | None  # None where the framework's block takes no such keyword
    rest: dict[str, Any]  # the framework's own keywords (dtype, rngs, data_format, ...)


def parse_arguments(cls: type[BlockConfig], args: tuple, kwargs: dict[str, Any], *, chunked: bool) -> Arguments:
    """Bind a block constructor's positional arguments to the config's fields in their order and
    check ``implementation`` (and ``query_chunk_size`` where ``chunked`` and the block has a
    chunked path); the config itself is validated by the caller (Keras may lack in_channels).
    """
    block = cls.block
    fields = [f.name for f in dataclasses.fields(cls)]
    if len(args) > len(fields):
        raise TypeError(
            f"{block}() takes at most {len(fields)} positional arguments ({', '.join(fields)}), got {len(args)}"
        )
    rest = dict(kwargs)
    config = dict(zip(fields, args))
    for name in [k for k in rest if k in fields]:
        if name in config:
            raise TypeError(f"{block}() got multiple values for argument {name!r}")
        config[name] = rest.pop(name)
    implementation = rest.pop("implementation", "auto")
    if not isinstance(implementation, str) or implementation not in IMPLEMENTATIONS:
        raise ConfigError(f"{block}: implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    chunk = None
    if chunked and cls.query_chunked:
        chunk = rest.pop("query_chunk_size", DEFAULT_QUERY_CHUNK_SIZE)
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ConfigError(f"{block}: query_chunk_size must be an integer >= 1, got {chunk!r}")
    return Arguments(config, implementation, chunk, rest)


def config_signature(cls: type[BlockConfig], *keywords: tuple[str, Any]):
    """The signature a block class shows: the config's fields, then ``implementation`` and the
    given framework keywords (name, default), keyword-only."""
    import inspect

    params = list(inspect.signature(cls).parameters.values())
    params += [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default)
        for name, default in (("implementation", "auto"), *keywords)
    ]
    return inspect.Signature(params)


# --- non-local --------------------------------------------------------------------------------

NONLOCAL_MODES = ("embedded_gaussian", "gaussian", "dot_product", "concatenation")


@dataclass(frozen=True)
class NonLocalConfig(BlockConfig):
    """Non-local block (Wang et al. 2018), AlexHex7 defaults.

    ``inter_channels`` defaults to ``max(in_channels // 2, 1)``; ``value_channels`` (the width of g,
    defaults to ``inter_channels``) and ``share_query_key`` (φ reuses θ's conv) give the
    super-resolution variant. ``pool_first`` pools x before the φ/g convs (Caffe2 official code).
    ``weight_norm`` trains θ, φ, g and W as g·v/‖v‖ (weight normalisation, as the super-resolution
    variant publishes it, usually with ``bn_layer=False``); ``concat_project`` stays plain.
    """

    in_channels: int
    inter_channels: int | None = None
    mode: str = "embedded_gaussian"
    sub_sample: bool = True
    bn_layer: bool = True
    pool_first: bool = False
    scale: float | None = None
    num_heads: int = 1
    share_query_key: bool = False
    value_channels: int | None = None
    bn_eps: float = 1e-5
    bn_momentum: float = 0.1
    weight_norm: bool = False

    attention: ClassVar[str] = "(B, N, M), or (B, heads, N, M) with num_heads > 1"
    fast_path: ClassVar[bool] = True
    query_chunked: ClassVar[bool] = True

    def validate(self):
        b = self.block
        _positive_int(b, "in_channels", self.in_channels)
        if self.inter_channels is not None:
            _positive_int(b, "inter_channels", self.inter_channels)
        if self.value_channels is not None:
            _positive_int(b, "value_channels", self.value_channels)
        if self.mode not in NONLOCAL_MODES:
            _fail(b, f"mode must be one of {NONLOCAL_MODES}, got {self.mode!r}")
        _positive_int(b, "num_heads", self.num_heads)
        if self.scale is not None and not (isinstance(self.scale, (int, float)) and self.scale > 0):
            _fail(b, f"scale must be None or a positive number, got {self.scale!r}")
        if self.mode == "concatenation" and (self.num_heads != 1 or self.scale is not None):
            _fail(
                b,
                "mode='concatenation' takes neither num_heads > 1 nor scale "
                "(its relation is ReLU(w·[θ; φ]), not a dot product)",
            )
        if self.mode == "gaussian" and (self.share_query_key or self.pool_first):
            _fail(b, "mode='gaussian' has no θ/φ convs, so share_query_key and pool_first do not apply")
        for name, width in (("embedding width", self.embed_channels), ("value width", self.value_width)):
            if width % self.num_heads:
                _fail(b, f"num_heads={self.num_heads} must divide the {name} {width}")

    @property
    def inter(self) -> int:
        return self.inter_channels if self.inter_channels is not None else max(self.in_channels // 2, 1)

    @property
    def embed_channels(self) -> int:
        """Channels of θ and φ (the raw input in gaussian mode)."""
        return self.in_channels if self.mode == "gaussian" else self.inter

    @property
    def value_width(self) -> int:
        return self.value_channels if self.value_channels is not None else self.inter

    @property
    def pool_window(self) -> tuple[int, ...]:
        return (1, 2, 2) if self.spatial_dims == 3 else (2,) * self.spatial_dims

    def schema(self):
        k = (1,) * self.spatial_dims
        c, ci, cv = self.in_channels, self.inter, self.value_width
        wn = self.weight_norm
        layers: list[Layer] = [Conv("g", c, cv, k, weight_norm=wn)]
        if self.mode != "gaussian":
            layers.append(Conv("theta", c, ci, k, weight_norm=wn))
            if not self.share_query_key:
                layers.append(Conv("phi", c, ci, k, weight_norm=wn))
        if self.mode == "concatenation":
            layers.append(Conv("concat_project", 2 * ci, 1, (1, 1), bias=False))
        # the block starts as the identity: its last affine layer starts at zero (AlexHex7)
        layers.append(Conv("W", cv, c, k, zero_init=not self.bn_layer, weight_norm=wn))
        if self.bn_layer:
            layers.append(BatchNorm("bn", c, self.bn_eps, self.bn_momentum, zero_init=True))
        return tuple(layers)

    def check_spatial(self, spatial):
        super().check_spatial(spatial)
        if self.sub_sample and any(s < p for s, p in zip(spatial, self.pool_window)):
            raise InputError(
                f"{self.block}: sub_sample max-pools by {self.pool_window}, so every "
                f"spatial size must be at least that; got {spatial}"
            )


@dataclass(frozen=True)
class NonLocalBlock1DConfig(NonLocalConfig):
    block: ClassVar[str] = "NonLocalBlock1D"
    spatial_dims: ClassVar[int] = 1


@dataclass(frozen=True)
class NonLocalBlock2DConfig(NonLocalConfig):
    block: ClassVar[str] = "NonLocalBlock2D"
    spatial_dims: ClassVar[int] = 2


@dataclass(frozen=True)
class NonLocalBlock3DConfig(NonLocalConfig):
    block: ClassVar[str] = "NonLocalBlock3D"
    spatial_dims: ClassVar[int] = 3


# --- SAGAN / DANet / CCNet ------------------------------------------------------------------------


def _qkv_schema(c: int, cq: int) -> tuple[Layer, ...]:
    return (
        Conv("query_conv", c, cq, (1, 1)),
        Conv("key_conv", c, cq, (1, 1)),
        Conv("value_conv", c, c, (1, 1)),
        Gate("gamma"),
    )


@dataclass(frozen=True)
class _QKVConfig(BlockConfig):
    in_channels: int
    qk_ratio: int = 8

    def validate(self):
        _positive_int(self.block, "in_channels", self.in_channels)
        _positive_int(self.block, "qk_ratio", self.qk_ratio)
        if self.in_channels // self.qk_ratio < 1:
            _fail(
                self.block,
                f"in_channels // qk_ratio must be >= 1 (query/key width), got "
                f"{self.in_channels} // {self.qk_ratio} = 0; use in_channels >= {self.qk_ratio}",
            )

    @property
    def qk_channels(self) -> int:
        return self.in_channels // self.qk_ratio

    def schema(self):
        return _qkv_schema(self.in_channels, self.qk_channels)


@dataclass(frozen=True)
class SelfAttentionConfig(_QKVConfig):
    """SAGAN self-attention: y = γ·softmax(QᵀK)-weighted V + x."""

    block: ClassVar[str] = "SelfAttention"
    attention: ClassVar[str] = "(B, N, N), rows are queries"
    fast_path: ClassVar[bool] = True
    query_chunked: ClassVar[bool] = True


@dataclass(frozen=True)
class PositionAttentionConfig(_QKVConfig):
    """DANet position attention module (PAM)."""

    block: ClassVar[str] = "PositionAttention"
    attention: ClassVar[str] = "(B, N, N), rows are queries"
    fast_path: ClassVar[bool] = True
    query_chunked: ClassVar[bool] = True


@dataclass(frozen=True)
class CrissCrossAttentionConfig(_QKVConfig):
    """CCNet criss-cross attention, applied ``recurrence`` times with the same weights."""

    block: ClassVar[str] = "CrissCrossAttention"
    attention: ClassVar[str] = "(B, H, W, H + W) of the last pass: column (H) then row (W)"
    recurrence: int = 1

    def validate(self):
        super().validate()
        _positive_int(self.block, "recurrence", self.recurrence)


@dataclass(frozen=True)
class ChannelAttentionConfig(BlockConfig):
    """DANet channel attention module (CAM); has no convs, so in_channels is optional."""

    block: ClassVar[str] = "ChannelAttention"
    attention: ClassVar[str] = "(B, C, C)"
    in_channels: int | None = None

    def validate(self):
        if self.in_channels is not None:
            _positive_int(self.block, "in_channels", self.in_channels)

    def schema(self):
        return (Gate("gamma"),)


# --- RGA ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RelationAwareAttentionConfig(BlockConfig):
    """Relation-aware global attention (RGA-S / RGA-C / RGA-SC); names follow the published module."""

    block: ClassVar[str] = "RelationAwareAttention"
    attention: ClassVar[str] = "relations of the first branch: spatial (B, N, N), else channel (B, C, C)"
    in_channels: int
    spatial_size: tuple[int, int]
    use_spatial: bool = True
    use_channel: bool = True
    cha_ratio: int = 8
    spa_ratio: int = 8
    down_ratio: int = 8
    bn_eps: float = 1e-5
    bn_momentum: float = 0.1

    def validate(self):
        b = self.block
        _positive_int(b, "in_channels", self.in_channels)
        for n in ("cha_ratio", "spa_ratio", "down_ratio"):
            _positive_int(b, n, getattr(self, n))
        if (
            not isinstance(self.spatial_size, tuple)
            or len(self.spatial_size) != 2
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in self.spatial_size)
        ):
            _fail(b, f"spatial_size must be (H, W) with positive integers, got {self.spatial_size!r}")
        if not (self.use_spatial or self.use_channel):
            _fail(b, "at least one of use_spatial and use_channel must be True")
        checks = []
        if self.use_spatial or self.use_channel:
            checks += [("in_channels // cha_ratio", self.inter_channel), ("H*W // spa_ratio", self.inter_spatial)]
        if self.use_spatial:
            checks.append(("(1 + H*W // spa_ratio) // down_ratio", (1 + self.inter_spatial) // self.down_ratio))
        if self.use_channel:
            checks.append(("(1 + in_channels // cha_ratio) // down_ratio", (1 + self.inter_channel) // self.down_ratio))
        for what, value in checks:
            if value < 1:
                _fail(b, f"{what} gives {value} channels; choose smaller ratios or a larger input")

    @property
    def in_spatial(self) -> int:
        return self.spatial_size[0] * self.spatial_size[1]

    @property
    def inter_channel(self) -> int:
        return self.in_channels // self.cha_ratio

    @property
    def inter_spatial(self) -> int:
        return self.in_spatial // self.spa_ratio

    def _cbr(self, prefix, cin, cout):  # 1×1 conv (no bias) + BN [+ ReLU, which has no weights]
        return [
            Conv(f"{prefix}.0", cin, cout, (1, 1), bias=False),
            BatchNorm(f"{prefix}.1", cout, self.bn_eps, self.bn_momentum),
        ]

    def _gate(self, prefix, cin):  # W_*: cbr → ReLU → conv → BN(1)
        mid = cin // self.down_ratio
        return [
            *self._cbr(prefix, cin, mid),
            Conv(f"{prefix}.3", mid, 1, (1, 1), bias=False),
            BatchNorm(f"{prefix}.4", 1, self.bn_eps, self.bn_momentum),
        ]

    def schema(self):
        c, n, ci, ni = self.in_channels, self.in_spatial, self.inter_channel, self.inter_spatial
        layers: list[Layer] = []
        # in the order of the published module's __init__ (so state_dict orders agree)
        if self.use_spatial:
            layers += self._cbr("theta_spatial", c, ci) + self._cbr("phi_spatial", c, ci)
        if self.use_channel:
            layers += self._cbr("theta_channel", n, ni) + self._cbr("phi_channel", n, ni)
        if self.use_spatial:
            layers += self._cbr("gx_spatial", c, ci)
        if self.use_channel:
            layers += self._cbr("gx_channel", n, ni)
        if self.use_spatial:
            layers += self._cbr("gg_spatial", 2 * n, ni)
        if self.use_channel:
            layers += self._cbr("gg_channel", 2 * c, ci)
        if self.use_spatial:
            layers += self._gate("W_spatial", 1 + ni)
        if self.use_channel:
            layers += self._gate("W_channel", 1 + ci)
        return tuple(layers)

    @property
    def fixed_spatial_size(self) -> tuple[int, ...]:
        return self.spatial_size  # its convs mix the H*W positions


# --- EVC ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExplicitVisualCenterConfig(BlockConfig):
    """CFPNet explicit visual center (in = out channels). Names follow the published EVCBlock."""

    block: ClassVar[str] = "ExplicitVisualCenter"
    attention: ClassVar[str] = "soft assignment of positions to codewords (B, N, K)"
    in_channels: int
    num_codes: int = 64
    mlp_ratio: int = 4
    bn_eps: float = 1e-5
    conv_block_bn_eps: float = 1e-6
    gn_eps: float = 1e-5
    bn_momentum: float = 0.1
    layer_scale_init: float = 1e-5
    # the codeword encoding's BatchNorm1d: CFPNet (YOLOX's init_yolo) retunes only the BatchNorm2d layers
    encoding_bn_eps: float = 1e-5
    encoding_bn_momentum: float = 0.1

    def validate(self):
        b = self.block
        _positive_int(b, "in_channels", self.in_channels, minimum=4)  # the bottleneck uses C // 4
        _positive_int(b, "num_codes", self.num_codes)
        _positive_int(b, "mlp_ratio", self.mlp_ratio)

    def schema(self):
        c, k, e, m = self.in_channels, self.num_codes, self.bn_eps, self.bn_momentum
        q, ce = c // 4, self.conv_block_bn_eps
        bn = lambda p, n, eps=e: BatchNorm(p, n, eps, m)  # noqa: E731
        cb = "lvc.conv_1"
        return (
            Conv("conv1", c, c, (7, 7), bias=False, padding=(3, 3)),
            bn("bn1", c),
            Conv(f"{cb}.conv1", c, q, (1, 1), bias=False),
            bn(f"{cb}.bn1", q, ce),
            Conv(f"{cb}.conv2", q, q, (3, 3), bias=False, padding=(1, 1)),
            bn(f"{cb}.bn2", q, ce),
            Conv(f"{cb}.conv3", q, c, (1, 1), bias=False),
            bn(f"{cb}.bn3", c, ce),
            Conv(f"{cb}.residual_conv", c, c, (1, 1), bias=False),
            bn(f"{cb}.residual_bn", c, ce),
            Conv("lvc.LVC.0", c, c, (1, 1), bias=False),
            bn("lvc.LVC.1", c),
            # the encoding layer's init: codewords U(±1/√(KC)), negative smoothing scales U(-1, 0)
            Param("lvc.LVC.3.codewords", (k, c), init=Uniform(-((k * c) ** -0.5), (k * c) ** -0.5)),
            Param("lvc.LVC.3.scale", (k,), init=Uniform(-1.0, 0.0)),
            BatchNorm("lvc.LVC.4", k, self.encoding_bn_eps, self.encoding_bn_momentum),
            Dense("lvc.fc.0", c, c),
            Conv("l_MLP.dw.dconv.conv", c, c, (1, 1), bias=False, groups=c),
            bn("l_MLP.dw.dconv.bn", c),
            Conv("l_MLP.dw.pconv.conv", c, c, (1, 1), bias=False),
            bn("l_MLP.dw.pconv.bn", c),
            GroupNorm("l_MLP.norm1", c, 1, self.gn_eps),
            GroupNorm("l_MLP.norm2", c, 1, self.gn_eps),
            Conv("l_MLP.mlp.fc1", c, c * self.mlp_ratio, (1, 1)),
            Conv("l_MLP.mlp.fc2", c * self.mlp_ratio, c, (1, 1)),
            Param("l_MLP.layer_scale_1", (c,), init=self.layer_scale_init),
            Param("l_MLP.layer_scale_2", (c,), init=self.layer_scale_init),
            Conv("cnv1", 2 * c, c, (1, 1)),
        )


# --- non-local means and Scale --------------------------------------------------------------------

#: partial patch distance above which scikit-image gives up on a candidate (its weight is 0)
NL_MEANS_DISTANCE_CUTOFF = 5.0
# scikit-image's fast_exp (skimage/_shared/fast_exp.h, after Schraudolph 1999): the upper 32 bits
# of a float64 are set to trunc(FAST_EXP_A·y) + FAST_EXP_BC, the lower 32 bits to 0
FAST_EXP_A = 1512775.3951951856938  # 2**20 / ln 2
FAST_EXP_BC = 1072632447  # 1023·2**20 − 60801 (the min-RMS-error variant)


@dataclass(frozen=True)
class NonLocalMeansConfig(BlockConfig):
    """Classical non-local means (scikit-image ``denoise_nl_means``); no weights.

    Input (B, C, H, W); the C channels of one image share their patch weights, like scikit-image's
    ``channel_axis``. ``sigma`` is the noise standard deviation subtracted in the patch distance.
    ``fast_mode`` picks scikit-image's algorithm: False (nlattn's default, unchanged since 0.1) the
    pixelwise one with Gaussian patch weights; True its integral-image one (uniform weights, which
    is scikit-image's own default). The two are different filters (see ``nlattn.numpy_ref.nl_means``).
    """

    block: ClassVar[str] = "NonLocalMeans"
    patch_size: int = 7
    patch_distance: int = 11
    h: float = 0.1
    sigma: float = 0.0
    fast_mode: bool = False

    def validate(self):
        b = self.block
        _positive_int(b, "patch_size", self.patch_size)
        if self.patch_size % 2 == 0:
            _fail(b, f"patch_size must be odd (patches are centred on a pixel), got {self.patch_size}")
        _positive_int(b, "patch_distance", self.patch_distance, minimum=0)
        if not (isinstance(self.h, (int, float)) and self.h > 0):
            _fail(b, f"h must be a positive number, got {self.h!r}")
        if not (isinstance(self.sigma, (int, float)) and self.sigma >= 0):
            _fail(b, f"sigma must be >= 0, got {self.sigma!r}")

    def example_input_shape(self, channels: int = 8) -> tuple[int, ...]:
        return (1, channels, self.patch_size, self.patch_size)

    def patch_kernel(self, n_channels: int) -> np.ndarray:
        """The (s, s) float64 Gaussian patch weights, summing to 1 / (C·h²).

        s = 1 takes the A → 0 limit, a single tap (scikit-image's own kernel is NaN there).
        """
        s = self.patch_size
        if s == 1:
            w = np.ones((1, 1))
        else:
            a = (s - 1.0) / 4.0
            r = np.arange(-(s // 2), s // 2 + 1, dtype=np.float64)
            w = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * a * a))
        # same grouping as scikit-image: w *= 1 / (C * sum(w) * h * h)
        return w * (1.0 / (n_channels * np.sum(w) * self.h * self.h))

    def separable_kernel(self, n_channels: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows (s,), cols (s,)) float64 with outer(rows, cols) = ``patch_kernel`` up to rounding.

        The Gaussian is separable: a patch distance is s taps along a row, then s along a column
        (2s multiply-adds per candidate instead of s²), which the frameworks use.
        """
        s = self.patch_size
        if s == 1:
            g = np.ones(1)
        else:
            a = (s - 1.0) / 4.0
            r = np.arange(-(s // 2), s // 2 + 1, dtype=np.float64)
            g = np.exp(-(r * r) / (2 * a * a))
        return g * (1.0 / (n_channels * np.sum(g) ** 2 * self.h * self.h)), g

    def fast_mode_scale(self, n_channels: int) -> float:
        """fast_mode's distance divisor C·h²·s², multiplied in scikit-image's order."""
        return n_channels * self.h * self.h * self.patch_size * self.patch_size

    def half_window(self) -> tuple[tuple[int, tuple[int, ...]], ...]:
        """The search offsets (di, dj) up to sign, grouped by row: (0, 0 … d), then (di, −d … d)
        for di = 1 … d. Both algorithms' weights are symmetric, w(R, u) = w(R + u, −u) with the
        same terms summed in the same order, so each is computed once and given to both pixels
        (u = (0, 0) only to the pixel itself)."""
        d = self.patch_distance
        return tuple((di, tuple(range(-d if di else 0, d + 1))) for di in range(d + 1))

    @property
    def fast_mode_pad(self) -> int:
        """fast_mode's reflect padding: patch radius + search radius + 1 (scikit-image's)."""
        return self.patch_size // 2 + self.patch_distance + 1

    def check_spatial(self, spatial):
        super().check_spatial(spatial)
        # reflect padding by patch_size // 2 needs more than that many pixels on each side
        if any(s <= self.patch_size // 2 for s in spatial):
            raise InputError(
                f"{self.block}: every spatial size must exceed patch_size // 2 = "
                f"{self.patch_size // 2} (reflect padding), got {tuple(spatial)}"
            )


@dataclass(frozen=True)
class ScaleConfig(BlockConfig):
    """y = gamma * x with a trainable scalar gamma (SAGAN / DANet residual gate)."""

    block: ClassVar[str] = "Scale"
    init: float = 0.0

    def schema(self):
        return (Param("gamma", (1,), init=float(self.init)),)

    def check_input_shape(self, shape):
        if len(tuple(shape)) < 1:
            raise InputError(f"{self.block}: expected an input of rank >= 1, got shape {tuple(shape)}")


# --- GCNet global context and the disentangled non-local block -------------------------------------

GC_POOLINGS = ("att", "avg")
GC_ROUNDINGS = ("mmcv", "timm")


@dataclass(frozen=True)
class GlobalContextConfig(BlockConfig):
    """GCNet global context block (Cao et al. 2019); names follow OpenMMLab's ``ContextBlock``.

    One query-independent context per image: c = Σⱼ aⱼ xⱼ with a = softmax over positions of
    ``conv_mask`` (C→1, bias) for ``pooling_type="att"``, the mean over positions for "avg". Each
    fusion branch transforms c by conv C→C' → LayerNorm over (C', 1, 1) → ReLU → conv C'→C, and
    out = x · σ(mul branch) + add branch (``channel_mul`` / ``channel_add``, at least one).

    C' (``inter``) is ``inter_channels`` when given (timm's ``rd_channels``), else from ``ratio``:
    ``rounding="mmcv"`` takes int(C·ratio) (``ContextBlock``); "timm" takes timm's
    make_divisible(C·ratio, divisor, round_limit=0) = max(divisor, ⌊C·ratio + divisor/2⌋ rounded
    down to a multiple of divisor) (``GlobalContext``, ``rd_divisor``). At a 1×1 context mmcv's
    ``LayerNorm([C', 1, 1])`` and timm's ``LayerNorm2d`` are the same normalisation; nlattn keeps it
    as a one-group GroupNorm with flat (C',) affine weights (mmcv stores (C', 1, 1)); ``ln_eps`` is
    1e-5 (mmcv's nn.LayerNorm), timm's LayerNorm2d uses 1e-6.

    ``zero_init_last``: mmcv's init, the last conv (kernel and bias) of every fusion branch at 0,
    so an add-only block starts as the identity (a mul branch starts as x·σ(0) = x/2). timm zeroes
    only ``mlp_add.fc2.weight``; False leaves every conv to the framework's init. mmcv's and timm's
    Kaiming-normal ``conv_mask`` init is not reproduced (the framework's conv init is used).
    """

    block: ClassVar[str] = "GlobalContext"
    attention: ClassVar[str] = "(B, N): the pooling weights over positions, one map per image (1/N for avg pooling)"
    in_channels: int
    ratio: float = 1.0 / 16
    pooling_type: str = "att"
    channel_add: bool = True
    channel_mul: bool = False
    inter_channels: int | None = None
    rounding: str = "mmcv"
    divisor: int = 1
    ln_eps: float = 1e-5
    zero_init_last: bool = True

    def validate(self):
        b = self.block
        _positive_int(b, "in_channels", self.in_channels)
        if not self.ratio > 0:
            _fail(b, f"ratio must be a positive number, got {self.ratio!r}")
        if self.pooling_type not in GC_POOLINGS:
            _fail(b, f"pooling_type must be one of {GC_POOLINGS}, got {self.pooling_type!r}")
        if not (self.channel_add or self.channel_mul):
            _fail(b, "at least one of channel_add and channel_mul must be True (a fusion is needed)")
        if self.rounding not in GC_ROUNDINGS:
            _fail(b, f"rounding must be one of {GC_ROUNDINGS}, got {self.rounding!r}")
        _positive_int(b, "divisor", self.divisor)
        if self.rounding == "mmcv" and self.divisor != 1:
            _fail(b, f"divisor={self.divisor} applies to rounding='timm' only (mmcv takes int(C·ratio))")
        if self.inter_channels is not None:
            _positive_int(b, "inter_channels", self.inter_channels)
        elif self.inter < 1:
            _fail(
                b,
                f"int(in_channels * ratio) = int({self.in_channels} * {self.ratio}) = 0 transform channels; "
                "choose a larger ratio or give inter_channels",
            )

    @property
    def inter(self) -> int:
        """C', the transform's width."""
        if self.inter_channels is not None:
            return self.inter_channels
        v = self.in_channels * self.ratio
        if self.rounding == "mmcv":
            return int(v)
        d = self.divisor
        return max(d, int(v + d / 2) // d * d)

    @property
    def branches(self) -> tuple[str, ...]:
        """The fusion branches' canonical prefixes, in the published module's order."""
        return tuple(
            p for p, on in (("channel_add_conv", self.channel_add), ("channel_mul_conv", self.channel_mul)) if on
        )

    def schema(self):
        c, ci = self.in_channels, self.inter
        layers: list[Layer] = []
        if self.pooling_type == "att":
            layers.append(Conv("conv_mask", c, 1, (1, 1)))
        for p in self.branches:  # Sequential(conv, LayerNorm, ReLU, conv): indices 0, 1, 3
            layers += [
                Conv(f"{p}.0", c, ci, (1, 1)),
                GroupNorm(f"{p}.1", ci, 1, self.ln_eps),
                Conv(f"{p}.3", ci, c, (1, 1), zero_init=self.zero_init_last),
            ]
        return tuple(layers)


@dataclass(frozen=True)
class DisentangledNonLocalConfig(BlockConfig):
    """Disentangled non-local block (Yin et al. 2020, DNLNet), as OpenMMLab's DNL head computes it.

    A whitened pairwise term and a unary term: θ, φ, g = 1×1 convs (C→Ci, bias); θ̃, φ̃ = θ, φ
    minus their means over positions; A = softmax_j(s·θ̃ᵢ·φ̃ⱼ / temperature) with s = Ci^-½ if
    ``use_scale`` (else 1); y = A g; m = softmax over positions of ``conv_mask`` (C→1, bias),
    u = Σⱼ mⱼ gⱼ (one Ci-vector per image); out = x + BN(W(y)) + BN(W(u)), u broadcast over
    positions. The same W and BN are applied to both terms, as the published code does: in
    training the BN normalises each term by its own batch statistics (u's over the batch only)
    and updates its running statistics twice per call, first with y's, then with u's.

    Weight names are the non-local block's (``g``, ``theta``, ``phi``, ``W``, ``bn``) plus
    ``conv_mask``. No sub-sampling: the published block pools nothing (its unary term sums m over
    the N positions against g, so its keys cannot be pooled). Starts as the identity (BN γ = β = 0,
    or W = 0 without BN), as mmcv's NonLocal initialises it.
    """

    in_channels: int
    inter_channels: int | None = None
    temperature: float = 0.05
    use_scale: bool = True
    bn_layer: bool = True
    bn_eps: float = 1e-5
    bn_momentum: float = 0.1

    attention: ClassVar[str] = "(B, N, N): the whitened pairwise softmax (the unary term is not in it)"
    fast_path: ClassVar[bool] = True
    query_chunked: ClassVar[bool] = True

    def validate(self):
        b = self.block
        _positive_int(b, "in_channels", self.in_channels)
        if self.inter_channels is not None:
            _positive_int(b, "inter_channels", self.inter_channels)
        if not self.temperature > 0:
            _fail(b, f"temperature must be a positive number, got {self.temperature!r}")

    @property
    def inter(self) -> int:
        return self.inter_channels if self.inter_channels is not None else max(self.in_channels // 2, 1)

    @property
    def energy_scale(self) -> float:
        """What multiplies θ̃ᵢ·φ̃ⱼ before the softmax: (Ci^-½ if use_scale) / temperature."""
        return (self.inter**-0.5 if self.use_scale else 1.0) / self.temperature

    def schema(self):
        k = (1,) * self.spatial_dims
        c, ci = self.in_channels, self.inter
        return (
            Conv("g", c, ci, k),
            Conv("theta", c, ci, k),
            Conv("phi", c, ci, k),
            Conv("conv_mask", c, 1, k),
            Conv("W", ci, c, k, zero_init=not self.bn_layer),
            *((BatchNorm("bn", c, self.bn_eps, self.bn_momentum, zero_init=True),) if self.bn_layer else ()),
        )


@dataclass(frozen=True)
class DisentangledNonLocal1DConfig(DisentangledNonLocalConfig):
    block: ClassVar[str] = "DisentangledNonLocal1D"
    spatial_dims: ClassVar[int] = 1


@dataclass(frozen=True)
class DisentangledNonLocal2DConfig(DisentangledNonLocalConfig):
    block: ClassVar[str] = "DisentangledNonLocal2D"
    spatial_dims: ClassVar[int] = 2


@dataclass(frozen=True)
class DisentangledNonLocal3DConfig(DisentangledNonLocalConfig):
    block: ClassVar[str] = "DisentangledNonLocal3D"
    spatial_dims: ClassVar[int] = 3


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

CONFIGS: dict[str, type[BlockConfig]] = {
    cls.block: cls
    for cls in (
        NonLocalBlock1DConfig,
        NonLocalBlock2DConfig,
        NonLocalBlock3DConfig,
        SelfAttentionConfig,
        PositionAttentionConfig,
        ChannelAttentionConfig,
        CrissCrossAttentionConfig,
        RelationAwareAttentionConfig,
        ExplicitVisualCenterConfig,
        NonLocalMeansConfig,
        ScaleConfig,
        GlobalContextConfig,
        DisentangledNonLocal1DConfig,
        DisentangledNonLocal2DConfig,
        DisentangledNonLocal3DConfig,
    )
}


def config_class(block: str) -> type[BlockConfig]:
    try:
        return CONFIGS[block]
    except KeyError:
        raise ConfigError(f"unknown block {block!r}; known: {sorted(CONFIGS)}") from None


def make_config(block: str, **kwargs) -> BlockConfig:
    """Build and validate the config of ``block`` from its constructor keywords."""
    return config_class(block).from_dict(kwargs)
