"""Test drivers: one small object per framework, so that a concern shared by all three frameworks
is written once (tests/test_blocks.py) and runs for each through the ``fw`` fixture.

A driver speaks in canonical terms: channels-first NumPy arrays in and out, canonical weights;
it knows only how to make a block, run it, put blocks in a model, and compile it.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from nlattn.conformance.cases import CASES

FRAMEWORKS = ("torch", "tf", "jax")

#: one catalogue case per block class: its config is the class's example in framework-wide tests
ONE_CASE_PER_BLOCK = {}
for _case in CASES:
    ONE_CASE_PER_BLOCK.setdefault(_case.block, _case)


def to_last(x: np.ndarray) -> np.ndarray:
    return np.moveaxis(x, 1, -1) if x.ndim >= 3 else x


def to_first(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return np.moveaxis(x, -1, 1) if x.ndim >= 3 else x


class TorchDriver:
    name = "torch"

    def __init__(self):
        import torch

        import nlattn.torch as nt

        torch.set_float32_matmul_precision("highest")  # no TF32 (docs/design.md §5)
        self.module, self.torch = nt, torch

    def make(self, block, config, name=None, **kw):
        self.torch.manual_seed(0)
        return self.module.BLOCKS[block](**config, **kw).eval()

    def loaded(self, block, config, weights, dtype="float32", **kw):
        """A block holding ``weights``, in ``dtype``, eval mode (no random init needed)."""
        m = self.make(block, config, **kw)
        self.module.load_weights(m, weights)
        return m.to(getattr(self.torch, dtype))

    def run(self, block, x, return_attention=False, training=False, dtype=None):
        """Channels-first NumPy in, float64 channels-first NumPy out; ``dtype`` casts the input."""
        block.train(training)
        x = self.torch.from_numpy(np.asarray(x))
        if dtype is not None:
            x = x.to(getattr(self.torch, dtype))
        try:
            with self.torch.no_grad():
                out = block(x, **_attention(return_attention))
        finally:
            block.eval()
        if return_attention:
            return tuple(t.double().numpy() for t in out)
        return out.double().numpy()

    def native_input(self, x):
        return self.torch.from_numpy(np.asarray(x))

    def container(self, children: dict, name=None):
        """A model holding ``children`` (nested dicts are nested models), at their keys."""
        nn = self.torch.nn
        return nn.ModuleDict({k: v if isinstance(v, nn.Module) else self.container(v) for k, v in children.items()})

    def not_a_block(self):
        return self.torch.nn.Linear(2, 2)


class KerasDriver:
    name = "tf"

    def __init__(self):
        import keras

        import nlattn.tf as nk

        self.module, self.keras = nk, keras

    def make(self, block, config, name=None, **kw):
        self.keras.utils.set_random_seed(0)
        layer = self.module.BLOCKS[block](**config, **kw, **({"name": name} if name else {}))
        shape = layer.spec.example_input_shape() if layer.spec is not None else None
        layer.build(to_last(np.zeros(shape)).shape if shape else None)
        return layer

    def loaded(self, block, config, weights, dtype="float32", **kw):
        layer = self.make(block, config, dtype=dtype, **kw)
        self.module.load_weights(layer, weights)
        return layer

    def run(self, block, x, return_attention=False, training=False, dtype=None):
        x = self.native_input(x) if dtype is None else self.keras.ops.cast(self.native_input(x), dtype)
        out = block(x, training=training, **_attention(return_attention))
        if return_attention:
            return to_first(self.keras.ops.convert_to_numpy(out[0])), np.asarray(
                self.keras.ops.convert_to_numpy(out[1]), np.float64
            )
        return to_first(self.keras.ops.convert_to_numpy(out))

    def native_input(self, x):
        return self.keras.ops.convert_to_tensor(to_last(np.asarray(x)))

    def container(self, children: dict, name=None):
        """Keras paths are chains of layer names: children must be named after their keys."""
        keras = self.keras

        class Container(keras.layers.Layer):
            def __init__(self, kids, name):
                super().__init__(name=name)
                for key, kid in kids.items():
                    setattr(self, key, kid)

        return Container(
            {k: v if isinstance(v, keras.layers.Layer) else self.container(v, name=k) for k, v in children.items()},
            name,
        )

    def not_a_block(self):
        return self.keras.layers.Dense(2)


class FlaxDriver:
    name = "jax"

    def __init__(self):
        import jax
        from flax import nnx

        import nlattn.jax as nj

        jax.config.update("jax_default_matmul_precision", "float32")
        self.module, self.nnx, self.jax = nj, nnx, jax

    def make(self, block, config, name=None, **kw):
        m = self.module.BLOCKS[block](**config, **kw, rngs=self.nnx.Rngs(0))
        m.eval()
        return m

    def loaded(self, block, config, weights, dtype="float32", **kw):
        """Built under ``nnx.eval_shape`` (no random-init compiles), then given ``weights``."""
        nnx, jnp = self.nnx, self.jax.numpy
        cls = self.module.BLOCKS[block]
        m = nnx.eval_shape(lambda: cls(**config, **kw, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0)))
        nnx.update(m, self.jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nnx.state(m)))
        self.module.load_weights(m, weights)
        m.eval()
        return m

    def run(self, block, x, return_attention=False, training=False, dtype=None):
        block.train() if training else block.eval()
        x = self.native_input(x)
        if dtype is not None:
            x = self.jax.numpy.asarray(x, dtype)
        try:
            out = block(x, **_attention(return_attention))
        finally:
            block.eval()
        if return_attention:
            return to_first(out[0]), np.asarray(out[1], np.float64)
        return to_first(out)

    def native_input(self, x):
        return to_last(np.asarray(x))  # NumPy as is: jnp.asarray would make int64 int32

    def container(self, children: dict, name=None):
        nnx = self.nnx

        class Container(nnx.Module):
            def __init__(self, kids):
                for key, kid in kids.items():
                    setattr(self, key, kid)

        return Container({k: v if isinstance(v, nnx.Module) else self.container(v) for k, v in children.items()})

    def not_a_block(self):
        return self.nnx.Linear(2, 2, rngs=self.nnx.Rngs(0))


def _attention(flag):
    return {"return_attention": True} if flag else {}


_DRIVERS = {"torch": TorchDriver, "tf": KerasDriver, "jax": FlaxDriver}
_MADE: dict = {}


def driver(name: str):
    if name not in _MADE:
        _MADE[name] = _DRIVERS[name]()
    return _MADE[name]


@pytest.fixture(params=FRAMEWORKS)
def fw(request):
    """The driver of each framework in turn (tests/test_blocks.py)."""
    return driver(request.param)


def framework_module(name: str):
    return importlib.import_module(f"nlattn.{name}")
