"""Flax NNX blocks on more than one device: data parallelism and context parallelism, with JAX's
own engines (``jax.sharding.Mesh``, ``NamedSharding``, ``shard_map`` and its collectives).

Data parallel, two routes:

- ``nnx.jit`` over a batch sharded along a mesh axis (``NamedSharding(mesh, P("data"))``), the
  model replicated. XLA's SPMD partitioner compiles one program over the global batch and inserts
  the collectives itself, so BatchNorm statistics are those of the global batch with nothing to
  set: a step equals the single-device step on the whole batch (outputs, gradients, running
  statistics). Keep ``bn_axis_name=None`` there (no named axis is bound under ``jit``).
- ``shard_map`` (``nnx.shard_map`` / ``jax.shard_map``) with the batch split along a mesh axis:
  the step runs per device on its rows. Blocks built with ``bn_axis_name="data"`` (a block
  keyword of the blocks with BatchNorm, handed to ``nnx.BatchNorm``'s ``axis_name``), or converted
  by ``convert_sync_batchnorm(model, "data")``, average their batch moments over that axis
  (``lax.pmean``): outputs, input gradients and running statistics equal the single-device step's
  on the whole batch, and the gradients of the replicated parameters taken inside ``shard_map``
  come out summed over the devices (JAX transposes the implicit broadcast of a replicated value
  into a sum), i.e. those of the summed loss. Without an axis name each device normalises with,
  and keeps, its own rows' statistics (as plain BatchNorm under torch's DDP); they then differ
  between devices, so ``shard_map`` refuses to return a training-mode model under a replicated
  ``P()`` spec (JAX's replication check): return the statistics per device (``P("data")``)::

      mesh = jax.sharding.Mesh(jax.devices(), ("data",))
      block = nlattn.jax.NonLocalBlock2D(64, bn_axis_name="data")

      @nnx.jit
      @nnx.shard_map(mesh=mesh, in_specs=(P(), P("data")), out_specs=P())
      def step(block, x):                      # x: this device's rows
          return nnx.grad(lambda b: loss(b(x)))(block)   # summed over the devices

Context parallelism (one huge input, its query positions split over the devices of a mesh axis):
``context_parallel(block, mesh, axis)``.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ._base import Block
from ._weights import blocks

__all__ = ["ContextParallel", "context_parallel", "convert_sync_batchnorm"]


def batch_norms(module: nnx.Module) -> list[nnx.BatchNorm]:
    """Every ``nnx.BatchNorm`` inside ``module``, in graph order."""
    return [node for _, node in nnx.iter_graph(module) if isinstance(node, nnx.BatchNorm)]


def convert_sync_batchnorm(model: nnx.Module, axis_name: Any = "data") -> nnx.Module:
    """Give every BatchNorm inside the nlattn blocks of ``model`` (RGA's and EVC's included) the
    ``axis_name`` over which ``shard_map`` averages its training statistics, in place (None: each
    device's own again); returns ``model``. The same as building the blocks with
    ``bn_axis_name=axis_name``; weights and names are unchanged, eval mode uses the running
    statistics as before. Layers outside nlattn blocks are left alone (give those ``nnx.BatchNorm``
    an ``axis_name`` yourself). Only for code run under ``shard_map`` over that axis: under
    ``nnx.jit`` with a sharded batch the statistics are the global batch's without it.
    """
    for _, block in blocks(model):
        if block.has_batch_norm:
            block.bn_axis_name = axis_name
            for bn in batch_norms(block):
                bn.axis_name = axis_name
    return model


def context_parallel(block: Block, mesh: Mesh, axis: str) -> ContextParallel:
    """``block`` run on one huge input whose query positions are split over the devices of the
    mesh axis ``axis``, along the first spatial axis (H of an image, T of a video, L of a sequence).

    ``ContextParallel.shard(x)`` places the whole channels-last input ``x`` (B, S0, ..., C) so that
    device r holds rows [r·S0/P, (r+1)·S0/P); calling the wrapper runs the block under
    ``jax.shard_map``: each device embeds its rows, all-gathers the keys and values (pooled
    first, where the block sub-samples) along the positions, attends with its N/P queries and
    applies the residual branch, BatchNorm statistics averaged over ``axis``. A device holds its
    N/P queries' activations and one copy of the keys/values, never the N×M relation (on the fast
    path). It returns the whole output, sharded as the input; outputs, gradients (JAX transposes
    the all-gather into a reduce-scatter) and running statistics equal the single-device block's.
    The batch is replicated over the mesh's other axes. For NonLocalBlock1D/2D/3D (every mode),
    SelfAttention and PositionAttention::

        mesh = jax.sharding.Mesh(jax.devices(), ("context",))
        cp = nlattn.jax.context_parallel(nlattn.jax.NonLocalBlock3D(256), mesh, "context")
        y = nnx.jit(lambda cp, x: cp(x))(cp, cp.shard(video))   # video (B, T, H, W, C): T split
    """
    return ContextParallel(block, mesh, axis)


class ContextParallel(nnx.Module):
    """See ``context_parallel``. ``block`` is held as ``self.block`` (its state is the wrapper's
    under ``block.``) and left unchanged apart from its running statistics: the BatchNorm axis is
    set on the copy that runs inside ``shard_map`` only, so the block still runs alone too."""

    def __init__(self, block: Block, mesh: Mesh, axis: str):
        if not all(hasattr(block, m) for m in ("embed", "aggregate", "relation", "residual")):
            raise TypeError(
                f"context_parallel: {type(block).__name__} has no query/key split; it supports the "
                "non-local blocks, SelfAttention and PositionAttention"
            )
        if axis not in mesh.axis_names:
            raise ValueError(f"context_parallel: the mesh has no axis {axis!r} (its axes: {mesh.axis_names})")
        self.block = block
        self.mesh = mesh
        self.axis = axis

    @property
    def size(self) -> int:
        """P, the number of devices along ``axis``."""
        return self.mesh.shape[self.axis]

    @property
    def sharding(self) -> NamedSharding:
        """The inputs' and outputs' sharding: the first spatial axis split along ``axis``."""
        return NamedSharding(self.mesh, P(None, self.axis))

    def _window(self) -> int:
        """How many rows of the first spatial axis one pooled key covers (1 without pooling)."""
        spec = self.block.spec
        return spec.pool_window[0] if getattr(spec, "sub_sample", False) else 1

    def check(self, shape) -> None:
        """A ValueError naming the block and the sizes unless the first spatial size of an input of
        ``shape`` (channels-last) splits into P equal shards of whole pooling windows."""
        size, world, window = shape[1], self.size, self._window()
        if size % (world * window):
            raise ValueError(
                f"{self.block.spec.block}: context parallelism splits the first spatial axis into "
                f"{world} equal shards{f' of whole {window}-row pooling windows' if window > 1 else ''}; "
                f"{size} rows do not split so (use a size divisible by {world * window})"
            )

    def shard(self, x) -> jax.Array:
        """The whole input (B, S0, ..., C) placed with rows [r·S0/P, (r+1)·S0/P) on device r."""
        self.check(x.shape)
        return jax.device_put(x, self.sharding)

    def __call__(self, x) -> jax.Array:
        """The whole input (B, S0, ..., C), best placed by ``shard`` -> the whole output, sharded
        as the input."""
        block = self.block
        x = block.check_input(x)
        self.check(x.shape)
        graphdef, state = nnx.split(block)
        run = jax.shard_map(
            functools.partial(_local, graphdef, self.axis),
            mesh=self.mesh,
            in_specs=(P(), P(None, self.axis)),
            out_specs=(P(None, self.axis), P()),
        )
        y, stats = run(state, x)
        nnx.update(block, stats)
        return y


def _local(graphdef, axis, state, x):
    """One device: its rows x (B, S0/P, ..., C) -> its rows of the output, and the block's
    running statistics (the same on every device: the moments are averaged over ``axis``)."""
    block = nnx.merge(graphdef, state)
    for bn in batch_norms(block):
        bn.axis_name = axis
    q, k, v = block.embed(x)  # (B, h, positions, c), this device's positions in row-major order
    k, v = (jax.lax.all_gather(t, axis, axis=2, tiled=True) for t in (k, v))  # every device's, in order
    y = block.aggregate(q, k, v) if block.fast() else block.relation(q, k) @ v
    return block.residual(x, y), nnx.state(block, nnx.BatchStat)
