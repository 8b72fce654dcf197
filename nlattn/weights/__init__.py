"""Canonical weights: files, framework dispatch and importers of published checkpoints.

Canonical weights are a flat ``dict[str, np.ndarray]`` with PyTorch ``state_dict`` names and
layouts (docs/design.md §3), validated against the block's schema (``nlattn.specs``).

* ``save_weights`` / ``load_file``: ``.safetensors`` files with nlattn metadata (block, config JSON,
  layout version, nlattn version).
* ``from_checkpoint``: published checkpoints (AlexHex7, Caffe2 video-nonlocal-net, timm, DANet,
  SAGAN, CCNet, RGA, CFPNet, OpenMMLab mmcv and mmseg) -> ``Checkpoint``; files are read safely
  (``weights_only`` torch loads, an allow-listed unpickler, ``allow_pickle=False``).
* ``export_weights`` / ``load_weights`` / ``build``: dispatch to ``nlattn.torch``, ``nlattn.tf`` or
  ``nlattn.jax`` by the block's framework.
* ``convert`` (``nlattn convert``): any of the above to canonical ``.safetensors``, a torch ``.pt``
  state dict, Keras ``.weights.h5`` or a Flax ``.msgpack`` of the block's ``nnx`` state.

Nothing here imports a framework at module level.
"""

from .convert import convert, read_checkpoint, write_checkpoint
from .files import LAYOUT_VERSION, Checkpoint, WeightFileError, load_file, read_state_dict, save_weights
from .frameworks import build, export_weights, framework_of, load_weights
from .importers import SOURCES, from_checkpoint
from .unpickle import SafeUnpickler, UnsafePickleError

__all__ = [
    "LAYOUT_VERSION",
    "SOURCES",
    "Checkpoint",
    "SafeUnpickler",
    "UnsafePickleError",
    "WeightFileError",
    "build",
    "convert",
    "export_weights",
    "framework_of",
    "from_checkpoint",
    "load_file",
    "load_weights",
    "read_checkpoint",
    "read_state_dict",
    "save_weights",
    "write_checkpoint",
]
