"""One process of tests/test_keras_distributed.py: Keras data-parallel training steps on 2 devices.

Run as ``python keras_distributed_worker.py ROUTE OUT_DIR PROBLEMS_JSON`` with

- ROUTE ``mirrored``: ``KERAS_BACKEND=tensorflow``; ``tf.distribute.MirroredStrategy`` over two
  logical CPU devices (configured here, before TensorFlow starts), all-reduces by
  ``ReductionToOneDevice`` (the default collective all-reduce hangs on CPU devices, see
  nlattn/tf/distributed.py);
- ROUTE ``data_parallel``: ``KERAS_BACKEND=jax`` and ``XLA_FLAGS=--xla_force_host_platform_device_count=2``;
  ``keras.distribution.DataParallel`` over the two fake CPU devices.

For each problem (block, config, channels-first shape, ``sync``, ``dtype``, ``fit``) it writes
``OUT_DIR/<name>.npz`` holding, for the distributed route (prefix ``dist:``) and for one device on
the whole batch (``whole:``) and, without ``sync`` on tensorflow, on each half of it alone
(``half0:``, ``half1:``):

- ``out``, ``dx``, ``grad:<canonical name>``, ``stat:<canonical name>``, ``devices``: one training
  step of ``sum(out · cotangent)`` by the backend's autodiff (``GradientTape`` inside
  ``strategy.run``, replica r on rows [r·B/2, (r+1)·B/2); ``jax.value_and_grad`` of
  ``stateless_call`` jitted over the batch laid out by the distribution). Distributed parameter
  gradients are the replicas' sum (``strategy.reduce``, as the optimizer's all-reduce sums them);
  jax's are the global program's. Running statistics are replica 0's copy, and every replica's
  as ``stat:<name>:<replica>`` (MirroredStrategy keeps one per device); ``devices``: how many
  devices the output lies on;
- with ``fit``: ``fit:<canonical name>``, ``before − after`` of each trainable weight, and
  ``fit:stat:<name>``, after one step of ``model.fit`` (SGD(learning_rate=1), loss the batch mean
  of the per-sample ``sum(out · cotangent)``): the Keras trainer's own step (batch split, loss
  scaling and gradient all-reduce by the engine).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

ROUTE = sys.argv[1] if __name__ == "__main__" else None
DEVICES = 2

if ROUTE == "mirrored":  # two logical CPU devices: before anything initialises TensorFlow
    import tensorflow as tf

    _cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(_cpu, [tf.config.LogicalDeviceConfiguration()] * DEVICES)

import keras  # noqa: E402
from keras import ops  # noqa: E402

import nlattn.tf as nk  # noqa: E402
from nlattn.specs import random_weights  # noqa: E402
from nlattn.tf._weights import ACCESS  # noqa: E402


def problem(case: dict):
    """The block (weights loaded, so built), the whole batch and its cotangent, channels_last."""
    cls = nk.BLOCKS[case["block"]]
    sync = {"synchronized": case["sync"]} if cls.has_batch_norm else {}
    block = cls(**case["config"], dtype=case["dtype"], **sync)
    rng = np.random.default_rng(0)
    nk.load_weights(block, random_weights(block.spec.schema(), rng))
    x = np.moveaxis(rng.normal(size=case["shape"]), 1, -1).astype(case["dtype"])
    cotangent = np.moveaxis(rng.normal(size=case["shape"]), 1, -1).astype(case["dtype"])
    return block, x, cotangent


def names(block) -> dict[int, str]:
    """id(variable) -> canonical name."""
    return {id(v): n for n, v in ACCESS.variables(block).items()}


def statistics(block) -> dict:
    return {n: v for n, v in ACCESS.variables(block).items() if n.endswith(("running_mean", "running_var"))}


def per_sample_product(y_true, y_pred):
    """sum(out · cotangent) per sample; Keras takes its mean over the batch."""
    return ops.sum(y_true * y_pred, axis=tuple(range(1, len(y_pred.shape))))


def fit_step(block, x, cotangent) -> dict:
    """One ``model.fit`` step of SGD(1) on the whole batch, ``block`` in a Sequential model:
    before − after of each trainable weight, and the statistics after."""
    model = keras.Sequential([keras.Input(x.shape[1:], dtype=str(x.dtype)), block])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=1.0), loss=per_sample_product)
    named = ACCESS.variables(block)
    before = {n: keras.ops.convert_to_numpy(v) for n, v in named.items()}
    # fit, not train_on_batch: under a tf.distribute strategy train_on_batch hands every replica
    # the whole batch, fit splits it
    model.fit(x, cotangent, batch_size=x.shape[0], epochs=1, shuffle=False, verbose=0)
    after = {n: keras.ops.convert_to_numpy(v) for n, v in named.items()}
    result = {f"fit:{n}": before[n] - after[n] for n, v in named.items() if v.trainable}
    result.update({f"fit:stat:{n}": after[n] for n in statistics(block)})
    return result


def restart(block) -> None:
    """The block's weights and statistics as ``problem`` made them (before a step moved them)."""
    nk.load_weights(block, random_weights(block.spec.schema(), np.random.default_rng(0)))


# ---------------------------------------------------------------------------------------------
# tensorflow: MirroredStrategy
# ---------------------------------------------------------------------------------------------


def tf_tape_step(strategy, block, x, cotangent) -> dict:
    """One GradientTape step in ``strategy.run``, replica r on rows [r·B/R, (r+1)·B/R)."""
    import tensorflow as tf

    replicas = strategy.num_replicas_in_sync
    share = x.shape[0] // replicas
    trainable = list(block.trainable_variables)
    name = names(block)

    def split(a):
        def rows(ctx):
            replica = ctx.replica_id_in_sync_group
            return tf.constant(a[replica * share : (replica + 1) * share])

        return strategy.experimental_distribute_values_from_function(rows)

    @tf.function
    def step(xs, cs):
        def replica_step(x, c):
            with tf.GradientTape() as tape:
                tape.watch(x)
                out = block(x, training=True)
                loss = tf.reduce_sum(out * c)
            dx, *grads = tape.gradient(loss, [x, *trainable])
            return out, dx, grads

        return strategy.run(replica_step, args=(xs, cs))

    out, dx, grads = step(split(x), split(cotangent))
    local = strategy.experimental_local_results
    result = {
        "out": np.concatenate([t.numpy() for t in local(out)]),
        "dx": np.concatenate([t.numpy() for t in local(dx)]),
        "devices": len(local(out)),
    }
    for v, g in zip(trainable, grads):
        result[f"grad:{name[id(v)]}"] = strategy.reduce(tf.distribute.ReduceOp.SUM, g, axis=None).numpy()
    stats = statistics(block)
    # read in replica context: each replica's own copy of the statistics
    copies = strategy.run(tf.function(lambda: [tf.identity(v.value) for v in stats.values()]))
    for i, n in enumerate(stats):
        per_replica = [t.numpy() for t in local(copies[i])]
        result[f"stat:{n}"] = per_replica[0]
        result.update({f"stat:{n}:{r}": s for r, s in enumerate(per_replica)})
    return result


def mirrored(case: dict) -> dict:
    import tensorflow as tf

    strategy = tf.distribute.MirroredStrategy(
        [f"/cpu:{i}" for i in range(DEVICES)], cross_device_ops=tf.distribute.ReductionToOneDevice()
    )
    assert strategy.num_replicas_in_sync == DEVICES
    with strategy.scope():
        block, x, cotangent = problem(case)
        results = {f"dist:{k}": v for k, v in tf_tape_step(strategy, block, x, cotangent).items()}
        if case.get("fit"):
            restart(block)
            results.update({f"dist:{k}": v for k, v in fit_step(block, x, cotangent).items()})
    one = tf.distribute.get_strategy()  # the default strategy: one device
    block, _, _ = problem(case)
    results.update({f"whole:{k}": v for k, v in tf_tape_step(one, block, x, cotangent).items()})
    if case.get("fit"):
        restart(block)
        results.update({f"whole:{k}": v for k, v in fit_step(block, x, cotangent).items()})
    if not case["sync"]:  # each half of the batch alone
        share = x.shape[0] // DEVICES
        for r in range(DEVICES):
            restart(block)
            rows = slice(r * share, (r + 1) * share)
            results.update({f"half{r}:{k}": v for k, v in tf_tape_step(one, block, x[rows], cotangent[rows]).items()})
    return results


# ---------------------------------------------------------------------------------------------
# jax: keras.distribution.DataParallel
# ---------------------------------------------------------------------------------------------


def jax_step(block, x, cotangent) -> dict:
    """value_and_grad of the block's ``stateless_call`` (training), jitted; x may be sharded."""
    import jax

    trainable = [v.value for v in block.trainable_variables]
    non_trainable = [v.value for v in block.non_trainable_variables]

    def loss(trainable, x):
        out, state = block.stateless_call(trainable, non_trainable, x, training=True)
        return jax.numpy.sum(out * cotangent), (out, state)

    (_, (out, state)), (grads, dx) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(trainable, x)
    name = names(block)
    result = {"out": np.asarray(out), "dx": np.asarray(dx), "devices": len(out.sharding.device_set)}
    result.update({f"grad:{name[id(v)]}": np.asarray(g) for v, g in zip(block.trainable_variables, grads)})
    stats = {id(v) for v in statistics(block).values()}
    result.update(
        {f"stat:{name[id(v)]}": np.asarray(s) for v, s in zip(block.non_trainable_variables, state) if id(v) in stats}
    )
    return result


def data_parallel(case: dict) -> dict:
    """The stateless step leaves the block's variables as they were: the fit step reuses it."""
    import jax

    assert len(jax.devices()) == DEVICES, jax.devices()
    distribution = keras.distribution.DataParallel(devices=jax.devices())
    keras.distribution.set_distribution(distribution)
    try:
        block, x, cotangent = problem(case)
        layout = distribution.get_data_layout(x.shape)
        xs, cs = (keras.distribution.distribute_tensor(a, layout) for a in (x, cotangent))
        results = {f"dist:{k}": v for k, v in jax_step(block, xs, cs).items()}
        if case.get("fit"):
            results.update({f"dist:{k}": v for k, v in fit_step(block, x, cotangent).items()})
    finally:
        keras.distribution.set_distribution(None)
    block, _, _ = problem(case)
    results.update({f"whole:{k}": v for k, v in jax_step(block, x, cotangent).items()})
    if case.get("fit"):
        results.update({f"whole:{k}": v for k, v in fit_step(block, x, cotangent).items()})
    return results


def main(route: str, out_dir: str, problems: dict) -> None:
    expected = {"mirrored": "tensorflow", "data_parallel": "jax"}[route]
    assert keras.backend.backend() == expected, (route, keras.backend.backend())
    run = mirrored if route == "mirrored" else data_parallel
    # fit's data adapter casts float arrays, and a loss computes, in floatx: the problems' dtype
    (dtype,) = {case["dtype"] for case in problems.values()}
    keras.config.set_floatx(dtype)
    for name, case in problems.items():
        np.savez(os.path.join(out_dir, f"{name}.npz"), **run(case))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))
