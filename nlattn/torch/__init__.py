"""nlattn blocks as ``torch.nn.Module``s (channels-first: NCL, NCHW, NCTHW).

Every class takes the keywords of its config (``nlattn.make_config``), keeps it as ``.spec``, and
has ``state_dict()`` keys equal to the canonical weight names (docs/design.md §3). Attention
blocks' ``forward(x, return_attention=False)`` also returns their relation map when asked.
"""

try:
    import torch  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("nlattn.torch needs PyTorch, which is not installed: pip install nlattn[torch]") from e

from ..specs import CONFIGS
from ._base import Block
from ._weights import blocks, export_weights, load_weights
from .attention import ChannelAttention, CrissCrossAttention, PositionAttention, SelfAttention
from .disentangled import DisentangledNonLocal1D, DisentangledNonLocal2D, DisentangledNonLocal3D
from .distributed import ContextParallel, SyncBatchNorm, context_parallel, convert_sync_batchnorm
from .evc import ExplicitVisualCenter
from .global_context import GlobalContext
from .nl_means import NonLocalMeans
from .non_local import NonLocalBlock1D, NonLocalBlock2D, NonLocalBlock3D
from .rga import RelationAwareAttention
from .scale import Scale

#: block class name -> torch class, for every block of the spec
BLOCKS: dict[str, type[Block]] = {name: globals()[name] for name in CONFIGS}

__all__ = [
    "BLOCKS",
    "Block",
    *BLOCKS,
    "blocks",
    "export_weights",
    "load_weights",
    # more than one device (nlattn/torch/distributed.py)
    "SyncBatchNorm",
    "convert_sync_batchnorm",
    "ContextParallel",
    "context_parallel",
]
