"""nlattn: the non-local / self-attention family of vision blocks.

One float64 NumPy reference (``nlattn.numpy_ref``) defines each block; ``nlattn.torch``,
``nlattn.tf`` (Keras 3) and ``nlattn.jax`` (Flax NNX) implement it with the same class names and
keywords. Importing ``nlattn`` never imports a framework.
"""

from ._version import __version__
from .errors import ConfigError, InputError, WeightError
from .specs import CONFIGS, config_class, make_config

#: every block: class name (the same in nlattn.torch, nlattn.tf and nlattn.jax) -> its config class
BLOCKS = CONFIGS

#: the framework-neutral weights API (docs/design.md §2), imported on first use so `import nlattn` stays light
_WEIGHTS_API = ("Checkpoint", "build", "export_weights", "from_checkpoint", "load_file", "load_weights", "save_weights")


def __getattr__(name):
    if name in _WEIGHTS_API:
        from . import weights

        return getattr(weights, name)
    if name == "gates":  # {name: γ} of every residual gate in a model of any framework
        from .info import gates

        return gates
    raise AttributeError(f"module 'nlattn' has no attribute {name!r}")


__all__ = [
    "BLOCKS",
    "CONFIGS",
    "ConfigError",
    "InputError",
    "WeightError",
    "__version__",
    "config_class",
    "gates",
    "make_config",
    *_WEIGHTS_API,
]
