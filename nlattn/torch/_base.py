"""What every torch block shares: argument binding, input checks, and ``make``, which builds the
torch layer of one schema layer with the spec's initialisation.

The same file in ``nlattn/tf`` and ``nlattn/jax`` has the same names: ``Block`` (with
``build_layers(make)``, ``fast``, ``check_input``) and ``make``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import InputError
from ..specs import (
    WEIGHT_NORM_V,
    BatchNorm,
    BlockConfig,
    Conv,
    Dense,
    GroupNorm,
    Layer,
    Param,
    Uniform,
    check_float_dtype,
    config_signature,
    parse_arguments,
)

#: dtypes whose attention cores (energies, softmax, sorted sums, codeword distances) run in float32,
#: as torch's own reduced-precision kernels accumulate in float32
REDUCED = (torch.bfloat16, torch.float16)


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for bfloat16/float16 tensors, the tensor's own dtype otherwise."""
    return torch.float32 if dtype in REDUCED else dtype


def without_autocast(device: torch.device):
    """Autocast switched off, so that what is cast to ``work_dtype`` is computed in it: under
    ``torch.autocast`` a float32 matmul would run in the autocast dtype again (CAM's C×C energies
    in bfloat16 were 0.046 off the reference)."""
    return torch.autocast(device_type=device.type, enabled=False)


class Block(nn.Module):
    """Base of every nlattn torch block: ``self.spec`` holds the validated config.

    Positional and keyword arguments are the config's fields (docs/design.md §2);
    ``implementation`` is "auto" (a fast path where the block has one; the materialising one for
    ``return_attention``) or "naive" (always the readable materialising path); ``device`` and
    ``dtype`` are torch's usual factory keywords. Subclasses set ``config_class`` and create their
    layers in ``build_layers(make)``.
    """

    config_class: ClassVar[type[BlockConfig]]

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if "config_class" in cls.__dict__:  # a user-facing block: show the config's keywords
            cls.__signature__ = config_signature(cls.config_class, ("device", None), ("dtype", None))

    def __init__(self, *args, device=None, dtype=None, **kwargs):
        super().__init__()
        arguments = parse_arguments(self.config_class, args, kwargs, chunked=False)
        self.implementation = arguments.implementation
        # keywords that are neither config fields nor torch's: ConfigError naming the known ones
        self.spec = self.config_class.from_dict({**arguments.config, **arguments.rest})
        self.build_layers(make)
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    def build_layers(self, make) -> None:
        """Create the block's layers as attributes named after the schema (``self.theta = ...``)."""

    def fast(self, return_attention: bool = False) -> bool:
        """Whether this call takes the fast path: "auto", and no attention map asked for."""
        return self.implementation == "auto" and not return_attention

    def check_input(self, x) -> None:
        """InputError unless x is a floating tensor of the expected (channels-first) shape."""
        if not isinstance(x, torch.Tensor):
            raise InputError(f"{self.spec.block}: expected a torch.Tensor, got {type(x).__name__}")
        check_float_dtype(self.spec.block, x.dtype)
        self.spec.check_input_shape(tuple(x.shape))

    def extra_repr(self) -> str:
        changed = {
            f.name: getattr(self.spec, f.name)
            for f in dataclasses.fields(self.spec)
            if f.default is dataclasses.MISSING or getattr(self.spec, f.name) != f.default
        }
        if self.implementation != "auto":
            changed["implementation"] = self.implementation
        return ", ".join(f"{k}={v!r}" for k, v in changed.items())


class BatchNormNd(nn.modules.batchnorm._BatchNorm):
    """``nn.BatchNorm{1,2,3}d`` for any input rank >= 2 (channels on axis 1): the schema's BatchNorm
    does not say the rank, and the statistics do not depend on it."""

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected an input of rank >= 2 (B, C, ...), got rank {input.dim()}")


def make(layer: Layer) -> nn.Module | nn.Parameter:
    """The torch layer of a schema layer, initialised as the spec says (torch's init otherwise);
    conv rank follows the kernel."""
    module: nn.Module
    if isinstance(layer, Conv):
        cls: Any = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[len(layer.kernel_size)]
        module = cls(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            bias=layer.bias,
            groups=layer.groups,
            padding=layer.padding or 0,
        )
        if layer.weight_norm:  # the kernel becomes g·v/‖v‖, with g = ‖v‖ at first (torch's own init)
            module = nn.utils.parametrizations.weight_norm(module, name="weight", dim=0)
    elif isinstance(layer, BatchNorm):
        module = BatchNormNd(layer.num_features, eps=layer.eps, momentum=layer.momentum)
    elif isinstance(layer, Dense):
        module = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias)
    elif isinstance(layer, GroupNorm):
        module = nn.GroupNorm(layer.num_groups, layer.num_channels, eps=layer.eps)
    elif isinstance(layer, Param):  # Gate included: a plain parameter here
        return nn.Parameter(initial(layer.init, layer.shape))
    else:  # pragma: no cover
        raise TypeError(f"unknown schema layer {layer!r}")
    if getattr(layer, "zero_init", False):
        with torch.no_grad():
            for name, p in module.named_parameters():
                if not name.endswith(WEIGHT_NORM_V):  # v stays: g = 0 zeroes the kernel (0/0 with v = 0)
                    p.zero_()
    return module


def initial(init: float | Uniform, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor initialised by a spec's init rule: a constant or U(low, high)."""
    if isinstance(init, Uniform):
        return torch.empty(shape).uniform_(init.low, init.high)
    return torch.full(shape, float(init))
