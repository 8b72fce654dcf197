"""The adapter protocol: what the conformance suite needs from a framework (or from your own code).

An adapter works in canonical terms only — channels-first NumPy arrays in and out, canonical weight
names and layouts — so the runner never sees a framework type. Subclass ``Adapter``, implement the
four methods (and ``gradients`` if you can), and run ``nlattn conformance --adapter pkg.mod:Class``
or, from a pytest suite, ``pytest --nlattn-adapter pkg.mod:Class`` (``nlattn.conformance.pytest_plugin``).

An implementation that lacks an option (no ``pool_first``, one head only, ...) declares it rather
than failing: ``supports(case)`` returns the reason for a case it cannot build, and ``NotSupported``
raised from any method marks the check being run. Such checks are reported as "not supported",
apart from failures, and count against the block's coverage (supported cases / cases).
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np

from ..numpy_ref import RunningStats, run
from .cases import Case


class NotSupported(Exception):
    """Raised by an adapter for what its implementation does not have (an option, a dtype, the
    training mode): the check is reported as "not supported" with ``reason``, not as a failure."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Adapter:
    """What the conformance suite needs from an implementation, in canonical terms.

    Checks per case and dtype: ``eval`` (the output, and the attention map where the block has one),
    ``train`` (the output with batch statistics and the running statistics after the update; cases
    with BatchNorm, unless ``supports_training`` is False) and ``grad`` (input and parameter
    gradients in float32/float64, if ``supports_gradients``). ``supports(case)`` and
    ``NotSupported`` declare what the implementation does not cover (module docstring).
    """

    #: column name in the conformance table
    name: str = "adapter"
    #: dtypes every case runs in; each is compared to the float64 reference within its tolerance
    dtypes: tuple[str, ...] = ("float32",)
    #: PyTorch updates running_var with the unbiased batch variance; Keras and Flax with the biased one
    unbiased_running_var: bool = True
    supports_gradients: bool = False
    #: False for an inference-only implementation: no train check (nothing reported for it)
    supports_training: bool = True

    def supports(self, case: Case) -> str | None:
        """None if this implementation can run ``case``; else the reason it cannot (e.g. "no
        pool_first option"), reported as "not supported". ``case.block`` and ``case.config`` say
        what is asked for. The default supports everything."""
        return None

    def build(self, block: str, config: dict, dtype: str) -> Any:
        """A fresh block of class ``block`` with constructor keywords ``config`` (eval mode)."""
        raise NotImplementedError

    def load_weights(self, module: Any, weights: dict[str, np.ndarray]) -> None:
        """Set every weight from the canonical dict (float64 arrays; cast to the module's dtype)."""
        raise NotImplementedError

    def forward(self, module: Any, x: np.ndarray, *, training: bool = False, return_attention: bool = False):
        """Run on a channels-first float64 array (cast to the module's dtype); return float64
        channels-first output, and the attention map if asked. ``training=True`` uses batch
        statistics and updates the running ones."""
        raise NotImplementedError

    def running_stats(self, module: Any) -> dict[str, np.ndarray]:
        """Every BatchNorm running mean/var, by canonical name."""
        raise NotImplementedError

    def gradients(self, module: Any, x: np.ndarray, cotangent: np.ndarray):
        """(d<cotangent, f(x)>/dx, {canonical name: d/dparam}) in eval mode, canonical layouts,
        for every trainable parameter (not running statistics)."""
        raise NotImplementedError


class ReferenceAdapter(Adapter):
    """The float64 reference itself: checks that it still reproduces the golden vectors."""

    name = "numpy"
    dtypes = ("float64",)

    def build(self, block, config, dtype):
        return {"block": block, "config": config, "weights": None, "stats": {}}

    def load_weights(self, module, weights):
        module["weights"] = {k: np.array(v, dtype=np.float64) for k, v in weights.items()}

    def forward(self, module, x, *, training=False, return_attention=False):
        stats = RunningStats(self.unbiased_running_var)
        out = run(
            module["block"],
            x,
            module["weights"],
            module["config"],
            training=training,
            stats=stats,
            return_attention=return_attention,
        )
        module["weights"].update(stats.updates)
        return out

    def running_stats(self, module):
        return {k: v for k, v in module["weights"].items() if k.endswith(("running_mean", "running_var"))}


#: the built-in framework adapters; a column appears when its framework and adapter import.
#: "<framework>-naive" runs the readable materialising path of every block, "keras-cf" channels_first,
#: "torch-onnx" the torch blocks exported to ONNX and run in onnxruntime (eval mode).
BUILTIN = {
    "numpy": "nlattn.conformance.adapter:ReferenceAdapter",
    "torch": "nlattn.torch.conformance:TorchAdapter",
    "torch-naive": "nlattn.torch.conformance:TorchNaiveAdapter",
    "torch-autocast": "nlattn.torch.conformance:TorchAutocastAdapter",
    "torch-onnx": "nlattn.torch.conformance:TorchOnnxAdapter",
    "keras": "nlattn.tf.conformance:KerasAdapter",
    "keras-cf": "nlattn.tf.conformance:KerasChannelsFirstAdapter",
    "keras-naive": "nlattn.tf.conformance:KerasNaiveAdapter",
    "keras-mixed": "nlattn.tf.conformance:KerasMixedAdapter",
    "flax": "nlattn.jax.conformance:FlaxAdapter",
    "flax-naive": "nlattn.jax.conformance:FlaxNaiveAdapter",
    "flax-mixed": "nlattn.jax.conformance:FlaxMixedAdapter",
}


def adapter_names(frameworks) -> list[str]:
    """The built-in adapters of the given frameworks: 'torch' means 'torch' and 'torch-naive'."""
    return [n for n in BUILTIN if any(n == f or n.startswith(f + "-") for f in frameworks)]


def load_adapter(spec: str) -> Adapter:
    """An adapter from a built-in name or a ``module:Class`` path."""
    target = BUILTIN.get(spec, spec)
    if ":" not in target:
        raise ValueError(f"unknown adapter {spec!r}: use one of {sorted(BUILTIN)} or 'module:Class'")
    module_name, cls_name = target.split(":", 1)
    return getattr(importlib.import_module(module_name), cls_name)()


def available_adapters(names=None) -> tuple[list[Adapter], dict[str, str]]:
    """(adapters that import, {name: why not} for the rest)."""
    adapters, missing = [], {}
    for name in names or BUILTIN:
        try:
            adapters.append(load_adapter(name))
        except (ImportError, AttributeError) as e:  # framework absent, or an adapter class missing
            missing[name] = str(e)
    return adapters, missing
