"""Canonical weight files (safetensors + nlattn metadata) and safe readers for checkpoint files.

A canonical file holds the block's canonical tensors (docs/design.md §3) and, in its safetensors metadata::

    nlattn_block    the block class name, e.g. "NonLocalBlock2D"
    nlattn_config   the constructor keywords as JSON
    nlattn_layout   the canonical layout version ("1")
    nlattn_version  the nlattn version that wrote it
"""

from __future__ import annotations

import json
import os
import stat
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ConfigError, WeightError
from ..specs import check_weights, make_config
from ..specs import tensors as schema_tensors

#: version of the canonical names/layouts written in ``nlattn_layout``
LAYOUT_VERSION = "1"

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
PICKLE_SUFFIXES = (".pkl", ".pickle")


class WeightFileError(WeightError):
    """A weights file cannot be used: unreadable, truncated, foreign, or with bad metadata.

    A ``WeightError`` (hence a ``ValueError``) whose message starts with the file's path.
    """

    def __init__(self, path, message: str):
        self.path = os.fspath(path) if isinstance(path, (str, os.PathLike)) else str(path)
        self.block = None
        self.problems = [message]
        ValueError.__init__(self, f"{self.path}: {message}")


@dataclass
class Checkpoint:
    """A block's weights in canonical form, ready for ``nlattn.build`` or ``save_weights``.

    ``block``: class name (``"NonLocalBlock2D"``); ``config``: constructor keywords (dict);
    ``weights``: canonical name -> array (PyTorch names and layouts). Importers also fill
    ``source`` (the checkpoint's origin), ``mapped`` (canonical name -> source key), ``dropped``
    (source key -> why it was left out) and ``notes`` (conventions the importer applied).
    """

    block: str
    config: dict[str, Any]
    weights: dict[str, np.ndarray]
    source: str | None = None
    mapped: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def spec(self):
        """The validated config (``nlattn.make_config(block, **config)``)."""
        return make_config(self.block, **self.config)

    def validate(self) -> None:
        """Raise ConfigError / WeightError unless config and weights fit the block's schema."""
        check_weights(self.block, self.spec().schema(), self.weights)

    def summary(self) -> str:
        """Human-readable report: what was mapped, dropped and assumed."""
        lines = [f"{self.block}({', '.join(f'{k}={v!r}' for k, v in self.config.items())})"]
        for name, arr in self.weights.items():
            src = self.mapped.get(name)
            origin = f"{src} -> " if src is not None and src != name else ""
            lines.append(f"  {origin}{name} {tuple(arr.shape)} {arr.dtype}")
        for key, why in self.dropped.items():
            lines.append(f"  dropped {key}: {why}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# array helpers
# ----------------------------------------------------------------------------------------------


def to_numpy(value):
    """NumPy view of an array-like (NumPy, torch, JAX, TF tensors); bfloat16 and float8, which
    NumPy and safetensors' NumPy API cannot hold, are widened exactly to float32."""
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch.Tensor, without torch
        t = value.detach().cpu()
        if str(t.dtype) in ("torch.bfloat16", "torch.float8_e4m3fn", "torch.float8_e5m2"):
            t = t.float()
        return t.numpy()
    if hasattr(value, "__array__") or isinstance(value, (int, float, bool, list, tuple)):
        value = np.asarray(value)
        if value.dtype.name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):  # ml_dtypes (JAX): widen
            value = value.astype(np.float32)
        return value
    return value


def _weights_dict(weights: Mapping) -> dict[str, np.ndarray]:
    return {str(k): to_numpy(v) for k, v in weights.items()}


# ----------------------------------------------------------------------------------------------
# writing
# ----------------------------------------------------------------------------------------------


def _resolve(block_or_weights, config, block) -> Checkpoint:
    """A validated Checkpoint from a Checkpoint, a canonical dict (+ block, config) or a framework block."""
    if isinstance(block_or_weights, Checkpoint):
        ckpt = block_or_weights
        if block is not None and block != ckpt.block:
            raise ConfigError(f"save_weights: block={block!r} but the Checkpoint holds {ckpt.block}")
        if config is not None:
            ckpt = Checkpoint(ckpt.block, {**ckpt.config, **dict(config)}, ckpt.weights)
    elif isinstance(block_or_weights, Mapping):
        if block is None:
            raise ConfigError(
                "save_weights: a canonical weights dict needs block= (the class name, "
                "e.g. 'NonLocalBlock2D') and config= (its constructor keywords)"
            )
        ckpt = Checkpoint(block, dict(config or {}), _weights_dict(block_or_weights))
    else:  # a framework block: its spec and exported weights
        from .frameworks import export_weights

        spec = getattr(block_or_weights, "spec", None)
        if spec is None:
            raise TypeError(
                f"save_weights: expected an nlattn block, a Checkpoint or a dict of "
                f"arrays, got {type(block_or_weights).__name__}"
            )
        if block is not None and block != spec.block:
            raise ConfigError(f"save_weights: block={block!r} but the block is a {spec.block}")
        if config is not None and make_config(spec.block, **dict(config)) != spec:
            raise ConfigError(f"save_weights: config= differs from the block's own config {spec}")
        ckpt = Checkpoint(spec.block, spec.to_dict(), _weights_dict(export_weights(block_or_weights)))
    cfg = ckpt.spec()  # ConfigError if invalid
    check_weights(cfg.block, cfg.schema(), ckpt.weights)
    return Checkpoint(cfg.block, cfg.to_dict(), ckpt.weights, ckpt.source, ckpt.mapped, ckpt.dropped, ckpt.notes)


def save_weights(path, block_or_weights, config: dict | None = None, block: str | None = None):
    """Write a canonical ``.safetensors`` file with nlattn metadata; returns the path.

    ``block_or_weights``: an nlattn block of any framework (its config and exported weights), a
    ``Checkpoint``, or a canonical dict together with ``block=`` and ``config=``. Everything is
    validated against the block's schema first; the file is written to a temporary name and then
    renamed, so a failure never leaves a partial file or changes an existing one.
    """
    from safetensors.numpy import save_file

    from .._version import __version__

    ckpt = _resolve(block_or_weights, config, block)
    tensors = {k: np.ascontiguousarray(v) for k, v in ckpt.weights.items()}
    metadata = {
        "nlattn_block": ckpt.block,
        "nlattn_config": json.dumps(ckpt.config, sort_keys=True),
        "nlattn_layout": LAYOUT_VERSION,
        "nlattn_version": __version__,
    }
    path = os.fspath(path)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return path


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` to a temporary name beside ``path``, then rename it to ``path``.

    The temporary name is unique (two threads or processes may write the same path: the last
    rename wins, both files are whole) and keeps ``path``'s suffix (Keras checks it). The file
    gets the mode an ordinary new file gets (0o666 less the umask), or the mode of the file it
    replaces; on any failure nothing is left behind and an existing file is unchanged.
    """
    head, tail = os.path.split(path)
    tmp = os.path.join(head, f".{uuid.uuid4().hex[:12]}.tmp-{tail}")
    try:
        write(tmp)
        mode = stat.S_IMODE(os.stat(path).st_mode) if os.path.exists(path) else 0o666 & ~_umask()
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux /proc)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:  # elsewhere the only way to read it is to set it, briefly
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


# ----------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------


def _check_exists(path: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such weights file")
    if os.path.isdir(path):
        raise WeightFileError(path, "is a directory, expected a weights file")


def read_safetensors(path) -> tuple[dict[str, np.ndarray], dict[str, str] | None]:
    """(tensors, metadata) of a safetensors file; unreadable files raise WeightFileError."""
    from safetensors import safe_open

    path = os.fspath(path)
    _check_exists(path)
    try:
        with safe_open(path, framework="np") as f:
            metadata = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # SafetensorError (truncated, corrupt header), unsupported dtype, OSError
        raise WeightFileError(
            path, f"not a readable safetensors file ({type(e).__name__}: {e}); the file may be truncated or corrupt"
        ) from None
    return tensors, metadata


def load_file(path) -> Checkpoint:
    """Read a file written by ``save_weights``: checks its metadata, config and weights."""
    path = os.fspath(path)
    tensors, meta = read_safetensors(path)
    if not meta or "nlattn_block" not in meta:
        raise WeightFileError(
            path,
            "not an nlattn weights file (no nlattn metadata). For a published "
            "checkpoint use nlattn.from_checkpoint(path, source=...)",
        )
    layout = meta.get("nlattn_layout")
    if layout != LAYOUT_VERSION:
        raise WeightFileError(
            path,
            f"canonical layout version {layout!r}, this nlattn reads "
            f"{LAYOUT_VERSION!r} (written by nlattn {meta.get('nlattn_version')})",
        )
    try:
        config = json.loads(meta.get("nlattn_config", ""))
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise WeightFileError(path, f"metadata nlattn_config is not a JSON object of keywords ({e})") from None
    try:
        cfg = make_config(meta["nlattn_block"], **config)
    except ConfigError as e:
        raise WeightFileError(path, f"metadata holds an invalid config: {e}") from None
    try:
        check_weights(cfg.block, cfg.schema(), tensors)
    except WeightError as e:
        raise WeightError(f"{cfg.block} (file {path})", e.problems) from None
    ordered = {name: tensors[name] for name in schema_tensors(cfg.schema())}  # schema order
    return Checkpoint(cfg.block, cfg.to_dict(), ordered, source=path)


def read_state_dict(path) -> dict[str, Any]:
    """Read any supported checkpoint file into a flat ``{key: array}`` dict, safely.

    ``.safetensors`` (safetensors), ``.pt/.pth/.bin/.ckpt`` (``torch.load(weights_only=True)``,
    torch imported only here), ``.pkl/.pickle`` (allow-listed unpickler, Python 2 pickles
    included), ``.npz`` (``allow_pickle=False``). Wrappers such as ``{'state_dict': ...}``,
    ``{'model': ...}`` and Caffe2's ``{'blobs': ...}`` are unwrapped.
    """
    path = os.fspath(path)
    _check_exists(path)
    lower = path.lower()
    if lower.endswith(".safetensors"):
        state = read_safetensors(path)[0]
    elif lower.endswith(TORCH_SUFFIXES):
        state = _read_torch(path)
    elif lower.endswith(PICKLE_SUFFIXES):
        from .unpickle import safe_load_pickle

        with open(path, "rb") as f:
            state = safe_load_pickle(f.read(), path)
    elif lower.endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as z:
                state = {k: z[k] for k in z.files}
        except Exception as e:
            raise WeightFileError(path, f"not a readable .npz file ({type(e).__name__}: {e})") from None
    else:
        raise WeightFileError(
            path,
            "unknown checkpoint format; supported: .safetensors, "
            f"{', '.join(TORCH_SUFFIXES)}, {', '.join(PICKLE_SUFFIXES)}, .npz",
        )
    return unwrap_state_dict(state, path)


def _read_torch(path: str):
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"{path}: reading a PyTorch checkpoint needs PyTorch; install it with: pip install nlattn[torch]"
        ) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError (unsafe content), RuntimeError (corrupt/truncated zip)
        raise WeightFileError(
            path,
            f"cannot read the PyTorch checkpoint with weights_only=True "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "the file may be truncated, corrupt or hold non-tensor objects",
        ) from None


WRAPPER_KEYS = ("state_dict", "model", "blobs")


def unwrap_state_dict(obj, origin="checkpoint") -> dict[str, Any]:
    """Unwrap ``{'state_dict'|'model'|'blobs': {...}}`` (repeatedly) and convert tensors to NumPy."""
    for _ in range(4):
        if not isinstance(obj, Mapping):
            break
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise WeightFileError(origin, f"expected a dict of tensors (a state dict), got {type(obj).__name__}")
    return {str(k): to_numpy(v) for k, v in obj.items()}
