"""nlattn blocks as Keras 3 layers (``keras.ops`` only, so any Keras backend works).

Every class takes the keywords of its config (``nlattn.make_config``), keeps it as ``.spec`` and
round-trips through ``get_config`` / ``.keras`` files; ``in_channels`` may be left out and is then
read from the input in ``build``. Layers take ``data_format=None`` (``keras.config.
image_data_format()``, channels_last by default). ``implementation="auto"`` (default) takes a fast
path that never materialises the N×M relation (query-chunked softmax attention with
``query_chunk_size``, q(kᵀv)/M for dot_product, sorted keys for concatenation) unless
``return_attention=True``; ``"naive"`` always materialises it. Batch and spatial sizes may be
unknown (``keras.Input((None, None, C))``; RGA needs its fixed (H, W)). Keras dtype policies are
honoured (``dtype="bfloat16"``, ``"mixed_float16"``, ...): energies, softmax, sorted sums and EVC's
codebook (kept float32) run in float32. ``export_weights`` /
``load_weights`` take a layer, or a model containing layers (names prefixed by the layer path,
e.g. ``"stage2.nl.theta.weight"``; docs/design.md §3). Data-parallel training (``tf.distribute``
on tensorflow, ``keras.distribution`` on jax) with the global batch's BatchNorm statistics:
``synchronized=True`` or ``convert_sync_batchnorm(model)`` (``nlattn.tf.distributed``).

    from nlattn.tf import NonLocalBlock2D, export_weights, load_weights
    layer = NonLocalBlock2D(mode="dot_product")            # (B, H, W, C) in, (B, H, W, C) out
"""

try:
    import keras
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("nlattn.tf needs Keras 3 and a backend: pip install nlattn[tf]") from e
if int(keras.__version__.split(".")[0]) < 3:  # pragma: no cover
    raise ImportError(f"nlattn.tf needs Keras >= 3 (found {keras.__version__}): pip install nlattn[tf]")

from ..specs import CONFIGS
from ._base import Block
from ._weights import blocks, export_weights, load_weights
from .attention import ChannelAttention, CrissCrossAttention, PositionAttention, SelfAttention
from .disentangled import DisentangledNonLocal1D, DisentangledNonLocal2D, DisentangledNonLocal3D
from .distributed import convert_sync_batchnorm
from .evc import ExplicitVisualCenter
from .global_context import GlobalContext
from .nl_means import NonLocalMeans
from .non_local import NonLocalBlock1D, NonLocalBlock2D, NonLocalBlock3D
from .rga import RelationAwareAttention
from .scale import Scale

#: block class name -> Keras class, for every block of the spec
BLOCKS: dict[str, type[Block]] = {name: globals()[name] for name in CONFIGS}

__all__ = [
    "BLOCKS",
    "Block",
    *BLOCKS,
    "blocks",
    "export_weights",
    "load_weights",
    # more than one device (nlattn/tf/distributed.py)
    "convert_sync_batchnorm",
]
