"""Data-parallel training of Keras blocks: BatchNorm statistics of the global batch.

Keras has two data-parallel engines, and nlattn blocks run under both:

- tensorflow: ``tf.distribute`` strategies (``MirroredStrategy`` over GPUs, or over logical CPU
  devices). Each replica runs the step on its share of the batch; the optimizer sums the
  replicas' gradients (Keras scales each replica's loss by 1/replicas, so ``model.fit`` takes the
  step of the global batch's mean loss). BatchNorm layers normalise with their replica's own batch
  statistics and each replica updates its own copy of the running statistics, unless the block
  has ``synchronized=True``: then the batch moments are all-reduced over the replicas (Keras'
  ``BatchNormalization(synchronized=True)``) and the step equals the single-device step on the
  whole batch, running statistics included.
- jax: ``keras.distribution.DataParallel`` shards the batch over a device mesh and compiles one
  program over the global batch (XLA's SPMD partitioner inserts the collectives), so BatchNorm
  moments are always those of the global batch: the step equals the single-device step with or
  without ``synchronized`` (nlattn blocks accept ``synchronized=True`` there; Keras' own
  BatchNormalization refuses it on jax, and the blocks do not pass it on).

Keras on torch has no data-parallel engine; ``synchronized=True`` is a ConfigError there.

On CPU devices give ``MirroredStrategy`` ``cross_device_ops=tf.distribute.ReductionToOneDevice()``:
with its default collective all-reduce (TensorFlow 2.21) a step with synchronised BatchNorm hangs,
or fails with "Shape mismatch in the collective instance", because Keras issues the moments'
all-reduces as independent collectives, which the devices launch in different orders.

``synchronized`` is a keyword of the blocks that have BatchNorm (NonLocalBlock1D/2D/3D,
RelationAwareAttention, ExplicitVisualCenter), kept by ``get_config`` and ``.keras`` files;
``convert_sync_batchnorm(model)`` sets it on every such block inside a model::

    # KERAS_BACKEND=tensorflow
    strategy = tf.distribute.MirroredStrategy(cross_device_ops=tf.distribute.ReductionToOneDevice())
    with strategy.scope():
        model = keras.Sequential([keras.Input((32, 32, 64)), nlattn.tf.NonLocalBlock2D(), ...])
        nlattn.tf.convert_sync_batchnorm(model)          # before compile / the first traced step
        model.compile(optimizer="sgd", loss="mse")
    model.fit(x, y, batch_size=64)                       # each replica gets 64 / replicas samples

    # KERAS_BACKEND=jax
    keras.distribution.set_distribution(keras.distribution.DataParallel())   # every device
    model = keras.Sequential([...]); model.compile(...); model.fit(x, y, batch_size=64)

Use ``model.fit`` (or ``strategy.run``) for a distributed step: under a tf.distribute strategy
``train_on_batch`` gives every replica the whole batch. Context parallelism (one huge input split
over devices) is ``nlattn.torch.context_parallel`` and ``nlattn.jax.context_parallel``; Keras has
no counterpart.
"""

from __future__ import annotations

import keras

from ._weights import find_blocks

__all__ = ["convert_sync_batchnorm"]


def convert_sync_batchnorm(model: keras.layers.Layer, synchronized: bool = True) -> keras.layers.Layer:
    """Set ``synchronized`` on every nlattn block with BatchNorm inside ``model`` (a block, a layer
    or a model), in place; returns ``model``. Weights and names are unchanged; eval mode always
    uses the running statistics. Layers outside nlattn blocks are left alone: build those with
    ``keras.layers.BatchNormalization(synchronized=True)``. Call it before the model is compiled or
    its step traced (a traced step keeps the statistics it was traced with).
    """
    for _, block in find_blocks(model):  # built or not: a block's build reads the flag
        if block.has_batch_norm:
            block.synchronized = synchronized
    return model
