"""What every reference function does before computing: validate config, input and weights."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..errors import InputError
from ..specs import BlockConfig, check_weights
from ._ops import Context, RunningStats


def prepare(
    config_cls: type[BlockConfig], x, weights, config: dict, training: bool, stats: RunningStats | None
) -> tuple[BlockConfig, Context, np.ndarray]:
    """Validate everything and return (config, context with float64 weights, float64 x).

    ``in_channels`` may be left out of ``config``: it is read from x (channels-first).
    """
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise InputError(f"{config_cls.block}: expected a floating-point input, got dtype {x.dtype}")
    config = dict(config)
    fields = config_cls.__dataclass_fields__
    if (
        "in_channels" in fields
        and config.get("in_channels") is None
        and x.ndim >= 2
        and fields["in_channels"].default is not None
    ):
        config["in_channels"] = int(x.shape[1])
    cfg = config_cls.from_dict(config)
    cfg.check_input_shape(x.shape)
    weights = {} if weights is None else weights
    check_weights(cfg.block, cfg.schema(), weights)
    ctx = Context({k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}, training=training, stats=stats)
    return cfg, ctx, x.astype(np.float64)


#: block class name -> its reference function, filled by ``@defines``
REFERENCE: dict[str, Callable] = {}
#: blocks whose derivative is taken of another function than the one they evaluate
DERIVATIVE_REFERENCE: dict[str, Callable] = {}


def defines(block: str, *, derivative: bool = False):
    """Register the decorated function as the reference of ``block`` (or, with ``derivative``, as
    the function whose derivatives define the block's gradients)."""

    def register(fn: Callable) -> Callable:
        (DERIVATIVE_REFERENCE if derivative else REFERENCE)[block] = fn
        return fn

    return register
