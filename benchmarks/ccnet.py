"""CrissCrossAttention before and after issue 13's rewrite, in the same run, per framework.

    python benchmarks/ccnet.py [--framework torch keras flax] [--sizes 64 128] [--channels 256]
                               [--recurrence 2] [--rounds 5] [--threads 1]

"old" is the formulation each framework had before (four einsums, torch's on channels-first
tensors, a boolean self-mask, one concatenation), kept here only; "new" is the library's
``CrissCrossAttention`` (``implementation="auto"``). Both sides run with the same weights (random,
γ = 0.5 so that the recurrence matters) on the same input (batch 1, float32) and must agree to
1e-5 (``max_rel_diff``). Keras runs on its TensorFlow backend under ``tf.function(jit_compile=True)``, Flax under
``nnx.jit``. Per framework, size and step (forward: eval mode, no gradients; training step: train
mode, the gradients of ``sum(out)`` with respect to the input and every parameter, all of them
returned so that the compilers keep every one):

- time: old and new interleaved in one process, ``--rounds`` × 2 calls each, the minimum. Both
  CPU time of the process and wall time are printed: on a shared machine CPU time at
  ``--threads 1`` is the figure that depends least on what else runs.
- peak memory: one child process per (framework, implementation, step). torch: VmHWM above the
  resident memory before the call (``bench.PeakRSS``), after a warm-up call. Keras and Flax: the
  bytes of XLA's buffer assignment for the compiled step (their runtimes keep buffers between
  calls, so resident memory does not show a second call's peak).

``--threads`` pins every framework to that many threads: torch ``set_num_threads``, TensorFlow's
intra- and inter-op pools, XLA's Eigen thread pool for jax (``XLA_FLAGS``, set before jax loads), and
the process bound to that many cores (``os.sched_setaffinity``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

FRAMEWORKS = ("torch", "keras", "flax")
IMPLEMENTATIONS = ("old", "new")


# --- the formulations the library had before issue 13 (kept here only) ---------------------------


def torch_old(block, x):
    """torch: four einsums on channels-first tensors (float32 inputs: no half-precision casts)."""
    import torch

    h = x.shape[2]
    itself = torch.eye(h, dtype=torch.bool, device=x.device)[:, None, :]
    for _ in range(block.spec.recurrence):
        q, k, v = block.query_conv(x), block.key_conv(x), block.value_conv(x)
        e_col = torch.einsum("bchw,bcgw->bhwg", q, k).masked_fill(itself, float("-inf"))
        e_row = torch.einsum("bchw,bchv->bhwv", q, k)
        attn = torch.softmax(torch.cat([e_col, e_row], -1), dim=-1)
        out = torch.einsum("bhwg,bcgw->bchw", attn[..., :h], v) + torch.einsum("bhwv,bchv->bchw", attn[..., h:], v)
        x = block.gamma * out + x
    return x


def flax_old(block, x):
    """Flax: the 1×1 convs as ``nnx.Conv`` calls, then four einsums on channels-last tensors, a
    boolean self-mask, one concatenation."""
    import jax
    import jax.numpy as jnp

    h = x.shape[1]
    itself = jnp.eye(h, dtype=bool)[:, None, :]
    gamma = block.param(block.gamma)
    for _ in range(block.spec.recurrence):
        q, k, v = block.query_conv(x), block.key_conv(x), block.value_conv(x)
        e_col = jnp.where(itself, -jnp.inf, jnp.einsum("bhwc,bgwc->bhwg", q, k))
        e_row = jnp.einsum("bhwc,bhvc->bhwv", q, k)
        attn = jax.nn.softmax(jnp.concatenate([e_col, e_row], -1), -1)
        out = jnp.einsum("bhwg,bgwc->bhwc", attn[..., :h], v) + jnp.einsum("bhwv,bhvc->bhwc", attn[..., h:], v)
        x = gamma * out + x
    return x


def keras_old(layer, x):
    """Keras: the same four einsums in ``keras.ops``, γ through the block's ``Scale`` layer."""
    from keras import ops

    h = ops.shape(x)[1]
    rows = ops.arange(h)
    itself = (rows[:, None] == rows[None, :])[:, None, :]
    for _ in range(layer.spec.recurrence):
        q, k, v = layer.query_conv(x), layer.key_conv(x), layer.value_conv(x)
        e_col = ops.where(itself, ops.cast(float("-inf"), q.dtype), ops.einsum("bhwc,bgwc->bhwg", q, k))
        e_row = ops.einsum("bhwc,bhvc->bhwv", q, k)
        attn = ops.softmax(ops.concatenate([e_col, e_row], axis=-1))
        out = ops.einsum("bhwg,bgwc->bhwc", attn[..., :h], v) + ops.einsum("bhwv,bhvc->bhwc", attn[..., h:], v)
        x = layer.gamma(out) + x
    return x


# --- one framework's calls ------------------------------------------------------------------------


def pin_threads(framework, threads):
    """Before the framework is imported (jax reads XLA_FLAGS once). The process is also bound to
    ``threads`` cores: XLA's CPU runtime runs some loops on a pool of its own, whatever the flags."""
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])
    if framework == "flax":
        flags = os.environ.get("XLA_FLAGS", "")
        if "--xla_cpu_multi_thread_eigen" not in flags:  # a child inherits its parent's
            os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_multi_thread_eigen={str(threads > 1).lower()}".strip()
    elif framework == "keras":
        os.environ["KERAS_BACKEND"] = "tensorflow"
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    else:
        import torch

        torch.set_num_threads(threads)


def weights_and_input(size, c, recurrence):
    """Random canonical weights (γ = 0.5) and a channels-first input (1, C, H, W), float32."""
    import nlattn
    from nlattn.specs import random_weights

    schema = nlattn.make_config("CrissCrossAttention", in_channels=c, recurrence=recurrence).schema()
    w = {k: v.astype(np.float32) for k, v in random_weights(schema, np.random.default_rng(0)).items()}
    w["gamma"] = np.full_like(w["gamma"], 0.5)
    return w, np.random.default_rng(1).standard_normal((1, c, size, size), dtype=np.float32)


def build(framework, size, c, recurrence):
    """{(impl, train): call}; call() runs once and returns a list of NumPy arrays: the output
    (forward) or the gradients (training step, the input's first)."""
    import nlattn

    w, x = weights_and_input(size, c, recurrence)
    if framework == "torch":
        import torch

        from nlattn import torch as ntorch

        block = ntorch.CrissCrossAttention(c, recurrence=recurrence)
        nlattn.load_weights(block, w)
        xt = torch.from_numpy(x)
        fwd = {"old": lambda t: torch_old(block, t), "new": block}

        def make(impl, train):
            f = fwd[impl]

            def call():
                if not train:
                    with torch.inference_mode():
                        return [f(xt).numpy()]
                block.zero_grad(set_to_none=True)
                xg = xt.clone().requires_grad_(True)
                f(xg).sum().backward()
                return [xg.grad.numpy()] + [p.grad.numpy() for p in block.parameters()]

            def mode_and_call():
                block.train(train)
                return call()

            return mode_and_call

    elif framework == "keras":
        import tensorflow as tf

        from nlattn import tf as nkeras

        layer = nkeras.CrissCrossAttention(c, recurrence=recurrence)
        nlattn.load_weights(layer, w)
        xt = tf.constant(np.moveaxis(x, 1, -1))
        fwd = {"old": lambda t, training: keras_old(layer, t), "new": lambda t, training: layer(t, training=training)}

        def make(impl, train):
            f = fwd[impl]

            def step(t):
                if not train:
                    return [f(t, False)]
                with tf.GradientTape() as tape:
                    tape.watch(t)
                    loss = tf.reduce_sum(f(t, True))
                return tape.gradient(loss, [t, *layer.trainable_variables])

            compiled = tf.function(step, jit_compile=True)
            return lambda: [g.numpy() for g in compiled(xt)]

    else:
        import jax
        from flax import nnx

        from nlattn import jax as nflax

        block = nflax.CrissCrossAttention(c, recurrence=recurrence, rngs=nnx.Rngs(0))
        nlattn.load_weights(block, w)
        xt = jax.device_put(np.ascontiguousarray(np.moveaxis(x, 1, -1)))
        fwd = {"old": flax_old, "new": lambda mod, t: mod(t)}

        def make(impl, train):
            f = fwd[impl]
            if train:
                grad = nnx.grad(lambda mod, t: f(mod, t).sum(), argnums=(0, 1))
                compiled = nnx.jit(lambda mod, t: (lambda gm, gx: [gx, *jax.tree.leaves(gm)])(*grad(mod, t)))
            else:
                compiled = nnx.jit(lambda mod, t: [f(mod, t)])

            def call():
                block.train() if train else block.eval()
                return [np.asarray(a) for a in jax.block_until_ready(compiled(block, xt))]

            return call

    return {(impl, train): make(impl, train) for impl in IMPLEMENTATIONS for train in (False, True)}


def max_rel_diff(ref, out):
    """max|out − ref| / max(1, max|ref|), both maxima over every array of the step: the key conv's
    bias gradient is zero in exact arithmetic (each pixel's softmax is blind to the q·b term its
    energies share), so on either side it is round-off of the size of the other gradients."""
    scale = max(1.0, *(float(np.max(np.abs(r))) for r in ref))
    return max(float(np.max(np.abs(o - r))) for r, o in zip(ref, out)) / scale


# --- measurements ---------------------------------------------------------------------------------


def child(job):
    """Peak memory of one (framework, implementation, step) in this process (MiB). torch: VmHWM
    above the resident memory before the call. Keras and Flax: the size of XLA's buffer
    assignment for the compiled step (arguments, outputs and temporaries: every allocation of the
    largest module in an ``--xla_dump_to`` dump): their runtimes keep the warm-up call's
    buffers, so a second call's resident memory does not grow."""
    framework = job["framework"]
    dump = None
    if framework != "torch":
        dump = tempfile.mkdtemp(prefix="ccnet-xla-")
        os.environ["XLA_FLAGS"] = f"--xla_dump_to={dump} {os.environ.get('XLA_FLAGS', '')}".strip()
    pin_threads(framework, job["threads"])
    call = build(framework, job["size"], job["channels"], job["recurrence"])[(job["impl"], job["train"])]
    call()  # warm-up (compilation)
    if dump is not None:
        assigned = max(_assigned_bytes(os.path.join(dump, f)) for f in os.listdir(dump))
        shutil.rmtree(dump, ignore_errors=True)
        return {"peak_mib": assigned / 2**20}
    before = bench._status_kib("VmRSS")
    meter = bench.PeakRSS().start()
    y = call()
    peak = meter.stop()
    del y
    return {"peak_mib": (peak - before) / 1024}


def _assigned_bytes(path):
    """The bytes of every allocation in an XLA buffer-assignment dump, 0 for any other file."""
    if not path.endswith("buffer-assignment.txt"):
        return 0
    with open(path) as f:
        return sum(int(n) for n in re.findall(r"^allocation \d+: size (\d+)", f.read(), re.MULTILINE))


def peak_mib(job):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576", OMP_WAIT_POLICY="passive")
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--_one", json.dumps(job)], capture_output=True, text=True, env=env
    )
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1])["peak_mib"] if lines else float("nan")


def timings(calls, train, rounds):
    """{impl: (min CPU seconds, min wall seconds)} over interleaved calls."""
    cpu: dict[str, list[float]] = {k: [] for k in IMPLEMENTATIONS}
    wall: dict[str, list[float]] = {k: [] for k in IMPLEMENTATIONS}
    for _ in range(rounds):
        for impl in IMPLEMENTATIONS:
            for _ in range(2):
                c0, w0 = time.process_time(), time.perf_counter()
                calls[(impl, train)]()
                cpu[impl].append(time.process_time() - c0)
                wall[impl].append(time.perf_counter() - w0)
    return {k: (min(cpu[k]), min(wall[k])) for k in IMPLEMENTATIONS}


def run_framework(framework, args):
    """One process per framework (this one, or a child for the second and later frameworks)."""
    pin_threads(framework, args.threads)
    for size in args.sizes:
        calls = build(framework, size, args.channels, args.recurrence)
        for train in (False, True):
            ref, out = (calls[(impl, train)]() for impl in IMPLEMENTATIONS)  # also the warm-up
            err = max_rel_diff(ref, out)
            assert err <= 1e-5, f"{framework}: old and new disagree: {err:.2e}"
            t = timings(calls, train, args.rounds)
            job = {"framework": framework, "size": size, "channels": args.channels, "recurrence": args.recurrence}
            job.update(train=train, threads=args.threads)
            mem = {impl: peak_mib({**job, "impl": impl}) for impl in IMPLEMENTATIONS}
            (oc, ow), (nc, nw) = t["old"], t["new"]
            print(
                f"| {framework} | {size}×{size} | {'training step' if train else 'forward'} | {1e3 * oc:.1f} | "
                f"{1e3 * nc:.1f} | {nc / oc:.3f} | {1e3 * ow:.1f} | {1e3 * nw:.1f} | {nw / ow:.3f} | "
                f"{mem['old']:.1f} | {mem['new']:.1f} | {mem['new'] / mem['old']:.3f} | {err:.1e} |",
                flush=True,
            )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--framework", nargs="+", choices=FRAMEWORKS, default=list(FRAMEWORKS))
    p.add_argument("--sizes", nargs="+", type=int, default=[64, 128], help="H = W")
    p.add_argument("--channels", type=int, default=256)
    p.add_argument("--recurrence", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="threads of every framework (1: CPU time is robust to load)")
    p.add_argument("--_one", help=argparse.SUPPRESS)
    p.add_argument("--_framework", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._one is not None:
        print(json.dumps(child(json.loads(args._one))), flush=True)
        return
    if args._framework is not None:
        run_framework(args._framework, args)
        return
    print(
        f"CrissCrossAttention old vs new — {bench.machine()}, {args.threads} thread(s), batch 1, float32, "
        f"C = {args.channels}, R = {args.recurrence}, min of {2 * args.rounds}; load average "
        f"{' '.join(f'{a:.1f}' for a in os.getloadavg())}\n"
    )
    print(
        "| framework | size | step | old CPU ms | new CPU ms | CPU new/old | old wall ms | new wall ms | "
        "wall new/old | old peak MiB | new peak MiB | memory new/old | max rel. diff |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    rest = [a for a in (argv if argv is not None else sys.argv[1:])]
    for framework in args.framework:  # one process each: three frameworks' runtimes in one would skew all
        subprocess.run([sys.executable, os.path.abspath(__file__), *rest, "--_framework", framework], check=True)
    print(f"\nload average after: {' '.join(f'{a:.1f}' for a in os.getloadavg())}")


if __name__ == "__main__":
    main()
