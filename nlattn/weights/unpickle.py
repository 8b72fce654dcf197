"""A restricted unpickler for checkpoints stored as pickles of NumPy arrays (Caffe2 ``.pkl`` blobs).

``pickle.load`` runs whatever callable a file names, so an untrusted pickle can run code. This
unpickler resolves only the few callables that NumPy arrays, NumPy scalars and plain containers
need, and refuses every other global with an ``UnsafePickleError`` before anything is called.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

from .files import WeightFileError


class UnsafePickleError(WeightFileError):
    """A pickle asked for a global outside the allow-list (it could run code): refused."""


def _latin1_encode(text, encoding="utf-8", errors="strict"):
    """``_codecs.encode`` restricted to what pickled bytes use (protocol 2 writes them as latin1 text)."""
    import codecs

    if not isinstance(text, str) or codecs.lookup(encoding).name not in ("iso8859-1", "utf-8"):
        raise pickle.UnpicklingError(f"_codecs.encode is only allowed on text with latin1 (got {encoding!r})")
    return codecs.encode(text, encoding, errors)


def _allowed() -> dict[tuple[str, str], Any]:
    import collections

    import numpy as np

    core = getattr(np, "_core", None) or np.core  # numpy >= 2 renamed numpy.core to numpy._core
    reconstruct, scalar = core.multiarray._reconstruct, core.multiarray.scalar
    frombuffer = core.numeric._frombuffer
    table = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,  # bytes pickled by Python 3, protocol 2
        ("collections", "OrderedDict"): collections.OrderedDict,
    }
    for mod in ("numpy.core", "numpy._core"):  # files from numpy 1.x and 2.x
        table[(f"{mod}.multiarray", "_reconstruct")] = reconstruct
        table[(f"{mod}.multiarray", "scalar")] = scalar
        table[(f"{mod}.numeric", "_frombuffer")] = frombuffer  # protocol 5
    return table


class SafeUnpickler(pickle.Unpickler):
    """Unpickles NumPy arrays, NumPy scalars, dicts, lists, tuples, strings and numbers; nothing else."""

    def __init__(self, file, *, path: str = "<pickle>", encoding: str = "latin1"):
        # latin1: Python 2 pickles (Caffe2 blobs) store array bytes as str, which numpy accepts back
        super().__init__(file, encoding=encoding)
        self._path = path
        self._table = _allowed()

    def find_class(self, module: str, name: str):
        try:
            return self._table[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                self._path,
                f"refused to unpickle global {module}.{name}: only NumPy arrays and plain "
                "containers are allowed (an arbitrary global could run code). Convert the checkpoint "
                "to .safetensors or .npz with trusted code.",
            ) from None

    def persistent_load(self, pid):
        raise UnsafePickleError(self._path, "refused persistent id in pickle (not a plain NumPy pickle)")


def safe_load_pickle(data: bytes, path: str = "<pickle>") -> Any:
    """Unpickle ``data`` with the allow-list; any failure is a WeightFileError naming ``path``."""
    try:
        return SafeUnpickler(io.BytesIO(data), path=path).load()
    except WeightFileError:
        raise
    except Exception as e:  # truncated or corrupt: EOFError, UnpicklingError, ValueError, ...
        raise WeightFileError(path, f"not a readable pickle ({type(e).__name__}: {e})") from None
