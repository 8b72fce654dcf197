"""Non-local means: nlattn (torch, Flax, Keras) against scikit-image's ``denoise_nl_means``.

Both algorithms (``fast_mode`` False and True), defaults patch_size=7, patch_distance=11, h=0.1, on
scikit-image's ``camera()`` cropped to n×n (grayscale, float32 for nlattn, float64 for scikit-image,
which computes in float64 whatever it gets) plus Gaussian noise σ = 0.08.

Every measurement runs in its own process (``--child``), with the same thread count for every
library (``--threads``, default 1: scikit-image's Cython loops are single-threaded). Compiled
frameworks (Flax ``nnx.jit``, Keras ``tf.function(jit_compile=True)``) are timed after one warm-up
call; the time is the best of ``--repeats``. The table gives each time and its ratio to
scikit-image with the same fast_mode, measured in the same run.

    python benchmarks/nl_means.py --sizes 256 512 --out benchmarks/nl_means.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

LIBRARIES = ("skimage", "torch", "flax", "keras")


def _image(n):
    import numpy as np
    from skimage import data

    img = data.camera()[:n, :n] / 255.0
    return img + 0.08 * np.random.default_rng(0).standard_normal(img.shape)


def _runner(library, n, fast_mode):
    """A no-argument callable that filters the image once (blocking until done)."""
    import numpy as np

    img = _image(n)
    if library == "skimage":
        from skimage.restoration import denoise_nl_means

        return lambda: denoise_nl_means(img, 7, 11, 0.1, fast_mode=fast_mode)
    x = img[None, :, :, None].astype(np.float32)
    if library == "torch":
        import torch

        from nlattn.torch import NonLocalMeans

        m, xt = NonLocalMeans(fast_mode=fast_mode), torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))

        def run():
            with torch.no_grad():
                m(xt)

        return run
    if library == "flax":
        import jax.numpy as jnp
        from flax import nnx

        from nlattn.jax import NonLocalMeans

        m, xj = NonLocalMeans(fast_mode=fast_mode), jnp.asarray(x)
        f = nnx.jit(lambda m, x: m(x))
        return lambda: f(m, xj).block_until_ready()
    import tensorflow as tf

    from nlattn.tf import NonLocalMeans

    m, xk = NonLocalMeans(fast_mode=fast_mode), tf.constant(x)
    f = tf.function(lambda x: m(x), jit_compile=True)
    return lambda: f(xk).numpy()


def child(library, n, fast_mode, repeats, threads):
    if library == "torch":
        import torch

        torch.set_num_threads(threads)
    run = _runner(library, n, fast_mode)
    if library in ("flax", "keras"):
        run()  # compile
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    print(json.dumps({"time": min(times)}))


def _env(threads):
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        TF_NUM_INTRAOP_THREADS=str(threads),
        TF_NUM_INTEROP_THREADS="1",
        TF_CPP_MIN_LOG_LEVEL="3",
        XLA_FLAGS=f"--xla_cpu_multi_thread_eigen={'true' if threads > 1 else 'false'} "
        f"intra_op_parallelism_threads={threads}",
        KERAS_BACKEND="tensorflow",
    )
    return env


def measure(library, n, fast_mode, repeats, threads):
    cmd = [sys.executable, __file__, "--child", library, str(n), str(int(fast_mode)), str(repeats), str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(threads), timeout=3600)
    if out.returncode != 0:
        return None, out.stderr.strip().splitlines()[-1:] or ["failed"]
    return json.loads(out.stdout.strip().splitlines()[-1])["time"], None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    p.add_argument("--libraries", nargs="+", default=list(LIBRARIES), choices=LIBRARIES)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="write the markdown table here")
    p.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        library, n, fast_mode, repeats, threads = args.child
        return child(library, int(n), bool(int(fast_mode)), int(repeats), int(threads))
    rows, load = [], [os.getloadavg()[0]]  # the machine may be shared: the load goes with the figures
    for n in args.sizes:
        for fast_mode in (False, True):
            base = None
            for library in args.libraries:
                t, err = measure(library, n, fast_mode, args.repeats, args.threads)
                if library == "skimage":
                    base = t
                ratio = f"{base / t:.2f}×" if t and base else "–"
                cell = f"{t:.3f}" if t is not None else f"failed: {err[0][:60]}"
                rows.append(f"| {n}² | {fast_mode} | {library} | {cell} | {ratio} |")
                print(rows[-1], flush=True)
    load.append(os.getloadavg()[0])
    table = "\n".join(
        [
            "| size | fast_mode | library | time (s) | speed-up vs scikit-image |",
            "|---|---|---|---|---|",
            *rows,
        ]
    )
    if args.out:
        with open(args.out, "w") as f:
            f.write(
                "# Non-local means against scikit-image\n\n"
                "Written by `benchmarks/nl_means.py` (see its docstring for the conditions): camera() crop, "
                f"defaults (patch 7, distance 11, h 0.1), {args.threads} thread(s), best of {args.repeats}, "
                "one process per measurement; speed-up = scikit-image time / library time, same fast_mode, "
                f"same run; 1-minute load average {load[0]:.1f} at the start, {load[1]:.1f} at the end.\n\n"
                + table
                + "\n"
            )


if __name__ == "__main__":
    main()
