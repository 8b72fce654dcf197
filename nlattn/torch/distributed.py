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
