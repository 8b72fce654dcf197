"""The float64 NumPy reference: what every nlattn block computes (channels-first).

Each function is ``f(x, weights, *, return_attention=False, training=False, stats=None, **config)``
with ``weights`` the canonical dict and ``config`` the block's constructor keywords. With
``training=True`` BatchNorm uses batch statistics, and a ``RunningStats`` passed as ``stats``
receives the running-statistic updates under their canonical names.
"""

from __future__ import annotations

from ..specs import config_class
from ._common import DERIVATIVE_REFERENCE, REFERENCE
from ._ops import RunningStats
from .attention import channel_attention, criss_cross_attention, position_attention, self_attention
from .disentangled import (
    disentangled_non_local,
    disentangled_non_local_1d,
    disentangled_non_local_2d,
    disentangled_non_local_3d,
)
from .evc import explicit_visual_center
from .global_context import global_context
from .nl_means import non_local_means, non_local_means_envelope
from .non_local import non_local, non_local_1d, non_local_2d, non_local_3d
from .rga import relation_aware_attention
from .scale import scale


def run(
    block: str,
    x,
    weights,
    config: dict,
    *,
    training: bool = False,
    stats: RunningStats | None = None,
    return_attention: bool = False,
    for_derivative: bool = False,
):
    """Run the reference of ``block`` by name (what the conformance runner calls).

    ``for_derivative=True`` runs the function whose derivatives define the block's gradients:
    the block itself, except where ``DERIVATIVE_REFERENCE`` says otherwise.
    """
    name = config_class(block).block
    fn = (for_derivative and DERIVATIVE_REFERENCE.get(name)) or REFERENCE[name]
    if return_attention:
        if config_class(block).attention is None:
            raise ValueError(f"{block} has no attention map to return")
        return fn(x, weights, training=training, stats=stats, return_attention=True, **config)
    return fn(x, weights, training=training, stats=stats, **config)


__all__ = [
    "DERIVATIVE_REFERENCE",
    "REFERENCE",
    "RunningStats",
    "run",
    "non_local",
    *(f.__name__ for f in REFERENCE.values()),
]
