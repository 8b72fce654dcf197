"""nlattn.tf: every nlattn block as a Keras 3 layer (``keras.ops`` only, so any Keras backend works).

Layers take ``data_format=None`` (→ ``keras.config.image_data_format()``, channels_last by default);
``in_channels`` may be left out and is then read from the input in ``build``. Every layer keeps its
validated config as ``layer.spec`` and round-trips through ``get_config`` / ``.keras`` files.
``implementation="auto"`` (default) takes a fast path that never materialises the N×M relation
(query-chunked softmax attention with ``query_chunk_size``, θ(φᵀg)/M for dot_product, sorted keys
for concatenation) unless ``return_attention=True``; ``"naive"`` always materialises it.
``export_weights`` / ``load_weights`` take a layer, or a model containing layers (names prefixed
by the layer path, e.g. ``"stage2.nl.theta.weight"``).

    from nlattn.tf import NonLocalBlock2D, export_weights, load_weights
    layer = NonLocalBlock2D(mode="dot_product")            # (B, H, W, C) in, (B, H, W, C) out
"""

try:
    import keras
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("nlattn.tf needs Keras 3 and a backend: pip install nlattn[tf]") from e
if int(keras.__version__.split(".")[0]) < 3:  # pragma: no cover
    raise ImportError(f"nlattn.tf needs Keras >= 3 (found {keras.__version__}): pip install nlattn[tf]")

from ._weights import export_weights, load_weights
from .attention import ChannelAttention, CrissCrossAttention, PositionAttention, SelfAttention
from .evc import ExplicitVisualCenter
from .nl_means import NonLocalMeans
from .non_local import NonLocalBlock1D, NonLocalBlock2D, NonLocalBlock3D
from .rga import RelationAwareAttention
from .scale import Scale

__all__ = ["ChannelAttention", "CrissCrossAttention", "ExplicitVisualCenter", "NonLocalBlock1D",
           "NonLocalBlock2D", "NonLocalBlock3D", "NonLocalMeans", "PositionAttention",
           "RelationAwareAttention", "Scale", "SelfAttention", "export_weights", "load_weights"]
