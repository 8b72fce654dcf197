"""Does a fast path fit where the naive one cannot run? An upper bound of its memory per block.

    python benchmarks/memory_check.py [--framework torch keras flax] [--block sagan ...]
                                      [--size 256] [--video 8 112 112] [--limit-gib 8] [--out FILE]

One process per (framework, block, shape, step): it builds the block as ``bench.py`` does (random
weights, batch 1, float32, C = 256), runs the forward or the training step twice and reports the
process's whole resident high-water mark (VmHWM): interpreter, framework, compilation and both
calls included. That over-counts, but unlike ``bench.py``'s peak it holds for Keras and Flax too,
whose runtimes keep the warm-up call's buffers for the timed calls (so a peak measured after
the warm-up can miss them). A bound under the limit answers the question.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys

import bench

#: the issue's high-resolution checks: every NonLocalBlock2D mode and SelfAttention at 256×256,
#: forward and training step; NonLocalBlock3D forward on a video clip
BLOCKS_2D = ["embedded_gaussian", "gaussian", "dot_product", "concatenation", "sagan"]


def child(job):
    """Run one job in this process; print {"peak_mib"} or {"error"}."""
    try:
        c = job["channels"]
        weights = bench.block_weights(job["block"], c)
        call, _ = bench._build(job["framework"], job["block"], c, job["shape"], "auto", weights, job["train"])
        call()
        call()
        result = {"peak_mib": bench._status_kib("VmHWM") / 1024}
    except Exception as e:  # a cell, not a crash
        result = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(result), flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--framework", nargs="+", choices=list(bench.FRAMEWORKS), default=None)
    p.add_argument("--block", nargs="+", choices=BLOCKS_2D, default=BLOCKS_2D)
    p.add_argument("--size", type=int, default=256, help="H = W of the 2D blocks")
    p.add_argument("--video", nargs=3, type=int, default=[8, 112, 112], metavar=("T", "H", "W"))
    p.add_argument("--channels", type=int, default=256)
    p.add_argument("--limit-gib", type=float, default=8.0)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--out", help="also write the table to this file")
    p.add_argument("--_one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._one is not None:
        return child(json.loads(args._one))
    frameworks = args.framework or [f for f in bench.FRAMEWORKS if bench.installed(f)]
    points = [(b, (args.size, args.size), train) for b in args.block for train in (False, True)]
    points.append(("embedded_gaussian_3d", tuple(args.video), False))
    rows = []
    for fw in frameworks:
        for block, shape, train in points:
            job = {"framework": fw, "block": block, "shape": shape, "train": train, "channels": args.channels}
            env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3")
            try:
                done = subprocess.run(
                    [sys.executable, os.path.abspath(__file__), "--_one", json.dumps(job)],
                    capture_output=True,
                    text=True,
                    timeout=args.timeout,
                    env=env,
                )
                lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
                tail = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
                result = json.loads(lines[-1]) if lines else {"error": tail}
            except subprocess.TimeoutExpired:
                result = {"error": "timed out"}
            mib = result.get("peak_mib")
            verdict = "–" if mib is None else "yes" if mib <= args.limit_gib * 1024 else "**no**"
            cell = f"{mib:.0f}" if mib is not None else f"error: {result['error'][:80]}"
            step = "training" if train else "forward"
            rows.append(f"| {fw} | {block} | {'×'.join(map(str, shape))} | {step} | {cell} | {verdict} |")
            print(rows[-1], flush=True)
    text = "\n".join(
        [
            f"nlattn memory check — {datetime.date.today()}, {bench.machine()}, batch 1, float32, "
            f"C = {args.channels}, fast path (implementation='auto')",
            f"command: python benchmarks/memory_check.py {' '.join(sys.argv[1:] if argv is None else argv)}".rstrip(),
            "",
            f"| framework | block | shape | step | whole-process peak MiB | within {args.limit_gib:g} GiB |",
            "|---|---|---|---|---|---|",
            *rows,
        ]
    )
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    sys.exit(main())
