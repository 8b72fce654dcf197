"""``nlattn convert``: read a published or canonical checkpoint, write it for one framework.

Destinations, by suffix of ``dst``:

=================  ===============================================================================
``.safetensors``   canonical weights + nlattn metadata (``save_weights``; read with ``load_file``)
``.pt`` / ``.pth`` a PyTorch state dict of the ``nlattn.torch`` block (canonical names and layouts):
                   ``block.load_state_dict(torch.load(dst, weights_only=True))``
``.weights.h5``    Keras weights of the ``nlattn.tf`` layer, saved from ``keras.Sequential([keras.Input
                   (shape), layer])``: load them into the same wrapper around a fresh layer
``.msgpack``       the ``nlattn.jax`` block's ``nnx.state`` as a pure dict (Flax layouts: HWIO kernels,
                   BN scale/bias/mean/var), ``flax.serialization.msgpack_serialize``: restore with
                   ``nnx.replace_by_pure_dict(nnx.state(block), msgpack_restore(data))`` + ``nnx.update``
=================  ===============================================================================

Every file is written to a temporary name first and renamed (``files.atomic_write``), so a failure
leaves nothing behind.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from ..errors import ConfigError
from .files import Checkpoint, atomic_write, load_file, read_state_dict, save_weights

#: destination suffix -> (what it is, the pip extra it needs or None)
FORMATS = {
    ".safetensors": ("canonical safetensors", None),
    ".pt": ("PyTorch state dict", "torch"),
    ".pth": ("PyTorch state dict", "torch"),
    ".weights.h5": ("Keras weights", "tf"),
    ".msgpack": ("Flax nnx state (msgpack)", "jax"),
}


#: how to read each destination back (printed by ``nlattn convert``)
LOAD_HINTS = {
    ".safetensors": "nlattn.load_file(path), or nlattn.build(path, 'torch' | 'tf' | 'jax')",
    ".pt": "block = nlattn.torch.<Block>(**config); block.load_state_dict(torch.load(path, weights_only=True))",
    ".weights.h5": "keras.Sequential([keras.Input(shape), nlattn.tf.<Block>(**config)]).load_weights(path)",
    ".msgpack": "state = nnx.state(block); nnx.replace_by_pure_dict(state, "
    "flax.serialization.msgpack_restore(data)); nnx.update(block, state)",
}
LOAD_HINTS[".pth"] = LOAD_HINTS[".pt"]


def destination_format(dst) -> str:
    """The ``FORMATS`` key of ``dst``; a ValueError listing the supported ones otherwise."""
    lower = os.fspath(dst).lower()
    for suffix in sorted(FORMATS, key=len, reverse=True):
        if lower.endswith(suffix):
            return suffix
    raise ValueError(
        f"unsupported destination {os.fspath(dst)!r}: use one of "
        f"{', '.join(f'{s} ({d})' for s, (d, _) in FORMATS.items())}"
    )


def read_checkpoint(
    src,
    source: str | None = None,
    *,
    block: str | None = None,
    config: Mapping | None = None,
    prefix: str | None = None,
) -> Checkpoint:
    """The Checkpoint ``nlattn convert`` reads from ``src`` (validated).

    ``source``: a published naming (``from_checkpoint``); else, with ``block``, a file of canonical
    names without nlattn metadata (``config`` gives its keywords); else a ``save_weights`` file
    (``config`` overrides keywords of its metadata).
    """
    config = dict(config or {})
    if source is not None:
        from .importers import from_checkpoint

        return from_checkpoint(src, source, prefix=prefix, **config)
    if prefix is not None:
        raise ConfigError("convert: prefix= selects a block inside a published checkpoint; it needs source=")
    if block is not None:
        state = read_state_dict(src)
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
        ckpt = Checkpoint(block, config, state, source=os.fspath(src))
    else:
        if not os.fspath(src).lower().endswith(".safetensors"):
            from .importers import SOURCES

            raise ConfigError(
                f"convert: {os.fspath(src)} is not an nlattn .safetensors file: for a published "
                f"checkpoint give its source (--source {' | '.join(SOURCES)}), for canonical "
                f"names without nlattn metadata the block (--block NAME --config k=v ...)"
            )
        ckpt = load_file(src)
        if config:
            ckpt = Checkpoint(ckpt.block, {**ckpt.config, **config}, ckpt.weights, source=ckpt.source)
    cfg = ckpt.spec()
    ckpt.validate()
    return Checkpoint(cfg.block, cfg.to_dict(), ckpt.weights, ckpt.source, ckpt.mapped, ckpt.dropped, ckpt.notes)


def keras_input_shape(block) -> tuple:
    """A concrete channels-last (or the layer's data format) input shape, batch excluded."""
    from .frameworks import _dummy_input

    channels_last = getattr(block, "data_format", "channels_last") != "channels_first"
    return _dummy_input(block.spec, channels_last).shape[1:]


def write_checkpoint(ckpt: Checkpoint, dst) -> str:
    """Write ``ckpt`` to ``dst`` in the format its suffix names (see the module docstring)."""
    dst = os.fspath(dst)
    fmt = destination_format(dst)
    ckpt.validate()
    if fmt == ".safetensors":
        save_weights(dst, ckpt)
    elif fmt in (".pt", ".pth"):
        from .frameworks import backend

        backend("torch")  # ImportError naming the extra
        import torch

        state = {k: torch.from_numpy(np.array(v)) for k, v in ckpt.weights.items()}
        atomic_write(dst, lambda p: torch.save(state, p))
    elif fmt == ".weights.h5":
        import keras

        from .frameworks import build

        layer = build(ckpt, "tf")
        wrapper = keras.Sequential([keras.Input(keras_input_shape(layer)), layer])
        atomic_write(dst, wrapper.save_weights)
    else:  # .msgpack
        from .frameworks import build

        block = build(ckpt, "jax")
        from flax import nnx, serialization

        data = serialization.msgpack_serialize(nnx.to_pure_dict(nnx.state(block)))

        def write(p):
            with open(p, "wb") as f:
                f.write(data)

        atomic_write(dst, write)
    return fmt


def check_destination(dst) -> None:
    """Fail before reading anything if ``dst`` cannot be written: its suffix, its directory."""
    destination_format(dst)
    folder = os.path.dirname(os.path.abspath(os.fspath(dst)))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot write {os.fspath(dst)}: no directory {folder}")
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"cannot write {os.fspath(dst)}: the directory {folder} is not writable")


def convert(
    src,
    dst,
    source: str | None = None,
    *,
    block: str | None = None,
    config: Mapping | None = None,
    prefix: str | None = None,
) -> Checkpoint:
    """Read ``src`` (``read_checkpoint``) and write it to ``dst`` (``write_checkpoint``)."""
    check_destination(dst)
    ckpt = read_checkpoint(src, source, block=block, config=config, prefix=prefix)
    write_checkpoint(ckpt, dst)
    return ckpt
