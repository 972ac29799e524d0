"""Per-view BatchNorm: the statistics of each of K views in a fused ``(K*B, C, ...)`` batch.

Official SimSiam forwards each view separately, so every BatchNorm normalises with the
statistics of one view. ``bn_mode="per_view"`` (the default) keeps exactly that in the fused forward:
every BatchNorm is a :class:`PerViewBatchNorm` (timm's ``BatchNormAct2d``, as in EfficientNet and
RegNet, a :class:`PerViewBatchNormAct` keeping its activation and drop layers). The convolutions,
GEMMs and everything else run once over K*B images; only the per-channel normalisation is per view.
Outputs, gradients and running statistics are those of K sequential forwards (the running buffers
get the K updates in view order, exactly as K forwards make them). ``bn_mode="joint"`` keeps
timm's plain BatchNorm, whose statistics pool all K*B images. In eval mode both use running stats.

How, without copies. Eager: the native batch-norm kernel runs on each view's dim-0 slice (a free
view in NCHW and channels_last alike) and writes into that slice of one output tensor; the backward
fills the input gradient the same way (:class:`_PerViewBatchNormFn`). Compiled (``torch.compile``):
one ``var_mean`` over the ``(K, B, C, ...)`` view and one multiply-add, which the compiler fuses.
Either way no ``torch.cat`` of the K outputs or of their gradients (docs/benchmarks.md measures it).

SyncBatchNorm. ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` only swaps ``_BatchNorm`` layers;
``PerViewBatchNorm`` is deliberately not one, so torch's converter leaves a per-view model untouched
(it cannot silently turn per-view statistics into joint ones). Use ``convert_sync_batchnorm`` from
ensiam_fast/batchnorm_ops.py instead: it syncs plain BatchNorms through torch and per-view layers by
summing their per-view statistics over the process group. A per-view layer that runs in training under a
multi-process group without sync warns once.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


class _AllReduceSum(torch.autograd.Function):
    """Sum over the process group; its gradient is the summed gradient (every rank holds the sum)."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        out = tensor.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _per_view_count(x: torch.Tensor, k: int) -> int:
    """Values per channel in one view: what the batch statistics of one view average over."""
    return x.numel() // (k * x.shape[1]) if x.numel() else 0


_STAT_DTYPES: dict[tuple, torch.dtype] = {}


def _stat_dtype(x: torch.Tensor, weight, running_mean) -> torch.dtype:
    """The dtype the native kernel gives its saved mean/invstd for these argument dtypes.

    The ``out=`` variants insist on it, and it differs by backend (CPU: the parameters' dtype;
    CUDA: float32 for half inputs), so one tiny call per combination asks the kernel itself."""
    key = (
        x.device.type,
        x.dtype,
        None if weight is None else weight.dtype,
        None if running_mean is None else running_mean.dtype,
    )
    if key not in _STAT_DTYPES:
        w = None if weight is None else weight.detach()[:1]
        rm = None if running_mean is None else running_mean[:1].clone()
        rv = None if running_mean is None else torch.ones_like(rm)
        _, mean, _ = torch.native_batch_norm(
            x.new_zeros(2, 1), w, None if w is None else torch.zeros_like(w), rm, rv, True, 0.0, 1e-5
        )
        _STAT_DTYPES[key] = mean.dtype
    return _STAT_DTYPES[key]


class _PerViewBatchNormFn(torch.autograd.Function):
    """K native batch-norm kernels over the K dim-0 slices, each writing its slice of ONE output.

    A view is a contiguous slice along dim 0 (NCHW and channels_last alike), so every kernel reads
    its view in place and writes straight into its slice of the output (``out=``), and the backward
    writes each view's input gradient into its slice the same way: no ``torch.cat`` copy of the
    activations or of their gradients. Passing the running buffers with each view's factor makes the
    K updates exactly those of K sequential forwards."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, factors, eps):
        k, c = len(factors), x.shape[1]
        out = torch.empty_like(x)
        stat_dtype = _stat_dtype(x, weight, running_mean)
        save_mean = x.new_empty((k, c), dtype=stat_dtype)
        save_invstd = x.new_empty((k, c), dtype=stat_dtype)
        for i, (view, out_view) in enumerate(zip(x.chunk(k), out.chunk(k))):
            torch.ops.aten.native_batch_norm.out(view, weight, bias, running_mean, running_var, True,
                                                 factors[i], eps, out=out_view, save_mean=save_mean[i],
                                                 save_invstd=save_invstd[i])  # fmt: skip
        ctx.save_for_backward(x, weight, save_mean, save_invstd)
        ctx.eps = eps
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight, save_mean, save_invstd = ctx.saved_tensors
        k, c = save_mean.shape
        # The kernel computes all three gradients from the same two reductions, so asking for the
        # parameter ones costs nothing; without affine parameters a weight of ones is the identity.
        w = weight if weight is not None else save_mean.new_ones(c)
        grad_in = torch.empty_like(x)
        grad_w, grad_b = w.new_empty((k, c)), w.new_empty((k, c))
        for i, (g, view, g_in) in enumerate(zip(grad_out.chunk(k), x.chunk(k), grad_in.chunk(k))):
            torch.ops.aten.native_batch_norm_backward.out(g, view, w, None, None, save_mean[i], save_invstd[i],
                                                          True, ctx.eps, [True, True, True], out0=g_in,
                                                          out1=grad_w[i], out2=grad_b[i])  # fmt: skip
        if weight is None:
            return grad_in, None, None, None, None, None, None
        return grad_in, grad_w.sum(0), grad_b.sum(0), None, None, None, None


class PerViewBatchNorm(nn.Module):
    """BatchNorm whose training statistics are computed per view group of a ``(K*B, C, ...)`` input.

    Same parameters, buffers and state-dict keys as ``nn.BatchNorm{1,2,3}d`` (so checkpoints and
    exported backbones do not care which was used). ``num_views`` (K) is set by
    :meth:`SiameseNet.set_views`; with ``num_views == 1`` this is exactly plain BatchNorm.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
    ):
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        self.num_views = 1
        self.sync = False
        self.process_group = None
        self._warned_unsynced = False
        self.stats_frozen = False  # set by freeze_running_stats: normalise, leave the running buffers
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features))
            self.register_buffer("running_var", torch.ones(num_features))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    @classmethod
    def from_batchnorm(cls, bn: nn.modules.batchnorm._BatchNorm) -> PerViewBatchNorm:
        """A per-view layer sharing ``bn``'s parameters and buffers (no copy)."""
        new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        if bn.affine:
            new.weight, new.bias = bn.weight, bn.bias
        if bn.track_running_stats:
            new.running_mean, new.running_var = bn.running_mean, bn.running_var
            new.num_batches_tracked = bn.num_batches_tracked
        new.train(bn.training)
        return new

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}, num_views={self.num_views}, "
            f"sync={self.sync}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"PerViewBatchNorm({self.num_features}) got input shape {tuple(x.shape)}")
        if not self.training and self.running_mean is not None:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        k = self.num_views
        if x.shape[0] % k:
            raise ValueError(f"batch of {x.shape[0]} images does not split into num_views={k} views")
        if _per_view_count(x, k) <= 1:  # as F.batch_norm: a variance of one value is meaningless
            raise ValueError(
                f"PerViewBatchNorm needs more than 1 value per channel in each of the {k} views "
                f"when training, got input size {tuple(x.shape)}"
            )
        if self.sync and dist.is_available() and dist.is_initialized():
            return self._synced_forward(x, k)
        self._warn_if_unsynced()
        if torch.compiler.is_compiling():
            return self._fused_forward(x, k)
        factors = tuple(self._next_factor() for _ in range(k))
        update = not self._frozen()  # a frozen forward passes no buffers: they cannot change
        return _PerViewBatchNormFn.apply(
            x, self.weight, self.bias, self.running_mean if update else None,
            self.running_var if update else None, factors, self.eps,
        )  # fmt: skip

    def _frozen(self) -> bool:
        """No running-statistics update now: frozen by :func:`freeze_running_stats`, or a gradient
        checkpoint re-running this forward in the backward pass (its first run made the update).
        While torch.compile traces, the backward-pass query is left out (it would break the graph)."""
        return self.stats_frozen or (not torch.compiler.is_compiling() and recomputing())

    def _next_factor(self) -> float:
        """Plain BatchNorm's update factor for one training forward (counts the forward)."""
        if not self.training or self.num_batches_tracked is None or self._frozen():
            return 0.0
        self.num_batches_tracked.add_(1)
        if self.momentum is None:  # cumulative moving average
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum

    def _fused_forward(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """Under ``torch.compile``: per-view statistics by one reduction over the ``(K, B, C, ...)``
        view and one elementwise normalisation, which the compiler fuses (forward and backward).
        The native kernels' in-place slices cannot be traced (they mutate the buffers K times)."""
        if x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            # NHWC memory: (K, B*H*W, C) is a free view, so the reduction runs over rows of
            # contiguous channels instead of striding across them.
            xv = x.permute(0, 2, 3, 1).reshape(k, -1, x.shape[1]).float()  # (K, B*H*W, C)
            var, mean = torch.var_mean(xv, dim=1, correction=0, keepdim=True)
            self._update_running(mean, var, _per_view_count(x, k))
            y = self._normalize(xv, mean, var).to(x.dtype)
            return y.view(x.shape[0], x.shape[2], x.shape[3], x.shape[1]).permute(0, 3, 1, 2)
        xv = x.view(k, x.shape[0] // k, *x.shape[1:]).float()  # (K, B, C, *spatial)
        var, mean = torch.var_mean(xv, dim=(1,) + tuple(range(3, xv.ndim)), correction=0, keepdim=True)
        self._update_running(mean, var, _per_view_count(x, k))
        return self._normalize(xv, mean, var).to(x.dtype).view(x.shape)

    def _synced_forward(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """Per-view statistics summed over the process group (count, sum x, sum x^2), in float32."""
        xv = x.view(k, x.shape[0] // k, *x.shape[1:])  # (K, B, C, *spatial)
        dims = (1,) + tuple(range(3, xv.ndim))
        xf = xv.float()
        local = torch.stack([xf.sum(dim=dims, keepdim=True), (xf * xf).sum(dim=dims, keepdim=True)])
        count = torch.full((1,), float(_per_view_count(x, k)), device=x.device)
        total = _AllReduceSum.apply(torch.cat([local.flatten(), count]), self.process_group)
        n = total[-1]  # stays a tensor: no host sync
        moments = total[:-1].view_as(local) / n
        mean = moments[0]  # (K, 1, C, 1...)
        var = (moments[1] - mean * mean).clamp_min(0.0)  # biased
        self._update_running(mean, var, n)
        return self._normalize(xf, mean, var).to(x.dtype).view(x.shape)

    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, n) -> None:
        """K C-sized updates in view order, as K sequential forwards make them (unbiased variance)."""
        if not self.training or self.running_mean is None or self._frozen():
            return
        k = mean.shape[0]
        with torch.no_grad():
            unbiased = var.reshape(k, -1) * (n / (n - 1))
            for i in range(k):
                factor = self._next_factor()
                self.running_mean.lerp_(mean.reshape(k, -1)[i].to(self.running_mean.dtype), factor)
                self.running_var.lerp_(unbiased[i].to(self.running_var.dtype), factor)

    def _normalize(self, xf: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / sqrt(var + eps) * weight + bias`` on a float view with channels in dim 2
        (``(K, B, C, ...)`` or ``(K, B*H*W, C)``), as one multiply-add with per-(view, channel) scale and shift."""
        scale = torch.rsqrt(var + self.eps)  # (K, 1, C, 1...)
        if self.weight is not None:
            shape = (1, 1, self.num_features) + (1,) * (xf.ndim - 3)
            scale = scale * self.weight.view(shape).float()
            return torch.addcmul(self.bias.view(shape).float() - mean * scale, xf, scale)
        return torch.addcmul(-mean * scale, xf, scale)

    def _warn_if_unsynced(self) -> None:
        if (
            self.training
            and not self._warned_unsynced
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size() > 1
        ):
            self._warned_unsynced = True
            warnings.warn(
                "per-view BatchNorm runs unsynced across processes: its statistics use each "
                "process's local batch. Set model.sync_bn=true to sync them (in code: "
                "ensiam_fast.batchnorm_ops.convert_sync_batchnorm; torch's converter leaves per-view layers).",
                stacklevel=3,
            )


class PerViewBatchNormAct(PerViewBatchNorm):
    """timm's ``BatchNormAct2d`` (BatchNorm, then its ``drop`` and ``act`` layers) with per-view
    statistics: the same state-dict keys, the drop and activation modules kept as they were."""

    def __init__(self, *args, **kwargs):
        """``PerViewBatchNorm``'s arguments; drop and act start as identities (``from_batchnorm`` takes timm's)."""
        super().__init__(*args, **kwargs)
        self.drop, self.act = nn.Identity(), nn.Identity()

    @classmethod
    def from_batchnorm(cls, bn: nn.modules.batchnorm._BatchNorm) -> PerViewBatchNormAct:
        new = super().from_batchnorm(bn)
        new.drop, new.act = bn.drop, bn.act
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


def recomputing() -> bool:
    """True while autograd runs a backward pass on this thread, where a forward can only be a
    gradient checkpoint re-running a segment (reentrant and non-reentrant alike)."""
    return torch._C._current_graph_task_id() != -1
