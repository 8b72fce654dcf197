"""Data-parallel training of torch blocks: BatchNorm statistics synchronised across processes.

``nn.SyncBatchNorm`` refuses CPU tensors; ``convert_sync_batchnorm`` gives every BatchNorm inside
nlattn blocks (RGA's and EVC's included) synchronised statistics on any device: on CUDA it hands
over to ``nn.SyncBatchNorm``, elsewhere to ``SyncBatchNorm`` below, which reduces the batch moments
with ``torch.distributed`` collectives (gloo) and differentiates through them. With statistics
synchronised, a training step on a global batch split over P processes equals the single-process
step on the whole batch: outputs, gradients (after DDP's or FSDP's all-reduce of the parameter
gradients) and running statistics. Without it each process normalises with its own batch's
statistics and keeps its own running statistics, as plain BatchNorm under DDP does.

    model = nlattn.torch.convert_sync_batchnorm(model)       # before wrapping in DDP
    model = torch.nn.parallel.DistributedDataParallel(model)
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ._base import BatchNormNd, work_dtype
from ._weights import ACCESS


class SyncBatchNorm(BatchNormNd):
    """BatchNorm over channels (axis 1) whose training statistics are those of the global batch.

    The per-channel sum, sum of squares and count are all-reduced over ``process_group`` (default:
    the whole world); eval mode, and training outside a process group of more than one process,
    are plain BatchNorm. Running variance is updated with the unbiased variance of the global batch,
    as torch's BatchNorm does for a single process.
    """

    def __init__(self, *args, process_group=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.process_group = process_group

    def _synchronised(self) -> bool:
        return (
            self.training
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size(self.process_group) > 1
        )

    def forward(self, input):
        if not self._synchronised():
            return super().forward(input)
        self._check_input_dim(input)
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        momentum = self.momentum
        if momentum is None:  # a cumulative moving average, as torch's BatchNorm
            momentum = 1.0 / float(self.num_batches_tracked)
        return _SyncBatchNormFunction.apply(
            input, self.weight, self.bias, self.running_mean, self.running_var, self.eps, momentum, self.process_group
        )


class _SyncBatchNormFunction(torch.autograd.Function):
    """Normalisation by global-batch moments; its backward all-reduces the two sums it needs."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, group):
        axes = [0, *range(2, x.dim())]
        shape = [1, -1, *[1] * (x.dim() - 2)]
        wide = work_dtype(x.dtype)
        xw = x.to(wide)
        count = torch.tensor([x.numel() / x.shape[1]], dtype=wide, device=x.device)
        moments = torch.cat([xw.sum(axes), (xw * xw).sum(axes), count])
        dist.all_reduce(moments, group=group)
        c = x.shape[1]
        total = moments[-1]
        mean = moments[:c] / total
        var = (moments[c : 2 * c] / total - mean * mean).clamp(min=0)  # biased: what normalises
        invstd = torch.rsqrt(var + eps)
        xhat = (xw - mean.view(shape)) * invstd.view(shape)
        out = xhat if weight is None else xhat * weight.to(wide).view(shape) + bias.to(wide).view(shape)
        if running_mean is not None:
            with torch.no_grad():
                unbiased = var * total / (total - 1).clamp(min=1)
                running_mean.mul_(1 - momentum).add_(momentum * mean.to(running_mean.dtype))
                running_var.mul_(1 - momentum).add_(momentum * unbiased.to(running_var.dtype))
        ctx.save_for_backward(xhat, weight, invstd, total)
        ctx.group, ctx.dtype = group, x.dtype
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, dout):
        xhat, weight, invstd, total = ctx.saved_tensors
        axes = [0, *range(2, xhat.dim())]
        shape = [1, -1, *[1] * (xhat.dim() - 2)]
        dy = dout.to(xhat.dtype)
        local = torch.cat([dy.sum(axes), (dy * xhat).sum(axes)])
        sums = local.clone()
        dist.all_reduce(sums, group=ctx.group)
        c = xhat.shape[1]
        sum_dy, sum_dy_xhat = sums[:c], sums[c:]
        scale = invstd if weight is None else invstd * weight.to(xhat.dtype)
        dx = scale.view(shape) * (dy - (sum_dy.view(shape) + xhat * sum_dy_xhat.view(shape)) / total)
        # this process's share: DDP / FSDP sum the parameter gradients over processes
        dweight = None if weight is None else local[c:].to(weight.dtype)
        dbias = None if weight is None else local[:c].to(weight.dtype)
        return dx.to(ctx.dtype), dweight, dbias, None, None, None, None, None


def convert_sync_batchnorm(model: nn.Module, process_group=None) -> nn.Module:
    """Every BatchNorm inside the nlattn blocks of ``model`` with synchronised statistics, in place
    (weights, buffers, device and dtype kept; canonical names unchanged); returns ``model``.

    CUDA BatchNorms become ``nn.SyncBatchNorm``, others ``SyncBatchNorm`` (collectives of any
    backend, gloo included). Layers outside nlattn blocks are left alone: convert those with
    ``nn.SyncBatchNorm.convert_sync_batchnorm`` if they should be synchronised too.
    """
    for _, block in ACCESS.blocks(model):
        for name, module in list(block.named_modules()):
            if isinstance(module, BatchNormNd) and not isinstance(module, SyncBatchNorm):
                _replace(block, name, _synchronised(module, process_group))
    return model


def _synchronised(bn: BatchNormNd, process_group) -> nn.Module:
    cls = nn.SyncBatchNorm if bn.weight is not None and bn.weight.is_cuda else SyncBatchNorm
    sync = cls(
        bn.num_features,
        eps=bn.eps,
        momentum=bn.momentum,
        affine=bn.affine,
        track_running_stats=bn.track_running_stats,
        process_group=process_group,
    )
    reference = bn.weight if bn.weight is not None else bn.running_mean
    if reference is not None:  # first the dtype: loading float64 values into float32 would round them
        sync.to(device=reference.device, dtype=reference.dtype)
    sync.load_state_dict(bn.state_dict())
    sync.train(bn.training)
    return sync


def _replace(root: nn.Module, dotted: str, module: nn.Module) -> None:
    parent_name, _, leaf = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, module)


def context_parallel(block: nn.Module, process_group=None) -> ContextParallel:
    """``block`` run on one huge input whose query positions are split over the processes of
    ``process_group`` along the first spatial axis (H of an image, T of a video).

    Each process passes its shard ``x[:, :, r·S/P:(r+1)·S/P]`` (``ContextParallel.shard`` cuts it)
    and gets the same shard of the output. Keys and values (pooled first, where the block
    sub-samples) are all-gathered with a collective that carries gradients, so a process holds its
    N/P queries' activations and one copy of the keys/values, never the N×M relation (on the fast
    path); BatchNorm statistics are synchronised over the group. Outputs and gradients equal the
    single-process block's: input gradients shard by shard, parameter gradients summed over the
    processes (DDP's all-reduce on this group does that sum, up to its 1/P). For NonLocalBlock1D/2D/3D
    (every mode), SelfAttention and PositionAttention.
    """
    return ContextParallel(block, process_group)


class ContextParallel(nn.Module):
    """See ``context_parallel``; ``block`` is converted in place (``convert_sync_batchnorm``)."""

    def __init__(self, block: nn.Module, process_group=None):
        super().__init__()
        if not all(hasattr(block, m) for m in ("embed", "aggregate", "relation", "residual")):
            raise TypeError(
                f"context_parallel: {type(block).__name__} has no query/key split; it supports the "
                "non-local blocks, SelfAttention and PositionAttention"
            )
        self.block: Any = convert_sync_batchnorm(block, process_group)
        self.process_group = process_group

    def _world(self) -> tuple[int, int]:
        return dist.get_rank(self.process_group), dist.get_world_size(self.process_group)

    def _window(self) -> int:
        """How many rows of the first spatial axis one pooled key covers (1 without pooling)."""
        spec = self.block.spec
        return spec.pool_window[0] if getattr(spec, "sub_sample", False) else 1

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """This process's shard of a whole input (B, C, S0, ...), split along S0 in rank order."""
        rank, world = self._world()
        size, window = x.shape[2], self._window()
        if size % (world * window):
            raise ValueError(
                f"{self.block.spec.block}: context parallelism splits the first spatial axis into "
                f"{world} equal shards{f' of whole {window}-row pooling windows' if window > 1 else ''}; "
                f"{size} rows do not split so (use a size divisible by {world * window})"
            )
        share = size // world
        return x[:, :, rank * share : (rank + 1) * share]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """This process's shard (B, C, S0/P, ...) -> the same shard of the block's output."""
        block = self.block
        if x.shape[2] % self._window():
            raise ValueError(
                f"{block.spec.block}: a shard's first spatial size must be a multiple of the pooling "
                f"window {self._window()}, got {x.shape[2]} (see ContextParallel.shard)"
            )
        q, k, v = block.embed(x)
        k, v = _gather_positions(k, self.process_group), _gather_positions(v, self.process_group)
        y = block.aggregate(q, k, v) if block.fast() else block.relation(q, k) @ v
        return block.residual(x, y)


def _gather_positions(t: torch.Tensor, group) -> torch.Tensor:
    """(B, h, n, c) of every process, concatenated along the positions in rank order."""
    return _GatherPositions.apply(t, group)


class _GatherPositions(torch.autograd.Function):
    """All-gather along dim −2; the backward sums the gradient over the processes (every process
    used every key) and keeps this process's rows. (torch.distributed.nn's all_gather hands the
    non-contiguous slices of a concatenation's gradient to gloo, which reads them wrongly.)"""

    @staticmethod
    def forward(ctx, t, group):
        parts = [torch.empty_like(t, memory_format=torch.contiguous_format) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, t.contiguous(), group=group)
        ctx.group, ctx.rows = group, t.shape[-2]
        return torch.cat(parts, dim=-2)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        start = dist.get_rank(ctx.group) * ctx.rows
        return grad[..., start : start + ctx.rows, :].contiguous(), None
