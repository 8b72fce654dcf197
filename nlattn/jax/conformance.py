"""The Flax adapters of the conformance suite (channels-first float64 in, channels-last Flax inside).

``FlaxAdapter`` ("flax") runs every block with ``implementation="auto"`` (its fast path) and a small
``query_chunk_size``, so that the catalogue's small inputs run several query chunks, the last one
ragged, wholly in float32, bfloat16 or float16 (``dtype = param_dtype``); ``FlaxNaiveAdapter``
("flax-naive") runs the materialising path (float32: the fast columns' attention calls run it in
half precision); ``FlaxMixedAdapter`` ("flax-mixed") the fast path in mixed precision: float32
parameters and input, ``dtype`` bfloat16 or float16 (the NNX convention). Forward passes and
gradients are ``jax.jit``-compiled, keyed on the block's ``nnx`` graph definition, so a block of
the same structure reuses the compiled function (``tests/test_flax.py`` checks jit == eager).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..conformance.adapter import Adapter
from ..specs import tensors
from ..weights.access import STATISTICS
from . import BLOCKS
from ._weights import ACCESS, load_weights

# docs/design.md §5: no reduced-precision matmuls (TF32 and friends on accelerators)
jax.config.update("jax_default_matmul_precision", "float32")


def _to_last(x: np.ndarray) -> np.ndarray:
    return np.moveaxis(x, 1, -1) if x.ndim >= 3 else x


def _to_first(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return np.moveaxis(x, -1, 1) if x.ndim >= 3 else x


#: the catalogue's inputs are tiny: compile time dominates, so skip LLVM's optimisation passes
#: (LLVM code generation only: the HLO passes, hence fusion and numerics, are unchanged)
_JIT = dict(compiler_options={"xla_backend_optimization_level": 0})


@functools.partial(jax.jit, static_argnums=(0, 3), **_JIT)
def _apply(graphdef, state, x, calls: tuple[bool, ...]):
    """(the outputs of one call per ``return_attention`` flag in ``calls``, the state after them:
    BatchNorm running statistics updated in train mode). Several calls are one program, as
    compiling costs more than running."""
    module = nnx.merge(graphdef, state)
    outs = tuple(module(x, return_attention=True) if flag else module(x) for flag in calls)
    return outs, nnx.state(module)


@functools.partial(jax.jit, static_argnums=0, **_JIT)
def _grads(graphdef, params, rest, x, cotangent):
    def objective(params, x):
        return jnp.sum(nnx.merge(graphdef, params, rest)(x) * cotangent)

    return jax.grad(objective, argnums=(0, 1))(params, x)


def _materialise_zeros(module: nnx.Module) -> None:
    """Give an ``nnx.eval_shape``-built block concrete (zero) variables of the right shapes."""
    state = nnx.state(module)
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), state)
    nnx.update(module, zeros)


class FlaxAdapter(Adapter):
    name = "flax"
    dtypes: tuple[str, ...] = ("float32", "bfloat16", "float16")
    unbiased_running_var = False  # nnx.BatchNorm updates running var with the biased variance
    supports_gradients = True
    implementation = "auto"
    #: queries per step of the chunked softmax attention: small, so the cases run several chunks
    query_chunk_size = 8

    def build(self, block, config, dtype):
        """A block in eval mode with zero weights (the runner loads weights next).

        Built under ``nnx.eval_shape``: random initialisers would compile once per shape, and the
        published initialisation is tested on its own (tests/test_flax.py).
        """
        cls = BLOCKS[block]
        kw = dict(config, implementation=self.implementation, **self.dtypes_of(dtype))
        if cls.config_class.query_chunked:
            kw["query_chunk_size"] = self.query_chunk_size
        m = nnx.eval_shape(lambda: cls(**kw, rngs=nnx.Rngs(0)))
        _materialise_zeros(m)
        m.eval()
        return m

    def dtypes_of(self, dtype: str) -> dict:
        """The block's ``dtype`` and ``param_dtype`` for one of the column's dtypes: the whole block."""
        return dict(dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(dtype))

    def load_weights(self, module, weights):
        self._next = None
        load_weights(module, weights)

    def _input(self, module, x):
        return jnp.asarray(_to_last(np.asarray(x)).astype(module.param_dtype))

    def _call(self, module, x, calls):
        graphdef, state = nnx.split(module)
        outs, state = _apply(graphdef, state, x, calls)
        nnx.update(module, state)
        return outs

    #: (block, input, (output, map)) of an eval-mode attention call compiled with the plain one
    _next: tuple | None = None

    def forward(self, module, x, *, training=False, return_attention=False):
        xin = self._input(module, x)
        nxt, self._next = self._next, None
        if training:
            module.train()
            try:
                (result,) = self._call(module, xin, (return_attention,))
            finally:
                module.eval()
        elif return_attention and nxt is not None and nxt[0] is module and np.array_equal(nxt[1], x):
            result = nxt[2]
        elif return_attention or module.spec.attention is None:
            (result,) = self._call(module, xin, (return_attention,))
        else:  # the runner's eval check makes the attention call next: one compile for both
            result, both = self._call(module, xin, (False, True))
            self._next = (module, np.array(x), both)
        if not return_attention:
            return _to_first(result)
        out, attn = result
        return _to_first(out), np.asarray(attn, dtype=np.float64)

    def running_stats(self, module):
        return {k: v.astype(np.float64) for k, v in ACCESS.running_stats(module).items()}

    def gradients(self, module, x, cotangent):
        module.eval()
        xin = self._input(module, x)
        cot = jnp.asarray(_to_last(np.asarray(cotangent)), dtype=xin.dtype)
        graphdef, params, rest = nnx.split(module, nnx.Param, ...)
        gparams, gx = _grads(graphdef, params, rest, xin, cot)
        # the block with its parameters replaced by their gradients: exported in canonical layouts
        gw = ACCESS.export_weights(nnx.merge(graphdef, gparams, rest))
        kinds = tensors(module.spec.schema())
        return _to_first(gx), {k: v.astype(np.float64) for k, v in gw.items() if kinds[k].kind not in STATISTICS}


class FlaxNaiveAdapter(FlaxAdapter):
    """Every block on its readable, materialising path (``implementation="naive"``)."""

    name = "flax-naive"
    dtypes = ("float32",)
    implementation = "naive"


class FlaxMixedAdapter(FlaxAdapter):
    """Mixed precision: float32 parameters (and running statistics) and a float32 input, the
    computation in the column's dtype (``dtype=bfloat16`` or ``float16``, ``param_dtype=float32``):
    the block casts the input and its parameters, as NNX layers do."""

    name = "flax-mixed"
    dtypes = ("bfloat16", "float16")

    def dtypes_of(self, dtype):
        return dict(dtype=jnp.dtype(dtype), param_dtype=jnp.float32)
