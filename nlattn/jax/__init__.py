"""nlattn blocks as Flax NNX modules (channels-last: (B, L, C), (B, H, W, C), (B, T, H, W, C)).

    from flax import nnx
    from nlattn.jax import NonLocalBlock2D, export_weights, load_weights
    block = NonLocalBlock2D(64, mode="embedded_gaussian", rngs=nnx.Rngs(0))
    block.eval()                                   # BatchNorm: running statistics
    y, attention = block(x, return_attention=True)

Every class takes the keywords of its config (``nlattn.make_config``), keeps it as ``.spec``, and
has its sub-modules at the canonical weight names (``block.theta``, ``block.bn``, ...;
docs/design.md §3). Blocks with BatchNorm start in training mode, as ``nnx.BatchNorm`` does: call
``.eval()`` / ``.train()`` to switch. ``implementation="auto"`` (default) runs a block's fast path,
which never forms the N×M relation matrix (query-chunked softmax attention,
``query_chunk_size=1024``); ``"naive"`` the readable materialising path, also used for
``return_attention=True``. ``export_weights`` / ``load_weights`` take a block or any ``nnx.Module``
holding blocks (names prefixed by their attribute paths, e.g. ``stage.1.nl.g.weight``).
Precision follows NNX: ``param_dtype`` (float32) is stored, ``dtype`` computed in, so
``dtype=jnp.bfloat16`` alone is mixed precision; energies, softmax and sums over keys run in float32.
More than one device (``distributed.py``): data parallel under ``nnx.jit`` with a sharded batch, or
under ``shard_map`` with ``bn_axis_name`` (BatchNorm statistics of the global batch);
``context_parallel(block, mesh, axis)`` splits one huge input's query positions over devices.
"""

try:
    import jax  # noqa: F401
    from flax import nnx  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(f"nlattn.jax needs JAX and Flax ({e}); install them with `pip install nlattn[jax]`") from e

from ..specs import CONFIGS
from ._base import Block
from ._weights import blocks, export_weights, load_weights
from .attention import ChannelAttention, CrissCrossAttention, PositionAttention, SelfAttention
from .disentangled import DisentangledNonLocal1D, DisentangledNonLocal2D, DisentangledNonLocal3D
from .distributed import ContextParallel, context_parallel, convert_sync_batchnorm
from .evc import ExplicitVisualCenter
from .global_context import GlobalContext
from .nl_means import NonLocalMeans
from .non_local import NonLocalBlock1D, NonLocalBlock2D, NonLocalBlock3D
from .rga import RelationAwareAttention
from .scale import Scale

#: block class name -> Flax class, for every block of the spec
BLOCKS: dict[str, type[Block]] = {name: globals()[name] for name in CONFIGS}

__all__ = [
    "BLOCKS",
    "Block",
    *BLOCKS,
    "blocks",
    "export_weights",
    "load_weights",
    # more than one device (nlattn/jax/distributed.py)
    "convert_sync_batchnorm",
    "ContextParallel",
    "context_parallel",
]
