"""nlattn: the non-local / self-attention family of vision blocks.

One float64 NumPy reference (``nlattn.numpy_ref``) defines each block; ``nlattn.torch``,
``nlattn.tf`` (Keras 3) and ``nlattn.jax`` (Flax NNX) implement it with the same class names and
keywords. Importing ``nlattn`` never imports a framework.
"""

__version__ = "0.1.0"

from .errors import ConfigError, InputError, WeightError
from .specs import CONFIGS, config_class, make_config

#: every block class name (the same in nlattn.torch, nlattn.tf and nlattn.jax)
BLOCKS = tuple(CONFIGS)

__all__ = ["BLOCKS", "CONFIGS", "ConfigError", "InputError", "WeightError", "__version__",
           "config_class", "make_config"]
