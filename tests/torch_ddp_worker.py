"""One process of tests/test_torch_distributed.py: a training step on its share of the problem.

Run as ``python torch_ddp_worker.py RANK WORLD PORT CASE_JSON OUT_DIR``; it joins a gloo process
group on 127.0.0.1 and takes either rows [rank·B/P, (rank+1)·B/P) of the batch (data parallel) or,
with ``"context": true``, its shard of the first spatial axis (context parallel), runs one training
step and writes its outputs, input gradient, parameter gradients and running statistics to OUT_DIR.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import torch
import torch.distributed as dist

import nlattn.torch as nt
from nlattn.specs import random_weights


def problem(case: dict):
    """The block (float64, train mode, random weights), the whole batch and its cotangent."""
    block = nt.BLOCKS[case["block"]](**case["config"]).double().train()
    rng = np.random.default_rng(0)
    nt.load_weights(block, random_weights(block.spec.schema(), rng))
    x = torch.from_numpy(rng.normal(size=case["shape"]))
    cotangent = torch.from_numpy(rng.normal(size=case["shape"]))
    return block, x, cotangent


def step(model, block, x, cotangent):
    """sum(out · cotangent) backward: (out, dx, {name: dparam}, running statistics)."""
    x = x.clone().requires_grad_(True)
    out = model(x)
    (out * cotangent).sum().backward()
    grads = {n: _full(p.grad).numpy().copy() for n, p in block.named_parameters()}
    stats = {n: b.numpy().copy() for n, b in block.named_buffers() if n.endswith(("running_mean", "running_var"))}
    return out.detach().numpy(), x.grad.numpy(), grads, stats


def _full(t):
    """A gradient as a plain tensor (FSDP2 keeps each process's shard in a DTensor)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _exit_without_teardown() -> None:
    """Leave once every process has written its results, skipping the interpreter's teardown: under
    load, gloo's background threads at exit have aborted a finished worker ("terminate called
    without an active exception") after its results were complete."""
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(rank: int, world: int, port: int, case: dict, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        block, x, cotangent = problem(case)
        if case["sync"]:
            nt.convert_sync_batchnorm(block)
        if case["wrapper"] == "ddp":
            model = torch.nn.parallel.DistributedDataParallel(block)
        elif case["wrapper"] == "fsdp":
            from torch.distributed.fsdp import fully_shard

            model = fully_shard(block)
        else:
            model = block
        share = x.shape[0] // world
        rows = slice(rank * share, (rank + 1) * share)
        out, dx, grads, stats = step(model, block, x[rows], cotangent[rows])
        np.savez(
            os.path.join(out_dir, f"rank{rank}.npz"),
            out=out,
            dx=dx,
            **{f"grad:{k}": v for k, v in grads.items()},
            **{f"stat:{k}": v for k, v in stats.items()},
        )
    except BaseException:
        dist.destroy_process_group()
        raise
    _exit_without_teardown()


def context_main(rank: int, world: int, port: int, case: dict, out_dir: str) -> None:
    """Context parallelism: the whole batch on every process, the first spatial axis split."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        block, x, cotangent = problem(case)
        model = nt.context_parallel(block)
        out, dx, grads, stats = step(model, block, model.shard(x), model.shard(cotangent))
        np.savez(
            os.path.join(out_dir, f"rank{rank}.npz"),
            out=out,
            dx=dx,
            **{f"grad:{k}": v for k, v in grads.items()},
            **{f"stat:{k}": v for k, v in stats.items()},
        )
    except BaseException:
        dist.destroy_process_group()
        raise
    _exit_without_teardown()


if __name__ == "__main__":
    # one intra-op thread, as the test's single-process step: the comparison is at 1e-10 in float64,
    # and at 2 threads the chunked softmax attention's forward has varied by 1.7e-10 (relative to
    # the output's max) between runs, in 2 of 21 SAGAN runs (1 thread: 16 of 16 bit-identical)
    torch.set_num_threads(1)
    args = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4]), sys.argv[5]
    (context_main if args[3].get("context") else main)(*args)
