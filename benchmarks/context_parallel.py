"""Per-process peak memory and time of a context-parallel training step (torch, gloo, CPU processes).

    python benchmarks/context_parallel.py [--processes 1 2 4] [--channels 256] [--out FILE]

One non-local block (``NonLocalBlock2D`` embedded_gaussian at 128×128 and ``NonLocalBlock3D`` at
8×56×56, C = 256, batch 1, train mode) is split over P processes along its first spatial axis with
``nlattn.torch.context_parallel``; each process runs a warm-up step, then one timed training step
(forward, and the gradients of sum(output) w.r.t. its input shard and every parameter) and reports
the peak resident memory that step needed above what was resident before it (bench.py's
``PeakRSS``). The table gives the largest per-process peak and its ratio to P = 1. The processes
share this machine's cores (torch threads = cores // P), so time shows the overhead, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import PeakRSS, _status_kib, machine  # noqa: E402

SHAPES = {
    "NonLocalBlock2D 128×128": ("NonLocalBlock2D", (128, 128)),
    "NonLocalBlock3D 8×56×56": ("NonLocalBlock3D", (8, 56, 56)),
}


def worker(rank: int, world: int, port: int, block: str, spatial: list[int], channels: int) -> dict:
    import torch
    import torch.distributed as dist

    import nlattn.torch as nt
    from nlattn.specs import random_weights

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        m = nt.BLOCKS[block](channels).train()
        nt.load_weights(m, random_weights(m.spec.schema(), np.random.default_rng(0)))
        model = nt.context_parallel(m)
        x = model.shard(torch.randn(1, channels, *spatial, generator=torch.Generator().manual_seed(1)))

        def step():
            m.zero_grad(set_to_none=True)
            xs = x.clone().requires_grad_(True)
            model(xs).sum().backward()

        step()  # warm-up
        dist.barrier()
        before = _status_kib("VmRSS")
        meter = PeakRSS().start()
        t0 = time.perf_counter()
        step()
        seconds = time.perf_counter() - t0
        peak = meter.stop()
        return {"peak_mib": (peak - before) / 1024, "ms": 1e3 * seconds}
    finally:
        dist.destroy_process_group()


def run(block: str, spatial, world: int, channels: int) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576", OMP_WAIT_POLICY="passive")
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--_one", json.dumps([r, world, port, block, list(spatial), channels])],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for r in range(world)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=3600)
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        results.append(json.loads(lines[-1]) if lines else {"error": (err.strip().splitlines() or ["?"])[-1]})
    return results


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--processes", nargs="+", type=int, default=[1, 2, 4])
    p.add_argument("--channels", type=int, default=256)
    p.add_argument("--shape", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    p.add_argument("--out")
    p.add_argument("--_one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._one:
        print(json.dumps(worker(*json.loads(args._one))), flush=True)
        return
    lines = [
        f"context-parallel training step, torch + gloo on {machine()}, C = {args.channels}, batch 1",
        "",
        "| block | P | per-process peak MiB (max) | vs P = 1 | step ms (max) |",
        "|---|---|---|---|---|",
    ]
    for name in args.shape:
        block, spatial = SHAPES[name]
        base = None
        for world in args.processes:
            res = run(block, spatial, world, args.channels)
            if any("error" in r for r in res):
                lines.append(f"| {name} | {world} | error: {next(r['error'] for r in res if 'error' in r)} | – | – |")
                continue
            peak, ms = max(r["peak_mib"] for r in res), max(r["ms"] for r in res)
            base = peak if world == 1 else base
            ratio = f"{peak / base:.3f}" if base else "–"
            lines.append(f"| {name} | {world} | {peak:.1f} | {ratio} | {ms:.0f} |")
            print(lines[-1], file=sys.stderr, flush=True)
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
