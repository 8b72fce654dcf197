"""ONNX export of nlattn's torch blocks: ``export(module, f, input_shape)``.

The graph comes from ``torch.onnx.export(..., dynamo=False)``, the TorchScript exporter: on the
conformance catalogue it exports in about 0.3 s a block against 2 s for the ``torch.export``-based
one (10 s with dynamic shapes), which keeps the "torch-onnx" conformance column affordable in CI.
It traces Python numbers as constants, so an axis is declared dynamic only where the block's graph
does not depend on it (``static_spatial``); the conformance column exports at another batch and
spatial size than it runs, so a constant traced by mistake fails there.

The batch axis is dynamic for every block. What cannot be exported (``unsupported``):
non-local means, whose ``fast_exp`` reinterprets int64 bits as float64 (``Tensor.view(dtype)``),
an operation neither of torch's exporters translates. The concatenation mode's fast path sorts
and binary-searches (``searchsorted`` has no ONNX export); it is exported through its
materialising path, which the fast one equals (docs/design.md §6).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..specs import BlockConfig
from ._base import Block

#: names of the graph's inputs and outputs
INPUT, OUTPUT, ATTENTION = "x", "y", "attention"


def unsupported(spec: BlockConfig) -> str | None:
    """Why a block with this config cannot be exported to ONNX, or None."""
    if spec.block == "NonLocalMeans":
        return (
            "fast_exp reinterprets int64 bits as float64 (Tensor.view(dtype)), which torch's ONNX "
            "exporters do not translate"
        )
    return None


def static_spatial(spec: BlockConfig) -> str | None:
    """Why the spatial axes of this block's graph are fixed at the export size, or None."""
    fixed = getattr(spec, "fixed_spatial_size", None)  # RGA: its weights mix the positions
    if fixed is not None:
        return f"{spec.block} is built for spatial size {tuple(fixed)}"
    mode = getattr(spec, "mode", None)
    if mode in ("dot_product", "concatenation"):
        return f"mode={mode!r}: the exporter records the relation's 1/M (M key positions) as a constant"
    return None


def materialise_for_export(spec: BlockConfig) -> bool:
    """Whether the fast path has operations without an ONNX export (sort, searchsorted)."""
    return getattr(spec, "mode", None) == "concatenation"


@dataclass(frozen=True)
class Exported:
    """What ``export`` wrote: the dynamic axes of each graph input/output, and why the others are
    fixed (one line per reason)."""

    dynamic_axes: dict[str, dict[int, str]]
    notes: tuple[str, ...]


class _WithAttention(torch.nn.Module):
    """The block's ``(output, attention)`` call as a module: the exporter traces ``forward``."""

    def __init__(self, block: torch.nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block(x, return_attention=True)


@contextlib.contextmanager
def _export_paths(blocks: list[Block]):
    """The materialising path for blocks whose fast path does not export; restored afterwards."""
    saved = [b.implementation for b in blocks]
    try:
        for b in blocks:
            if materialise_for_export(b.spec):
                b.implementation = "naive"
        yield
    finally:
        for b, implementation in zip(blocks, saved):
            b.implementation = implementation


def export(
    module: torch.nn.Module,
    f,
    input_shape: tuple[int, ...],
    *,
    return_attention: bool = False,
    dynamic: bool = True,
    opset_version: int | None = None,
) -> Exported:
    """Write ``module`` (an nlattn block, or a model holding some) to ``f`` (a path or a binary
    file) as an ONNX graph for inputs of ``input_shape`` (B, C, *S), in eval mode, in the dtype
    of its parameters.

    Graph input ``x``; outputs ``y`` (and ``attention`` with ``return_attention``, for a block
    with a map). With ``dynamic`` the batch axis is dynamic, and the spatial axes unless a block
    inside fixes them (``static_spatial``; the reasons are in ``Exported.notes``).
    ConfigError for a block that cannot be exported (``unsupported``).
    """
    blocks = [m for m in module.modules() if isinstance(m, Block)]
    notes = []
    for b in blocks:
        reason = unsupported(b.spec)
        if reason is not None:
            raise ConfigError(f"{b.spec.block}: cannot be exported to ONNX: {reason}")
        if materialise_for_export(b.spec) and b.implementation != "naive":
            notes.append(f"{b.spec.block}: exported through its materialising path (the fast path sorts)")
    fixed = [r for r in (static_spatial(b.spec) for b in blocks) if r is not None]
    axes = {0: "batch"}
    if dynamic and not fixed:
        axes.update({i: f"spatial_{i - 2}" for i in range(2, len(input_shape))})
    notes += [f"spatial axes fixed at {tuple(input_shape[2:])}: {r}" for r in dict.fromkeys(fixed)]
    dynamic_axes = {INPUT: axes, OUTPUT: axes} if dynamic else {}
    outputs = [OUTPUT]
    if return_attention:
        outputs.append(ATTENTION)
        if dynamic:  # its sizes follow from the input's; naming them keeps the graph from fixing them
            # maps have rank 3 or 4 ((B, N, M), (B, heads, N, M), (B, H, W, H + W))
            dynamic_axes[ATTENTION] = {0: "batch", **({} if fixed else {i: f"attention_{i}" for i in range(1, 4)})}
    param = next(module.parameters(), None)
    dtype = param.dtype if param is not None else torch.get_default_dtype()
    device = param.device if param is not None else None
    x = torch.randn(*input_shape, dtype=dtype, device=device)
    was_training = module.training
    module.eval()
    try:
        with _export_paths(blocks), warnings.catch_warnings():
            # the exporter's deprecation notice and tracer warnings about Python numbers: the
            # conformance column checks the graph at another size than it was traced at
            warnings.simplefilter("ignore")
            torch.onnx.export(
                _WithAttention(module) if return_attention else module,
                (x,),
                f,
                input_names=[INPUT],
                output_names=outputs,
                dynamic_axes=dynamic_axes or None,
                opset_version=opset_version,
                dynamo=False,
            )
    finally:
        module.train(was_training)
    return Exported(dynamic_axes, tuple(notes))
