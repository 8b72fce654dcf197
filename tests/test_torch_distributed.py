"""Data-parallel torch training on 2 processes (gloo, CPU): with synchronised BatchNorm a step on a
split batch equals the single-process step on the whole batch; without it, statistics are each
process's own. Every block with BatchNorm, and SelfAttention (no BatchNorm: DDP alone)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch_ddp_worker as worker

import nlattn.torch as nt
from conftest import ONE_CASE_PER_BLOCK
from nlattn.numpy_ref import run as reference
from nlattn.specs import BatchNorm

WORKER = Path(worker.__file__)
BATCH_NORM_BLOCKS = [b for b, c in ONE_CASE_PER_BLOCK.items() if c.has_batchnorm] + ["SelfAttention"]


def _problem(block: str, **extra) -> dict:
    case = ONE_CASE_PER_BLOCK[block]
    return dict(block=block, config=case.config, shape=[4, *case.shape[1:]], **extra)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(problem: dict, tmp_path, world: int = 2) -> list[dict]:
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(rank), str(world), str(port), json.dumps(problem), str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(world)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    return [dict(np.load(tmp_path / f"rank{r}.npz")) for r in range(world)]


def single(problem: dict, rows=slice(None)) -> dict:
    """The single-process step, at one intra-op thread as the data-parallel workers run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        block, x, cotangent = worker.problem(problem)
        out, dx, grads, stats = worker.step(block, block, x[rows], cotangent[rows])
    finally:
        torch.set_num_threads(threads)
    return dict(
        out=out, dx=dx, **{f"grad:{k}": v for k, v in grads.items()}, **{f"stat:{k}": v for k, v in stats.items()}
    )


def close(a, b):
    return np.max(np.abs(a - b)) <= 1e-10 * max(1.0, np.max(np.abs(b)))


@pytest.mark.parametrize("block", BATCH_NORM_BLOCKS)
def test_synchronised_ddp_step_equals_the_single_process_step(block, tmp_path):
    problem = _problem(block, sync=True, wrapper="ddp")
    ranks, whole = run_world(problem, tmp_path), single(problem)
    assert close(np.concatenate([r["out"] for r in ranks]), whole["out"])
    # the input gradient is that of the sum of the processes' losses, as nn.SyncBatchNorm's
    assert close(np.concatenate([r["dx"] for r in ranks]), whole["dx"])
    for key in [k for k in whole if k.startswith("grad:")]:
        # DDP averages the parameter gradients over the 2 processes
        assert all(close(2 * r[key], whole[key]) for r in ranks), key
    for key in [k for k in whole if k.startswith("stat:")]:
        assert all(close(r[key], whole[key]) for r in ranks), key


def test_without_synchronisation_each_process_keeps_its_own_statistics(tmp_path):
    problem = _problem("NonLocalBlock2D", sync=False, wrapper="ddp")
    ranks = run_world(problem, tmp_path)
    for rank, got in enumerate(ranks):
        own = single(problem, rows=slice(2 * rank, 2 * rank + 2))  # its half, alone
        assert close(got["out"], own["out"]) and close(got["stat:bn.running_mean"], own["stat:bn.running_mean"])
    whole = single(problem)
    assert not close(ranks[0]["stat:bn.running_var"], whole["stat:bn.running_var"])


def test_fsdp2_step_equals_the_single_process_step(tmp_path):
    problem = _problem("NonLocalBlock2D", sync=True, wrapper="fsdp")
    ranks, whole = run_world(problem, tmp_path), single(problem)
    assert close(np.concatenate([r["out"] for r in ranks]), whole["out"])
    assert close(np.concatenate([r["dx"] for r in ranks]), whole["dx"])
    for key in [k for k in whole if k.startswith("grad:")]:
        assert all(close(2 * r[key], whole[key]) for r in ranks), key


def test_conversion_keeps_names_weights_and_the_eval_path():
    block = nt.ExplicitVisualCenter(8, num_codes=4).double().eval()
    before = nt.export_weights(block)
    x = np.random.default_rng(0).normal(size=(2, 8, 5, 6))
    import torch

    with torch.no_grad():
        want = block(torch.from_numpy(x))
    nt.convert_sync_batchnorm(block)
    n_bn = sum(isinstance(layer, BatchNorm) for layer in block.spec.schema())
    assert n_bn == 9 and sum(isinstance(m, nt.SyncBatchNorm) for m in block.modules()) == n_bn
    after = nt.export_weights(block)
    assert list(after) == list(before) and all(np.array_equal(after[k], before[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(block(torch.from_numpy(x)), want)  # eval mode: the running statistics


CONTEXT = [
    ("NonLocalBlock2D", dict(in_channels=8), (2, 8, 8, 5)),
    ("NonLocalBlock2D", dict(in_channels=8, mode="dot_product", sub_sample=False), (2, 8, 4, 7)),
    ("NonLocalBlock2D", dict(in_channels=8, mode="gaussian", num_heads=2, bn_layer=False), (2, 8, 8, 3)),
    ("NonLocalBlock1D", dict(in_channels=4, pool_first=True), (2, 4, 16)),
    ("NonLocalBlock3D", dict(in_channels=4, mode="dot_product"), (2, 4, 4, 4, 5)),
    ("SelfAttention", dict(in_channels=16), (2, 16, 4, 5)),
    ("PositionAttention", dict(in_channels=8, qk_ratio=2), (2, 8, 8, 3)),
]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("block, config, shape", CONTEXT, ids=[f"{b}-{c.get('mode', '')}" for b, c, _ in CONTEXT])
def test_context_parallel_step_equals_the_single_process_step(block, config, shape, world, tmp_path):
    """Query positions split over the processes along the first spatial axis (odd other sizes):
    outputs and input gradients shard by shard, parameter gradients summed over the processes,
    BatchNorm statistics those of the whole input; the outputs equal the float64 reference."""
    if shape[2] % (
        world * (2 if config.get("sub_sample", True) and block.startswith("NonLocal") and len(shape) < 5 else 1)
    ):
        pytest.fail("a CONTEXT shape does not split")  # the table is chosen to split for P = 2 and 4
    problem = dict(block=block, config=config, shape=list(shape), context=True)
    ranks, whole = run_world(problem, tmp_path, world), single(problem)
    assert close(np.concatenate([r["out"] for r in ranks], axis=2), whole["out"])
    assert close(np.concatenate([r["dx"] for r in ranks], axis=2), whole["dx"])
    for key in [k for k in whole if k.startswith("grad:")]:
        assert close(sum(r[key] for r in ranks), whole[key]), key
    for key in [k for k in whole if k.startswith("stat:")]:
        assert all(close(r[key], whole[key]) for r in ranks), key
    blk, x, _ = worker.problem(problem)
    want = reference(block, x.numpy(), nt.export_weights(blk), config, training=True)
    assert close(whole["out"], want)


def test_context_parallel_refuses_uneven_shards(tmp_path):
    problem = dict(block="NonLocalBlock2D", config=dict(in_channels=4), shape=[1, 4, 6, 5], context=True)
    with pytest.raises(AssertionError, match="do not split"):
        run_world(problem, tmp_path, world=2)  # 6 rows: 3 per process, not whole 2-row windows
