"""Framework dispatch: ``export_weights``, ``load_weights`` and ``build`` for any nlattn block.

The framework is read from the block's class (its module, or its bases' modules), and the call is
forwarded to ``nlattn.torch``, ``nlattn.tf`` or ``nlattn.jax``, each imported only when needed.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping

from ..errors import ConfigError, WeightError
from ..specs import CONFIGS, config_class, make_config, tensors
from .files import Checkpoint, load_file, to_numpy

#: accepted framework names -> nlattn subpackage (which is also the pip extra)
FRAMEWORKS = {
    "torch": "torch",
    "pytorch": "torch",
    "tf": "tf",
    "keras": "tf",
    "tensorflow": "tf",
    "jax": "jax",
    "flax": "jax",
}
_ROOTS = {"torch": "torch", "keras": "tf", "tensorflow": "tf", "tf_keras": "tf", "flax": "jax", "jax": "jax"}


def framework_of(block) -> str:
    """'torch', 'tf' or 'jax': the framework a block (or model) belongs to."""
    for cls in type(block).__mro__:
        parts = cls.__module__.split(".")
        if parts[0] == "nlattn" and len(parts) > 1 and parts[1] in ("torch", "tf", "jax"):
            return parts[1]
        if parts[0] in _ROOTS:
            return _ROOTS[parts[0]]
    raise TypeError(
        f"cannot tell the framework of a {type(block).__module__}.{type(block).__name__}: "
        "expected a torch, Keras or Flax module"
    )


def backend(framework: str):
    """The ``nlattn.<fw>`` module; a clear ImportError naming the extra when it is unavailable."""
    fw = FRAMEWORKS.get(str(framework).lower())
    if fw is None:
        raise ValueError(f"unknown framework {framework!r}; use one of 'torch', 'tf' (Keras), 'jax' (Flax)")
    try:
        return importlib.import_module(f"nlattn.{fw}")
    except ImportError as e:
        raise ImportError(f"nlattn.{fw} is not available ({e}); install it with: pip install nlattn[{fw}]") from e


def export_weights(block) -> dict:
    """Canonical weights of a torch / Keras / Flax block (or model): names and layouts of docs/design.md §3."""
    return backend(framework_of(block)).export_weights(block)


def _shapes(spec) -> dict:
    return {n: t.shape for n, t in tensors(spec.schema()).items()}


def _checked(block, ckpt: Checkpoint) -> dict:
    """The checkpoint's weights, after checking that it is for this block and config."""
    spec = getattr(block, "spec", None)
    if spec is not None:
        if ckpt.block != spec.block:
            raise WeightError(spec.block, [f"the weights are for a {ckpt.block}, not a {spec.block}"])
        theirs = make_config(ckpt.block, **ckpt.config)
        if _shapes(theirs) != _shapes(spec):
            raise WeightError(
                spec.block,
                [f"the weights were saved for config {theirs}, which has other parameters than this block's {spec}"],
            )
    return ckpt.weights


def load_weights(block, weights_or_path) -> None:
    """Load canonical weights into a block, atomically (all tensors set, or none and an error).

    ``weights_or_path``: a canonical dict, a ``Checkpoint``, or the path of a file written by
    ``save_weights`` (whose block class and parameter shapes must match).
    """
    if isinstance(weights_or_path, (str, os.PathLike)):
        weights = _checked(block, load_file(weights_or_path))
    elif isinstance(weights_or_path, Checkpoint):
        weights = _checked(block, weights_or_path)
    elif isinstance(weights_or_path, Mapping):
        weights = {str(k): to_numpy(v) for k, v in weights_or_path.items()}
    else:
        raise TypeError(
            f"load_weights: expected a dict of arrays, a Checkpoint or a path, got {type(weights_or_path).__name__}"
        )
    backend(framework_of(block)).load_weights(block, weights)


def _dummy_input(spec, channels_last: bool):
    import numpy as np

    shape = spec.example_input_shape()
    if channels_last:
        shape = (shape[0], *shape[2:], shape[1])
    return np.zeros(shape, np.float32)


def build(checkpoint_or_block_name, framework: str, **config):
    """A block of ``framework`` ('torch' | 'tf' | 'jax'), with the checkpoint's weights loaded.

    ``checkpoint_or_block_name``: a ``Checkpoint``, the path of a ``save_weights`` file, or a block
    class name (then the block keeps its published initialisation). ``config`` adds or overrides
    constructor keywords; keywords that are not config fields (``data_format``, ``dtype``, ...) go to
    the framework's constructor only. Flax blocks get ``rngs=nnx.Rngs(0)`` unless given; Keras
    layers are built (their variables created) from the config's input shape. The block is in its
    framework's default mode: call ``.eval()`` on torch and Flax blocks before inference.
    """
    ckpt = None
    src = checkpoint_or_block_name
    if isinstance(src, Checkpoint):
        ckpt = src
    elif isinstance(src, (str, os.PathLike)) and os.fspath(src) not in CONFIGS:
        if not os.path.exists(os.fspath(src)):
            config_class(os.fspath(src))  # ConfigError: unknown block (and no such file)
        ckpt = load_file(src)
    name = ckpt.block if ckpt is not None else os.fspath(src)
    fields = set(config_class(name).__dataclass_fields__)
    keywords = {**(ckpt.config if ckpt is not None else {}), **config}
    spec_kw = {k: v for k, v in keywords.items() if k in fields}
    spec = make_config(name, **spec_kw)  # validate before any framework import
    fw = FRAMEWORKS.get(str(framework).lower())
    mod = backend(framework)
    cls = getattr(mod, name, None)
    if cls is None:
        raise ConfigError(f"nlattn.{fw} has no {name}")
    if fw == "jax" and "rngs" not in keywords:
        from flax import nnx

        keywords["rngs"] = nnx.Rngs(0)
    block = cls(**keywords)
    if fw == "tf" and not getattr(block, "built", True):
        # create the variables now (a Keras layer makes them on its first input)
        if hasattr(block, "default_input_shape"):
            block.build(block.default_input_shape())
        else:
            channels_last = getattr(block, "data_format", "channels_last") != "channels_first"
            block(_dummy_input(spec, channels_last))
    if ckpt is not None:
        mod.load_weights(block, ckpt.weights)
    return block
