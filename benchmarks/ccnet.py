"""CrissCrossAttention (torch) before and after issue 13's rewrite, in the same run.

    python benchmarks/ccnet.py [--sizes 64 128] [--channels 256] [--recurrence 2] [--rounds 5] [--threads 1]

"old" is the formulation the library had before (four einsums on channels-first tensors, an
(H, 1, H) bool self-mask, one concatenation), kept here only; "new" is ``nlattn.torch``'s
``CrissCrossAttention``. Both run with the same weights on the same input (batch 1, float32,
γ = 0.5 so that the recurrence matters) and must agree to 1e-5. Per size and step (forward under
``inference_mode``; training step: train mode, ``sum(out)`` backward to the input and every
parameter):

- time: old and new interleaved, ``--rounds`` × 2 calls each, the minimum. Both CPU time of the
  process and wall time are printed: on a shared machine CPU time at ``--threads 1`` is the figure
  that does not depend on what else runs.
- peak memory: one child process per (implementation, step), VmHWM above the resident memory
  before the call (``bench.PeakRSS``), after a warm-up call.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402

from nlattn import torch as ntorch  # noqa: E402


def old_forward(self, x):
    """The einsum formulation the library had before (float32 inputs: no half-precision casts)."""
    h = x.shape[2]
    itself = torch.eye(h, dtype=torch.bool, device=x.device)[:, None, :]
    for _ in range(self.spec.recurrence):
        q, k, v = self.query_conv(x), self.key_conv(x), self.value_conv(x)
        e_col = torch.einsum("bchw,bcgw->bhwg", q, k).masked_fill(itself, float("-inf"))
        e_row = torch.einsum("bchw,bchv->bhwv", q, k)
        attn = torch.softmax(torch.cat([e_col, e_row], -1), dim=-1)
        out = torch.einsum("bhwg,bcgw->bchw", attn[..., :h], v) + torch.einsum("bhwv,bchv->bchw", attn[..., h:], v)
        x = self.gamma * out + x
    return x


IMPLEMENTATIONS = {"old": old_forward, "new": lambda self, x: self(x)}


def setup(size, c, recurrence):
    torch.manual_seed(0)
    block = ntorch.CrissCrossAttention(c, recurrence=recurrence)
    with torch.no_grad():
        block.gamma.fill_(0.5)
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((1, c, size, size), dtype=np.float32))
    return block, x


def step(block, x, impl, train):
    """One forward (no autograd) or one training step; returns the output or the input's gradient."""
    f = IMPLEMENTATIONS[impl]
    if not train:
        with torch.inference_mode():
            return f(block.eval(), x)
    block.train().zero_grad(set_to_none=True)
    xg = x.clone().requires_grad_(True)
    f(block, xg).sum().backward()
    return xg.grad


def child(job):
    """Peak memory of one (implementation, step) in this process (MiB)."""
    torch.set_num_threads(job["threads"])
    block, x = setup(job["size"], job["channels"], job["recurrence"])
    step(block, x, job["impl"], job["train"])
    before = bench._status_kib("VmRSS")
    meter = bench.PeakRSS().start()
    y = step(block, x, job["impl"], job["train"])
    peak = meter.stop()
    del y
    return {"peak_mib": (peak - before) / 1024}


def peak_mib(job):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576", OMP_WAIT_POLICY="passive")
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--_one", json.dumps(job)], capture_output=True, text=True, env=env
    )
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1])["peak_mib"] if lines else float("nan")


def timings(block, x, train, rounds):
    """{impl: (min CPU seconds, min wall seconds)} over interleaved calls."""
    cpu: dict[str, list[float]] = {k: [] for k in IMPLEMENTATIONS}
    wall: dict[str, list[float]] = {k: [] for k in IMPLEMENTATIONS}
    for impl in IMPLEMENTATIONS:  # warm-up
        step(block, x, impl, train)
    for _ in range(rounds):
        for impl in IMPLEMENTATIONS:
            for _ in range(2):
                c0, w0 = time.process_time(), time.perf_counter()
                step(block, x, impl, train)
                cpu[impl].append(time.process_time() - c0)
                wall[impl].append(time.perf_counter() - w0)
    return {k: (min(cpu[k]), min(wall[k])) for k in IMPLEMENTATIONS}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", type=int, default=[64, 128], help="H = W")
    p.add_argument("--channels", type=int, default=256)
    p.add_argument("--recurrence", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: CPU time is robust to load)")
    p.add_argument("--_one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._one is not None:
        print(json.dumps(child(json.loads(args._one))), flush=True)
        return
    torch.set_num_threads(args.threads)
    print(
        f"CrissCrossAttention old vs new — {bench.machine()}, torch {torch.__version__}, {args.threads} thread(s), "
        f"batch 1, float32, C = {args.channels}, R = {args.recurrence}, min of {2 * args.rounds}\n"
    )
    print(
        "| size | step | old CPU ms | new CPU ms | CPU new/old | old wall ms | new wall ms | wall new/old | "
        "old peak MiB | new peak MiB | memory new/old | max rel. diff |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        block, x = setup(size, args.channels, args.recurrence)
        for train in (False, True):
            ref, out = (step(block, x, impl, train) for impl in IMPLEMENTATIONS)
            err = float((out - ref).abs().max() / max(1.0, float(ref.abs().max())))
            assert err <= 1e-5, f"old and new disagree: {err:.2e}"
            t = timings(block, x, train, args.rounds)
            job = {
                "size": size,
                "channels": args.channels,
                "recurrence": args.recurrence,
                "train": train,
                "threads": args.threads,
            }
            mem = {impl: peak_mib({**job, "impl": impl}) for impl in IMPLEMENTATIONS}
            (oc, ow), (nc, nw) = t["old"], t["new"]
            print(
                f"| {size}×{size} | {'training step' if train else 'forward'} | {1e3 * oc:.1f} | {1e3 * nc:.1f} | "
                f"{nc / oc:.3f} | {1e3 * ow:.1f} | {1e3 * nw:.1f} | {nw / ow:.3f} | {mem['old']:.1f} | "
                f"{mem['new']:.1f} | {mem['new'] / mem['old']:.3f} | {err:.1e} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
