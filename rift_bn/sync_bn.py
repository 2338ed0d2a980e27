"""BatchNorm statistics of the whole DDP step: Lightning's layer-sync plugin, on CPU processes as well.

Lightning's ``Trainer(sync_batchnorm=True)`` converts every BatchNorm layer to ``torch.nn.SyncBatchNorm``,
which refuses CPU tensors (its kernels are GPU-only, and ``DistributedDataParallel`` rejects it in a CPU
module), and its revert leaves a private ``_BatchNormXd`` class behind, which is no ``nn.BatchNorm2d``
(MRC's candidate search would no longer see the layers). :class:`BatchNormSync` is the same plugin
(``Trainer(plugins=[BatchNormSync()])``) with two differences: on the gloo backend (CPU processes) the
layers become :class:`GlooSyncBatchNorm`, which all-reduces the batch sums, and ``revert`` restores each
layer's own class. Module names, parameters, buffers and ``state_dict`` keys never change; the converted
layers share the original parameter and buffer tensors. With one process it changes nothing.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.plugins.layer_sync import LayerSync
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


class _AllReduceSum(torch.autograd.Function):
    """Sum over the process group; the gradient of every rank's input is the sum of all ranks' gradients."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: Any) -> Tensor:
        ctx.group = group
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        out = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=ctx.group)
        return out, None


def _world(group: Any) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


class GlooSyncBatchNorm(_BatchNorm):
    """BatchNorm that, in train mode inside a process group, normalises with the statistics of the union of
    all ranks' batches and updates its running statistics with them, as a single process given the whole
    batch would (``torch.nn.SyncBatchNorm``'s semantics, for any device and backend). Two all-reduces of
    per-channel sums (mean, then centred squares) per forward, one per backward; eval mode and single
    processes run plain BatchNorm. Every rank must call it the same number of times in train mode.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, bias=bias)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        group = self.process_group or (dist.group.WORLD if dist.is_available() else None)
        if not self.training or _world(group) < 2:
            return super().forward(input)
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats:
            assert self.num_batches_tracked is not None
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        x = input.float()
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = x.new_full((1,), x.numel() // max(x.shape[1], 1))
        sums = _AllReduceSum.apply(torch.cat([x.sum(dims), count]), group)
        n = sums[-1]
        mean = sums[:-1] / n
        centred = x - mean.view(shape)
        var = _AllReduceSum.apply((centred * centred).sum(dims), group) / n  # biased, for normalising
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.weight is not None:
            out = out * self.weight.view(shape)
        if self.bias is not None:
            out = out + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.running_mean.mul_(1 - factor).add_(mean.detach() * factor)
                unbiased = var.detach() * (n / (n - 1)) if float(n) > 1 else var.detach()
                self.running_var.mul_(1 - factor).add_(unbiased * factor)
        return out.to(input.dtype)


_SYNC_CLASSES = (GlooSyncBatchNorm, nn.SyncBatchNorm)


def _converted(bn: _BatchNorm, cls: type[_BatchNorm], **extra: Any) -> _BatchNorm:
    """A ``cls`` layer holding ``bn``'s parameter and buffer tensors (shared, not copied) and mode."""
    new = cls(
        bn.num_features,
        bn.eps,
        bn.momentum,
        bn.affine,
        bn.track_running_stats,
        bias=bn.bias is not None,
        **extra,
    )
    if bn.affine:
        new.weight, new.bias = bn.weight, bn.bias
    new.running_mean, new.running_var = bn.running_mean, bn.running_var
    new.num_batches_tracked = bn.num_batches_tracked
    new.training = bn.training
    if hasattr(bn, "qconfig"):
        new.qconfig = bn.qconfig
    return new


class BatchNormSync(LayerSync):
    """Lightning layer-sync plugin: whole-step BatchNorm statistics under DDP, on CPU (gloo) and GPU.

    ``apply`` (Lightning calls it when a multi-process fit starts) converts every BatchNorm layer to
    ``torch.nn.SyncBatchNorm``, or to :class:`GlooSyncBatchNorm` on the gloo backend, which is the only
    one CPU processes have; nothing with a single process. ``revert`` (when the fit ends, on every rank)
    gives each layer back its original class, with the same tensors and mode.
    """

    def __init__(self, process_group: Any = None) -> None:
        self.process_group = process_group

    def apply(self, model: nn.Module) -> nn.Module:
        if _world(self.process_group) < 2:
            return model
        gloo = dist.get_backend(self.process_group) == "gloo"
        return self._swap(model, GlooSyncBatchNorm if gloo else nn.SyncBatchNorm)

    def _swap(self, module: nn.Module, cls: type[_BatchNorm]) -> nn.Module:
        out = module
        if isinstance(module, _BatchNorm) and not isinstance(module, _SYNC_CLASSES):
            out = _converted(module, cls, process_group=self.process_group)
            out._rift_bn_original = type(module)  # type: ignore[assignment]
        for name, child in module.named_children():
            out.add_module(name, self._swap(child, cls))
        return out

    def revert(self, model: nn.Module) -> nn.Module:
        out = model
        original = getattr(model, "_rift_bn_original", None)
        if isinstance(model, _SYNC_CLASSES) and original is not None:
            out = _converted(model, original)
        for name, child in model.named_children():
            out.add_module(name, self.revert(child))
        return out
