"""Speed and peak memory of nlattn's fast paths against the naive materialising path (DESIGN §6).

    python benchmarks/bench.py [--framework torch keras flax] [--block sagan pam ...]
                               [--sizes 16 32 64 128] [--channels 256] [--repeat 3] [--quick] [--out FILE]

Every block is built twice, ``implementation="naive"`` (materialises the N×N relation) and
``implementation="auto"`` (the fast path), batch 1, eval mode, no gradients, float32. Each
measurement runs in its own subprocess so that the peak memory it reports is its own: the child
builds the block, runs it once (warm-up; jit compilation for Keras and Flax), then times
``--repeat`` calls (median) and reads the peak resident memory above what was resident before the
first timed call. The fast child also runs the naive path once with the same (random) weights and
reports max|fast − naive| / max(1, max|naive|) (up to 64×64). A failed measurement is a table
cell, never a crash.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time

import numpy as np

#: benchmark name -> (nlattn class, constructor keywords besides in_channels)
BLOCKS = {
    "embedded_gaussian": ("NonLocalBlock2D", {"mode": "embedded_gaussian"}),
    "gaussian": ("NonLocalBlock2D", {"mode": "gaussian"}),
    "dot_product": ("NonLocalBlock2D", {"mode": "dot_product"}),
    # without sub-sampling M = N: the N×N relation of the N = 16384 at 128×128
    "dot_product_full": ("NonLocalBlock2D", {"mode": "dot_product", "sub_sample": False}),
    "concatenation": ("NonLocalBlock2D", {"mode": "concatenation"}),
    "sagan": ("SelfAttention", {}),
    "pam": ("PositionAttention", {}),
    "cca": ("CrissCrossAttention", {}),
    # a video clip, T×H×W (the sweep's --video shape); not in the default block list
    "embedded_gaussian_3d": ("NonLocalBlock3D", {"mode": "embedded_gaussian"}),
}
#: blocks of the default table (the 3D block needs a T×H×W shape, the sweep gives it one)
TABLE_BLOCKS = [b for b in BLOCKS if not b.endswith("_3d")]
#: benchmark framework name -> (modules that must be importable, nlattn subpackage)
FRAMEWORKS = {
    "torch": (("torch",), "torch"),
    "keras": (("tensorflow", "keras"), "tf"),
    "flax": (("jax", "flax"), "jax"),
}
MATMUL_N = 2048
CHILD_TIMEOUT_S = 1800
CHECK_MAX_SIZE = 64


# --- FLOPs of the fast path: dominant terms only (multiply-add = 2 FLOPs; softmax, pooling, BN,
# --- sorting and residual adds are left out). N = H·W queries; non-local: M = N/4 keys (2×2
# --- sub-sampling), Ci = C/2; SAGAN/PAM/CCNet: Cq = C/8.


def _non_local_sizes(h, w, c):
    return h * w, (h // 2) * (w // 2), c // 2


def flops_embedded_gaussian(h, w, c):
    """θ, φ, g 1×1 convs at full resolution (conv then pool) 3·2NCCi, W 2NCiC; θᵀφ 2NMCi; A·g 2NMCi."""
    n, m, ci = _non_local_sizes(h, w, c)
    return 8 * n * c * ci + 4 * n * m * ci


def flops_gaussian(h, w, c):
    """No θ/φ convs: g and W 4NCCi; xᵀ·pool(x) over all C channels 2NMC; A·g 2NMCi."""
    n, m, ci = _non_local_sizes(h, w, c)
    return 4 * n * c * ci + 2 * n * m * c + 2 * n * m * ci


def flops_dot_product(h, w, c):
    """Re-associated θ(φᵀg)/M: convs 8NCCi; φᵀg 2MCi²; θ·(φᵀg) 2NCi² (no N×M term at all)."""
    n, m, ci = _non_local_sizes(h, w, c)
    return 8 * n * c * ci + 2 * m * ci * ci + 2 * n * ci * ci


def flops_dot_product_full(h, w, c):
    """dot_product with M = N: convs 8NCCi; φᵀg 2NCi²; θ·(φᵀg) 2NCi²."""
    n, ci = h * w, c // 2
    return 8 * n * c * ci + 4 * n * ci * ci


def flops_concatenation(h, w, c):
    """Sorted prefix sums: convs 8NCCi; per-query/per-key projections 2(N+M)Ci; prefix sums of g
    and k·g 3MCi; y = a·G + KG 2NCi (the O(M log M) sort does no arithmetic)."""
    n, m, ci = _non_local_sizes(h, w, c)
    return 8 * n * c * ci + 2 * (n + m) * ci + 3 * m * ci + 2 * n * ci


def flops_sagan(h, w, c):
    """Q, K (C -> Cq) and V (C -> C) 1×1 convs 2NC(2Cq + C); QKᵀ 2N²Cq; A·V 2N²C (PAM: the same)."""
    n, cq = h * w, c // 8
    return 2 * n * c * (2 * cq + c) + 2 * n * n * cq + 2 * n * n * c


def flops_cca(h, w, c):
    """Convs as SAGAN; each pixel meets its H + W criss-cross keys: energies 2N(H+W)Cq, A·V 2N(H+W)C."""
    n, cq = h * w, c // 8
    return 2 * n * c * (2 * cq + c) + 2 * n * (h + w) * (cq + c)


FLOPS = {
    "embedded_gaussian": flops_embedded_gaussian,
    "gaussian": flops_gaussian,
    "dot_product": flops_dot_product,
    "dot_product_full": flops_dot_product_full,
    "concatenation": flops_concatenation,
    "sagan": flops_sagan,
    "pam": flops_sagan,
    "cca": flops_cca,
}


def recomputed_flops(block, h, w, c):
    """Softmax blocks: the energies' FLOPs 2NM·c (c-wide queries and keys), which the fast path's
    recomputing backward does once more in a training step; 0 for the others."""
    if block in ("sagan", "pam"):
        return 2 * (h * w) ** 2 * (c // 8)
    if block in ("embedded_gaussian", "gaussian"):
        n, m, ci = _non_local_sizes(h, w, c)
        return 2 * n * m * (c if block == "gaussian" else ci)
    return 0


def path_flops(block, h, w, c, train=False):
    """FLOPs of the fast path: the forward's, or a training step's — every product's backward is
    two products of its size (3× the forward), plus the softmax blocks' recomputed energies."""
    forward = FLOPS[block](h, w, c)
    return 3 * forward + recomputed_flops(block, h, w, c) if train else forward


def naive_skip_reason(block, size, c):
    """Why the naive side is not run, or None. The naive concatenation pairs every query with every
    key: its N·M·2Ci float32 pair tensor is 4 GiB at 64×64 and 64 GiB at 128×128 (C = 256)."""
    if block != "concatenation":
        return None
    n, m, ci = _non_local_sizes(size, size, c)
    pair_bytes = n * m * 2 * ci * 4
    if pair_bytes > os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2:
        return "naive skipped: N·M·2Ci pair tensor too large"
    return None


# --- peak resident memory ------------------------------------------------------------------------


def _status_kib(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


class PeakRSS:
    """Peak resident set size (KiB) between ``start()`` and ``stop()``.

    Writing 5 to /proc/self/clear_refs resets the kernel's high-water mark VmHWM to the current RSS;
    where that is not allowed (or does not work) a thread samples VmRSS every millisecond instead,
    which can miss a peak shorter than that.
    """

    def start(self):
        self._thread = None
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            ok = _status_kib("VmHWM") <= _status_kib("VmRSS") + 1024
        except OSError:
            ok = False
        if not ok:
            self._peak, self._stop = _status_kib("VmRSS"), threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.001):
            self._peak = max(self._peak, _status_kib("VmRSS"))

    def stop(self):
        if self._thread is None:
            return _status_kib("VmHWM")
        self._stop.set()
        self._thread.join()
        return max(self._peak, _status_kib("VmRSS"))


# --- one measurement (runs in a child process) ---------------------------------------------------


def _build(framework, block, c, size, impl, w, train=False):
    """(call, to_numpy): call() runs the block once on a fixed input and returns when it is done.
    ``size``: H = W, or the spatial shape as a tuple (T, H, W for a 3D block).

    ``train``: a training step instead, train mode (batch statistics) and the gradients of
    sum(output) with respect to the input and every parameter; call() returns the input's.
    """
    import nlattn

    cls, kw = BLOCKS[block]
    spatial = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    x = np.random.default_rng(1).standard_normal((1, c, *spatial), dtype=np.float32)
    if framework == "torch":
        import torch

        from nlattn import torch as ntorch

        model = getattr(ntorch, cls)(c, **kw, implementation=impl).train(train)
        nlattn.load_weights(model, w)
        xt = torch.from_numpy(x)

        def call():
            if not train:
                with torch.inference_mode():
                    return model(xt)
            model.zero_grad(set_to_none=True)
            xg = xt.clone().requires_grad_(True)
            model(xg).sum().backward()
            return xg.grad

        return call, lambda y: y.numpy()
    x = np.ascontiguousarray(np.moveaxis(x, 1, -1))  # Keras and Flax blocks are channels-last here
    if framework == "keras":
        import tensorflow as tf

        from nlattn import tf as nkeras

        model = getattr(nkeras, cls)(c, **kw, implementation=impl)
        nlattn.load_weights(model, w)
        xt = tf.constant(x)

        def step(t):
            if not train:
                return model(t, training=False)
            with tf.GradientTape() as tape:
                tape.watch(t)
                loss = tf.reduce_sum(model(t, training=True))
            # every gradient returned: XLA would drop the parameter gradients nobody reads
            return tape.gradient(loss, [t, *model.trainable_variables])

        fn = tf.function(step, jit_compile=True)
        # eager TF returns after the call has run; the input's gradient is the one compared
        return (lambda: fn(xt)), lambda y: (y[0] if train else y).numpy()
    import jax
    from flax import nnx

    from nlattn import jax as nflax

    model = getattr(nflax, cls)(c, **kw, implementation=impl, rngs=nnx.Rngs(0))
    model.train() if train else model.eval()
    nlattn.load_weights(model, w)
    if train:
        # every gradient returned: XLA would drop the parameter gradients nobody reads
        fn = nnx.jit(nnx.grad(lambda mod, t: mod(t).sum(), argnums=(0, 1)))
    else:
        fn = nnx.jit(lambda mod, t: mod(t))
    xt = jax.device_put(x)  # a device array, not a host copy per call
    return (lambda: jax.block_until_ready(fn(model, xt))), lambda y: np.asarray(y[1] if train else y)


def block_weights(block, c):
    """Random float32 weights of a benchmark block (seed 0): the identity-at-init blocks would
    make the fast/naive comparison trivial."""
    import nlattn
    from nlattn.specs import random_weights

    cls, kw = BLOCKS[block]
    weights = random_weights(nlattn.make_config(cls, in_channels=c, **kw).schema(), np.random.default_rng(0))
    return {k: v.astype(np.float32) for k, v in weights.items()}


def measure(job):
    """One measurement: {"ms", "peak_mib"} (+ "err" vs naive for the fast side) or {"error"}."""
    framework, repeat = job["framework"], job["repeat"]
    if job["block"] == "matmul":
        return _measure_matmul(framework, repeat)
    c, size = job["channels"], job["size"]
    weights = block_weights(job["block"], c)
    train = job.get("train", False)
    call, to_numpy = _build(framework, job["block"], c, size, job["impl"], weights, train)
    y = call()  # warm-up / compilation
    del y
    gc.collect()
    before = _status_kib("VmRSS")
    meter, times, y = PeakRSS().start(), [], None
    for _ in range(repeat):
        y = None  # the last output must not be alive during the call
        t0 = time.perf_counter()
        y = call()
        times.append(time.perf_counter() - t0)
    peak = meter.stop()
    result = {"ms": 1e3 * statistics.median(times), "peak_mib": (peak - before) / 1024}
    if job.get("check"):
        try:
            out = to_numpy(y)
            naive_call, _ = _build(framework, job["block"], c, size, "naive", weights, train)
            ref = to_numpy(naive_call())
            result["err"] = float(np.max(np.abs(out - ref)) / max(1.0, float(np.max(np.abs(ref)))))
        except Exception as e:  # keep the fast measurement
            result["check_error"] = f"{type(e).__name__}: {e}"
    return result


def _measure_matmul(framework, repeat):
    """(2048×2048) @ (2048×2048) float32, compiled where the blocks are: GFLOP/s."""
    a = np.random.default_rng(0).standard_normal((MATMUL_N, MATMUL_N), dtype=np.float32)
    if framework == "torch":
        import torch

        at = torch.from_numpy(a)
        call = lambda: torch.mm(at, at)  # noqa: E731
    elif framework == "keras":
        import tensorflow as tf

        at, fn = tf.constant(a), tf.function(lambda t: tf.matmul(t, t), jit_compile=True)
        call = lambda: fn(at)  # noqa: E731
    else:
        import jax

        at, fn = jax.device_put(a), jax.jit(lambda t: t @ t)
        call = lambda: fn(at).block_until_ready()  # noqa: E731
    call()
    times = []
    for _ in range(max(repeat, 7)):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    # the best of several: the peak is what the machine can do, a slow outlier is something else
    return {"gflops": 2 * MATMUL_N**3 / min(times) / 1e9}


def child_main(job_json):
    try:
        result = measure(json.loads(job_json))
    except Exception as e:  # reported in the table, not a crash
        result = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(result), flush=True)


# --- the parent: run every measurement in its own process, print the tables ----------------------


def run_child(job):
    env = dict(
        os.environ,
        KERAS_BACKEND="tensorflow",
        TF_CPP_MIN_LOG_LEVEL="3",
        # glibc keeps freed blocks below its (adaptive, up to 32 MiB) mmap threshold in its
        # heap, so a warm-up's buffers would be reused unseen by RSS: map every block ≥ 1 MiB
        MALLOC_MMAP_THRESHOLD_="1048576",
        # on a loaded machine spinning OpenMP workers (torch) that lose their core stall every
        # parallel region: measured 10-240 ms instead of 3 ms for one 32×32 block call
        OMP_WAIT_POLICY="passive",
    )
    try:
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--_one", json.dumps(job)],
            capture_output=True,
            text=True,
            timeout=job.get("timeout", CHILD_TIMEOUT_S),
            env=env,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {job.get('timeout', CHILD_TIMEOUT_S)} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if lines:
        return json.loads(lines[-1])
    if proc.returncode < 0:
        hint = " (out of memory?)" if proc.returncode == -9 else ""
        return {"error": f"killed by signal {-proc.returncode}{hint}"}
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"exit {proc.returncode}: {tail}"}


class Progress:
    """One-line progress bar on stderr, one step per measurement."""

    def __init__(self, total):
        self.total, self.done = total, 0

    def step(self, label):
        self.done += 1
        filled = 30 * self.done // self.total
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} {label:<40}")
        sys.stderr.write("\n" if self.done == self.total else "")
        sys.stderr.flush()


def _cell(value, fmt):
    return "–" if value is None else format(value, fmt)


def _error(result):
    """The error of a result as a table cell (markdown-safe, short)."""
    text = result["error"].replace("|", "/").replace("\n", " ")
    return "error: " + (text if len(text) <= 120 else text[:117] + "...")


def table_rows(framework, rows, peak, train=False):
    lines = [
        "| block | size | naive ms | fast ms | time fast/naive | naive peak MiB | fast peak MiB | "
        "memory fast/naive | fast GFLOP/s (% of peak) | max rel. diff fast vs naive |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for block, size, c, naive, fast in rows:
        naive_ms = naive.get("ms") if "skipped" not in naive and "error" not in naive else None
        fast_ms = fast.get("ms") if "error" not in fast else None
        cells = [
            block,
            f"{size}×{size}",
            naive["skipped"] if "skipped" in naive else _error(naive) if "error" in naive else _cell(naive_ms, ".1f"),
            _error(fast) if "error" in fast else _cell(fast_ms, ".1f"),
        ]
        both = naive_ms is not None and fast_ms is not None
        cells.append(_cell(fast_ms / naive_ms if both else None, ".3f"))
        cells.append(_cell(naive.get("peak_mib") if naive_ms is not None else None, ".1f"))
        cells.append(_cell(fast.get("peak_mib") if fast_ms is not None else None, ".1f"))
        mem = fast["peak_mib"] / naive["peak_mib"] if both and naive["peak_mib"] > 0 else None
        cells.append(_cell(mem, ".3f"))
        if fast_ms is not None:
            gflops = path_flops(block, size, size, c, train) / (fast_ms / 1e3) / 1e9
            cells.append(f"{gflops:.1f} ({100 * gflops / peak:.0f}%)" if peak else f"{gflops:.1f}")
        else:
            cells.append("–")
        cells.append(_error({"error": fast["check_error"]}) if "check_error" in fast else _cell(fast.get("err"), ".1e"))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def installed(framework):
    return all(importlib.util.find_spec(m) is not None for m in FRAMEWORKS[framework][0])


def machine():
    model = next(
        (ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")),
        platform.processor() or platform.machine(),
    )
    return f"{os.cpu_count()} cores, CPU ({model}), {platform.system()} {platform.release()}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--framework", nargs="+", choices=list(FRAMEWORKS), default=None, help="default: every installed framework"
    )
    p.add_argument("--block", nargs="+", choices=list(BLOCKS), default=None, help="default: every 2D block")
    p.add_argument("--sizes", nargs="+", type=int, default=None, help="H = W (default 16 32 64 128)")
    p.add_argument("--channels", type=int, default=None, help="C (default 256)")
    p.add_argument("--repeat", type=int, default=3, help="timed calls per measurement (median)")
    p.add_argument("--quick", action="store_true", help="smoke test: sizes 16 32, C = 64")
    p.add_argument(
        "--train",
        action="store_true",
        help="time a training step: train mode, gradients of sum(out) w.r.t. the input and every parameter",
    )
    p.add_argument(
        "--fast-only",
        action="store_true",
        help="run the fast path only (a memory check where the naive one would not fit or would take hours)",
    )
    p.add_argument("--out", help="also write the tables to this file")
    p.add_argument("--_one", help=argparse.SUPPRESS)
    p.add_argument(
        "--sweep",
        action="store_true",
        help="scaling sweep (sizes default 32 64 128 192 256, plus --video for the 3D block), forward and "
        "training step: writes benchmarks/sweep.md and sweep.png (see --sweep-out)",
    )
    p.add_argument("--video", nargs=3, type=int, default=[8, 112, 112], metavar=("T", "H", "W"), help="sweep: 3D shape")
    p.add_argument(
        "--timeout", type=float, default=CHILD_TIMEOUT_S, help="seconds per measurement (a timeout is a cell)"
    )
    p.add_argument("--sweep-out", default=None, help="sweep: path stem of the .md and .png (default benchmarks/sweep)")
    args = p.parse_args(argv)
    if args._one is not None:
        return child_main(args._one)
    if args.sweep:
        return sweep_main(args, argv)
    args.block = args.block or TABLE_BLOCKS
    if any(b not in TABLE_BLOCKS for b in args.block):
        p.error("the 3D block runs in --sweep only (at the --video shape)")
    sizes = args.sizes or ([16, 32] if args.quick else [16, 32, 64, 128])
    c = args.channels or (64 if args.quick else 256)
    frameworks = args.framework or [f for f in FRAMEWORKS if installed(f)]

    jobs = []  # (framework, block, size, impl); block "matmul" for the peak
    for fw in frameworks:
        jobs.append((fw, "matmul", None, None))
        jobs += [(fw, b, s, impl) for b in args.block for s in sizes for impl in ("naive", "auto")]
    progress, results = Progress(len(jobs)), {}
    for fw, block, size, impl in jobs:
        reason = (
            None
            if impl != "naive"
            else "not run (--fast-only)"
            if args.fast_only
            else naive_skip_reason(block, size, c)
        )
        if reason:
            results[fw, block, size, impl] = {"skipped": reason}
        else:
            # the fast/naive check re-runs the naive path: not at 128×128, where that is the costliest
            # run of all; 64×64 (N = 4096) already spans several 1024-query chunks
            check = impl == "auto" and size <= CHECK_MAX_SIZE and not naive_skip_reason(block, size, c)
            check = check and not args.fast_only
            job = {
                "framework": fw,
                "block": block,
                "size": size,
                "channels": c,
                "impl": impl,
                "repeat": args.repeat,
                "check": check,
                "train": args.train,
                "timeout": args.timeout,
            }
            results[fw, block, size, impl] = run_child(job)
        progress.step(f"{fw} {block} {size or ''} {impl or ''}")

    command = " ".join(sys.argv[1:] if argv is None else argv)
    out = [
        f"nlattn benchmarks — {datetime.date.today()}, {machine()}, batch 1, float32, C = {c}, "
        f"{'training step (forward + backward, train mode)' if args.train else 'forward, eval mode'}, "
        f"median of {args.repeat}",
        f"command: python benchmarks/bench.py {command}".rstrip(),
    ]
    for fw in frameworks:
        mm = results[fw, "matmul", None, None]
        peak = mm.get("gflops")
        out += [
            "",
            f"### {fw}",
            "",
            f"matmul peak ({MATMUL_N}×{MATMUL_N} @ {MATMUL_N}×{MATMUL_N} float32): "
            + (f"{peak:.1f} GFLOP/s" if peak else _error(mm)),
            "",
        ]
        rows = [(b, s, c, results[fw, b, s, "naive"], results[fw, b, s, "auto"]) for b in args.block for s in sizes]
        out += table_rows(fw, rows, peak, args.train)
    text = "\n".join(out) + "\n"
    sys.stdout.write(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


# --- the scaling sweep: N from 32² to 256² and a video clip, a table and a plot ---------------------

#: sweep defaults: H = W per side, and the blocks (one per family; --block chooses others)
SWEEP_SIZES = [32, 64, 128, 192, 256]
SWEEP_BLOCKS = ["embedded_gaussian", "sagan", "cca", "embedded_gaussian_3d"]


def naive_bytes(block, spatial, c, train):
    """What the naive path must hold at once, in bytes (float32): the N×M relation and its softmax
    (their gradients too in a training step; the concatenation mode's N·M·2Ci pair tensor), or
    None for blocks whose naive path stores no N×M tensor (CCNet's maps are N·(H+W))."""
    cls, kw = BLOCKS[block]
    n = int(np.prod(spatial))
    if cls == "CrissCrossAttention":
        return None
    if cls in ("SelfAttention", "PositionAttention"):
        m, width = n, 1
    else:
        window = (1, 2, 2) if len(spatial) == 3 else (2,) * len(spatial)
        m = int(np.prod([s // p for s, p in zip(spatial, window)])) if kw.get("sub_sample", True) else n
        width = 2 * (c // 2) if kw["mode"] == "concatenation" else 1
    return n * m * width * 4 * (2 if train else 1) * 2  # relation + its softmax (+ gradients)


def sweep_skip_reason(block, spatial, c, train):
    """Why the naive side of a sweep point is not run (its N×M tensors exceed half the RAM), or None."""
    if len(spatial) == 2 and spatial[0] == spatial[1] and block == "concatenation":
        reason = naive_skip_reason(block, spatial[0], c)
        if reason:
            return reason
    need = naive_bytes(block, spatial, c, train)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need is not None and need > ram / 2:
        return f"naive skipped: needs ~{need / 2**30:.0f} GiB of N×M tensors, RAM {ram / 2**30:.0f} GiB"
    return None


def sweep_points(blocks, sizes, video):
    """(block, spatial shape) of every sweep point: the 3D block at the video shape only."""
    return [(b, (tuple(video),) if b.endswith("_3d") else tuple((s, s) for s in sizes)) for b in blocks]


def sweep_main(args, argv):
    """Run the sweep: one child per (framework, block, shape, mode, implementation)."""
    sizes = args.sizes or SWEEP_SIZES
    c = args.channels or 256
    frameworks = args.framework or [f for f in FRAMEWORKS if installed(f)]
    blocks = args.block or SWEEP_BLOCKS
    modes = ["train"] if args.train else ["forward", "train"]
    points = [(b, sp) for b, shapes in sweep_points(blocks, sizes, args.video) for sp in shapes]
    jobs = [
        (fw, b, sp, mode, impl) for fw in frameworks for b, sp in points for mode in modes for impl in ("naive", "auto")
    ]
    progress, results = Progress(len(jobs)), {}
    for fw, block, spatial, mode, impl in jobs:
        reason = sweep_skip_reason(block, spatial, c, mode == "train") if impl == "naive" else None
        if reason:
            results[fw, block, spatial, mode, impl] = {"skipped": reason}
        else:
            job = {
                "framework": fw,
                "block": block,
                "size": list(spatial),
                "channels": c,
                "impl": impl,
                "repeat": args.repeat,
                "check": False,
                "train": mode == "train",
                "timeout": args.timeout,
            }
            results[fw, block, spatial, mode, impl] = run_child(job)
        progress.step(f"{fw} {block} {'×'.join(map(str, spatial))} {mode} {impl}")
    command = " ".join(sys.argv[1:] if argv is None else argv)
    header = (
        f"nlattn scaling sweep — {datetime.date.today()}, {machine()}, batch 1, float32, C = {c}, "
        f"median of {args.repeat}, one process per measurement, timeout {args.timeout:g} s\n"
        f"command: python benchmarks/bench.py {command}".rstrip()
    )
    rows = sweep_rows(results)
    stem = args.sweep_out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "sweep")
    text = write_sweep_table(stem + ".md", header, rows)
    sys.stdout.write(text)
    write_sweep_plot(stem + ".png", rows)


def sweep_rows(results):
    """One dict per (framework, block, shape, mode) from the measurements (naive, fast)."""
    rows = []
    for (fw, block, spatial, mode, impl), fast in results.items():
        if impl != "auto":
            continue
        naive = results[fw, block, spatial, mode, "naive"]
        row = {"framework": fw, "block": block, "shape": spatial, "n": int(np.prod(spatial)), "mode": mode}
        for side, r in (("naive", naive), ("fast", fast)):
            ok = "ms" in r
            row[side + "_ms"] = r["ms"] if ok else None
            row[side + "_mib"] = r["peak_mib"] if ok else None
            row[side + "_note"] = None if ok else r.get("skipped") or _error(r)
        rows.append(row)
    return rows


def write_sweep_table(path, header, rows):
    """The sweep as one markdown table (ratios fast/naive); returns its text."""
    lines = [
        header,
        "",
        "| framework | block | shape | N | step | naive ms | fast ms | time fast/naive | naive peak MiB | "
        "fast peak MiB | memory fast/naive |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        both = r["naive_ms"] is not None and r["fast_ms"] is not None
        mem = r["fast_mib"] / r["naive_mib"] if both and r["naive_mib"] > 0 else None
        cells = [
            r["framework"],
            r["block"],
            "×".join(map(str, r["shape"])),
            str(r["n"]),
            r["mode"],
            r["naive_note"] or _cell(r["naive_ms"], ".1f"),
            r["fast_note"] or _cell(r["fast_ms"], ".1f"),
            _cell(r["fast_ms"] / r["naive_ms"] if both else None, ".3f"),
            _cell(r["naive_mib"], ".1f"),
            _cell(r["fast_mib"], ".1f"),
            _cell(mem, ".3f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    with open(path, "w") as f:
        f.write(text)
    return text


def write_sweep_plot(path, rows):
    """Time and peak memory against N, log-log: one row of panels per (block, step), one colour
    per framework, naive dashed, fast solid; skipped or failed points are left out."""
    import matplotlib

    matplotlib.use("Agg")  # no display: the file is the output
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((r["block"], r["mode"]) for r in rows))
    frameworks = list(dict.fromkeys(r["framework"] for r in rows))
    colours = {fw: f"C{i}" for i, fw in enumerate(frameworks)}
    fig, axes = plt.subplots(len(panels), 2, figsize=(10, 3 * len(panels)), squeeze=False)
    for (block, mode), (ax_t, ax_m) in zip(panels, axes):
        for fw in frameworks:
            mine = sorted(
                (r for r in rows if (r["block"], r["mode"], r["framework"]) == (block, mode, fw)), key=lambda r: r["n"]
            )
            for side, style in (("naive", "--"), ("fast", "-")):
                for ax, key in ((ax_t, side + "_ms"), (ax_m, side + "_mib")):
                    pts = [(r["n"], r[key]) for r in mine if r[key] is not None and r[key] > 0]
                    if pts:
                        ax.plot(*zip(*pts), style, marker="o", color=colours[fw], label=f"{fw} {side}")
        for ax, what in ((ax_t, "time (ms)"), (ax_m, "peak memory (MiB)")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("N (positions)")
            ax.set_ylabel(what)
            ax.set_title(f"{block}, {mode}")
            ax.grid(True, which="both", alpha=0.3)
        if ax_t.get_legend_handles_labels()[0]:
            ax_t.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
