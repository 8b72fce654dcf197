"""``TorchAdapter`` (fast paths, ``implementation="auto"``; float32, float64, bfloat16, float16),
``TorchNaiveAdapter`` (the materialising paths), ``TorchAutocastAdapter`` (float32 blocks under
``torch.autocast``) and ``TorchOnnxAdapter`` (float32 blocks exported to ONNX, run in onnxruntime):
nlattn.torch under the conformance suite, gradients by autograd."""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
import torch

from ..conformance.adapter import Adapter, NotSupported
from . import BLOCKS, onnx
from ._weights import ACCESS, load_weights

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Built:
    module: torch.nn.Module
    dtype: torch.dtype


class TorchAdapter(Adapter):
    """Blocks built with ``implementation="auto"``: the fast paths (chunked softmax, re-association, sorting)."""

    name = "torch"
    dtypes: tuple[str, ...] = ("float32", "float64", "bfloat16", "float16")
    unbiased_running_var = True
    supports_gradients = True
    implementation = "auto"

    def __init__(self):
        torch.set_float32_matmul_precision("highest")  # no TF32 (docs/design.md §5)

    def build(self, block, config, dtype):
        module = BLOCKS[block](**config, implementation=self.implementation).to(DTYPES[dtype])
        return Built(module.eval(), DTYPES[dtype])

    def load_weights(self, built, weights):
        load_weights(built.module, weights)

    def _input(self, built, x):
        return torch.from_numpy(np.asarray(x, dtype=np.float64)).to(built.dtype)

    def forward(self, built, x, *, training=False, return_attention=False):
        m = built.module
        m.train(training)
        xt = self._input(built, x)
        try:
            with torch.no_grad():
                out = m(xt, return_attention=True) if return_attention else m(xt)
        finally:
            m.eval()
        if return_attention:
            return tuple(_numpy(t).astype(np.float64) for t in out)
        return _numpy(out).astype(np.float64)

    def running_stats(self, built):
        return {k: v.astype(np.float64) for k, v in ACCESS.running_stats(built.module).items()}

    def gradients(self, built, x, cotangent):
        m = built.module.eval()
        m.zero_grad(set_to_none=True)
        xt = self._input(built, x).requires_grad_(True)
        out = m(xt)
        (out * torch.from_numpy(np.asarray(cotangent)).to(out.dtype)).sum().backward()
        grads = {name: (p.grad if p.grad is not None else torch.zeros_like(p)) for name, p in m.named_parameters()}
        return (_numpy(xt.grad).astype(np.float64), {k: _numpy(g).astype(np.float64) for k, g in grads.items()})


class TorchNaiveAdapter(TorchAdapter):
    """Blocks built with ``implementation="naive"``: every relation map materialised."""

    name = "torch-naive"
    implementation = "naive"


class TorchAutocastAdapter(TorchAdapter):
    """Float32 blocks run under ``torch.autocast("cpu", dtype)``, as mixed-precision training runs
    them: the dtypes are the autocast dtypes; the parameters stay float32."""

    name = "torch-autocast"
    dtypes = ("bfloat16", "float16")

    def build(self, block, config, dtype):
        module = BLOCKS[block](**config, implementation=self.implementation)
        return Built(module.eval(), DTYPES[dtype])

    def _input(self, built, x):
        return torch.from_numpy(np.asarray(x, dtype=np.float32))

    def forward(self, built, x, *, training=False, return_attention=False):
        with torch.autocast(device_type="cpu", dtype=built.dtype):
            return super().forward(built, x, training=training, return_attention=return_attention)


@dataclass
class Exportable(Built):
    """A float32 block and its onnxruntime sessions, exported on first use (plain, with attention)."""

    sessions: dict = field(default_factory=dict)


class TorchOnnxAdapter(TorchAdapter):
    """Float32 blocks exported by ``nlattn.torch.onnx.export`` and run in onnxruntime (eval mode).

    Each graph is exported at one more batch item, and two more positions along every dynamic
    spatial axis, than the case runs at: the dynamic axes are checked, not assumed."""

    name = "torch-onnx"
    dtypes = ("float32",)
    supports_gradients = False
    supports_training = False

    def __init__(self):
        super().__init__()
        try:
            import onnxruntime
        except ImportError as e:
            raise ImportError("the torch-onnx column needs onnxruntime: pip install 'nlattn[onnx]'") from e
        self.ort = onnxruntime

    def supports(self, case):
        return onnx.unsupported(case.spec)

    def build(self, block, config, dtype):
        built = super().build(block, config, dtype)
        return Exportable(built.module, built.dtype)

    def forward(self, built, x, *, training=False, return_attention=False):
        if training:
            raise NotSupported("an ONNX graph is exported in eval mode")
        x = np.asarray(x, dtype=np.float32)
        if return_attention not in built.sessions:
            spatial = 0 if onnx.static_spatial(built.module.spec) else 2
            shape = (x.shape[0] + 1, x.shape[1], *(s + spatial for s in x.shape[2:]))
            f = io.BytesIO()
            onnx.export(built.module, f, shape, return_attention=return_attention)
            options = self.ort.SessionOptions()
            options.intra_op_num_threads = 1  # many tiny graphs: no thread pool to start each time
            built.sessions[return_attention] = self.ort.InferenceSession(
                f.getvalue(), options, providers=["CPUExecutionProvider"]
            )
        out = built.sessions[return_attention].run(None, {onnx.INPUT: x})
        out = tuple(np.asarray(t, dtype=np.float64) for t in out)
        return out if return_attention else out[0]

    def running_stats(self, built):
        raise NotSupported("an ONNX graph is exported in eval mode")


def _numpy(t: torch.Tensor) -> np.ndarray:
    return ACCESS.read(t)
