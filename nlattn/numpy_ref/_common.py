"""What every reference function does before computing: validate config, input and weights."""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..specs import BlockConfig, check_weights
from ._ops import Context, RunningStats


def prepare(config_cls: type[BlockConfig], x, weights, config: dict, training: bool,
            stats: RunningStats | None) -> tuple[BlockConfig, Context, np.ndarray]:
    """Validate everything and return (config, context with float64 weights, float64 x).

    ``in_channels`` may be left out of ``config``: it is read from x (channels-first).
    """
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise InputError(f"{config_cls.block}: expected a floating-point input, got dtype {x.dtype}")
    config = dict(config)
    fields = config_cls.__dataclass_fields__
    if "in_channels" in fields and config.get("in_channels") is None and x.ndim >= 2 \
            and fields["in_channels"].default is not None:
        config["in_channels"] = int(x.shape[1])
    cfg = config_cls.from_dict(config)
    cfg.check_input_shape(x.shape)
    weights = {} if weights is None else weights
    check_weights(cfg.block, cfg.schema(), weights)
    ctx = Context({k: np.asarray(v, dtype=np.float64) for k, v in weights.items()},
                  training=training, stats=stats)
    return cfg, ctx, x.astype(np.float64)


def layers(cfg: BlockConfig) -> dict:
    """The schema's layers by prefix (or name, for free parameters)."""
    return {getattr(layer, "prefix", getattr(layer, "name", None)): layer for layer in cfg.schema()}
