"""What every torch block shares: config binding, input checks, schema-driven layer construction."""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, InputError
from ..specs import BatchNorm, BlockConfig, Conv, Dense, GroupNorm, Param, check_float_dtype

#: values of every block's ``implementation`` keyword: "auto" takes the fast path where the block
#: has one (never materialising the N×N relation), "naive" the readable materialising path
IMPLEMENTATIONS = ("auto", "naive")

#: dtypes whose attention cores (energies, softmax, sorted sums, codeword distances) run in float32,
#: as torch's own reduced-precision kernels accumulate in float32
_REDUCED = (torch.bfloat16, torch.float16)


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for bfloat16/float16 tensors, the tensor's own dtype otherwise."""
    return torch.float32 if dtype in _REDUCED else dtype


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(scale·qᵀk) applied to v, channels-first, without materialising the (N, M) map.

    q (B, h, D, N), k (B, h, D, M), v (B, h, Dv, M) -> (B, h, Dv, N), through
    ``F.scaled_dot_product_attention`` with an explicit scale. Its CPU flash kernel needs
    position-major contiguous operands and one head width for q, k and v, so the narrower side is
    zero-padded: padding q and k leaves qᵀk unchanged, padding v adds output columns that are
    dropped. (Measured at N = 128², D = 32, Dv = 256: padding runs in 0.7× the materialising time;
    one SDPA call per D-wide slice of v needs less memory but twice the time.)
    """
    d, dv = q.shape[-2], v.shape[-2]
    width = max(d, dv)
    q, k, v = (F.pad(t.transpose(-1, -2), (0, width - t.shape[-2])).contiguous() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    return out[..., :dv].transpose(-1, -2)


class Block(nn.Module):
    """Base of every nlattn torch block: ``self.spec`` holds the validated config.

    Positional and keyword arguments are the config's fields (DESIGN §2); ``implementation`` is
    "auto" (a fast path where the block has one; the materialising one for ``return_attention``)
    or "naive" (always the readable materialising path); ``device`` and ``dtype`` are torch's usual
    factory keywords.
    """

    config_class: ClassVar[type[BlockConfig]]

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if "config_class" in cls.__dict__:    # a user-facing block: show the config's keywords
            params = list(inspect.signature(cls.config_class).parameters.values())
            params.append(inspect.Parameter("implementation", inspect.Parameter.KEYWORD_ONLY,
                                            default="auto"))
            params += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None)
                       for n in ("device", "dtype")]
            cls.__signature__ = inspect.Signature(params)

    def __init__(self, *args, implementation="auto", device=None, dtype=None, **kwargs):
        super().__init__()
        if not isinstance(implementation, str) or implementation not in IMPLEMENTATIONS:
            raise ConfigError(f"{self.config_class.block}: implementation must be one of "
                              f"{IMPLEMENTATIONS}, got {implementation!r}")
        self.implementation = implementation
        fields = [f.name for f in dataclasses.fields(self.config_class)]
        if len(args) > len(fields):
            raise TypeError(f"{self.config_class.block}() takes at most {len(fields)} positional "
                            f"arguments ({', '.join(fields)}), got {len(args)}")
        for name, value in zip(fields, args):
            if name in kwargs:
                raise TypeError(f"{self.config_class.block}() got multiple values for {name!r}")
            kwargs[name] = value
        self.spec = self.config_class.from_dict(kwargs)
        self._factory = {"device": device, "dtype": dtype}

    def fast(self, return_attention: bool = False) -> bool:
        """Whether this call takes the fast path: "auto", and no attention map asked for."""
        return self.implementation == "auto" and not return_attention

    def _finish(self):
        """Move to the requested device/dtype once every layer exists (call at the end of __init__)."""
        if self._factory["device"] is not None or self._factory["dtype"] is not None:
            self.to(**{k: v for k, v in self._factory.items() if v is not None})

    def check_input(self, x) -> None:
        """InputError unless x is a floating tensor of the expected (channels-first) shape."""
        if not isinstance(x, torch.Tensor):
            raise InputError(f"{self.spec.block}: expected a torch.Tensor, got {type(x).__name__}")
        check_float_dtype(self.spec.block, x.dtype)
        self.spec.check_input_shape(tuple(x.shape))

    def extra_repr(self) -> str:
        changed = {f.name: getattr(self.spec, f.name) for f in dataclasses.fields(self.spec)
                   if f.default is dataclasses.MISSING or getattr(self.spec, f.name) != f.default}
        if self.implementation != "auto":
            changed["implementation"] = self.implementation
        return ", ".join(f"{k}={v!r}" for k, v in changed.items())


def layers(spec: BlockConfig) -> dict:
    """The schema's layers by prefix (or name, for free parameters)."""
    return {getattr(layer, "prefix", getattr(layer, "name", None)): layer for layer in spec.schema()}


def conv(layer: Conv) -> nn.Module:
    """An ``nn.Conv{1,2,3}d`` with the schema layer's shape (its rank is the kernel's)."""
    cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[len(layer.kernel_size)]
    return cls(layer.in_channels, layer.out_channels, layer.kernel_size, bias=layer.bias,
               groups=layer.groups, padding=layer.padding or 0)


def batch_norm(layer: BatchNorm, spatial_dims: int) -> nn.Module:
    """``nn.BatchNorm{1,2,3}d`` with the schema's eps and (torch-convention) momentum."""
    cls = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[spatial_dims]
    return cls(layer.num_features, eps=layer.eps, momentum=layer.momentum)


def dense(layer: Dense) -> nn.Linear:
    return nn.Linear(layer.in_features, layer.out_features, bias=layer.bias)


def group_norm(layer: GroupNorm) -> nn.GroupNorm:
    return nn.GroupNorm(layer.num_groups, layer.num_channels, eps=layer.eps)


def param(layer: Param, init=None) -> nn.Parameter:
    """A free parameter: the schema's constant init, else ``init(tensor)`` (in place)."""
    t = torch.empty(layer.shape)
    if layer.init is not None:
        nn.init.constant_(t, layer.init)
    elif init is not None:
        init(t)
    else:
        nn.init.uniform_(t, -1 / math.sqrt(max(1, t.numel())), 1 / math.sqrt(max(1, t.numel())))
    return nn.Parameter(t)


def zero_(module: nn.Module) -> None:
    """Set every parameter of a module to zero (identity initialisation)."""
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
