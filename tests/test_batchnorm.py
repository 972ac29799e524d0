"""Per-view BatchNorm layer: exact against K separate BatchNorm forwards, no concatenation copy,
the compiled formulation, timm's BatchNormAct2d backbones (EfficientNet, RegNet)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from ensiam_fast.batchnorm import PerViewBatchNorm, PerViewBatchNormAct
from ensiam_fast.batchnorm_ops import convert_per_view_bn
from ensiam_fast.losses import ensiam_loss
from ensiam_fast.models import build_model

K = 3
CASES = {  # name: (BatchNorm class, input shape, momentum, affine, channels_last)
    "2d": (nn.BatchNorm1d, (K * 4, 6), 0.1, True, False),
    "nchw": (nn.BatchNorm2d, (K * 2, 5, 4, 3), 0.1, True, False),
    "channels_last": (nn.BatchNorm2d, (K * 2, 5, 4, 3), 0.1, True, True),
    "cumulative_no_affine": (nn.BatchNorm2d, (K * 2, 5, 4, 3), None, False, False),
    "3d": (nn.BatchNorm3d, (K * 2, 4, 2, 3, 3), 0.3, True, False),
}


def make(case, seed=0):
    cls, shape, momentum, affine, channels_last = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    bn = cls(shape[1], momentum=momentum, affine=affine)
    if affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5, generator=gen)
            bn.bias.uniform_(-0.5, 0.5, generator=gen)
    x = torch.randn(shape, generator=gen) * 2 + 0.7
    grad = torch.randn(shape, generator=gen)
    if channels_last:
        x, grad = x.contiguous(memory_format=torch.channels_last), grad.contiguous(memory_format=torch.channels_last)
    return bn, x, grad


def run(layer, x, grad, steps=2):
    """``steps`` training forwards + backwards; returns output, input grad, parameter grads."""
    for _ in range(steps):
        layer.zero_grad()
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y.backward(grad)
    params = [p.grad for p in layer.parameters()]
    return y.detach(), xi.grad, params


def separate(bn, x, grad, steps=2):
    """The reference: plain BatchNorm called once per view, in view order (K sequential forwards)."""
    for _ in range(steps):
        bn.zero_grad()
        xi = x.clone().requires_grad_()
        ys = [bn(view) for view in xi.chunk(K)]
        torch.autograd.backward(ys, list(grad.chunk(K)))
    return torch.cat([y.detach() for y in ys]), xi.grad, [p.grad for p in bn.parameters()]


def assert_same(got, ref, bn_got, bn_ref, atol=1e-5):
    y, gx, gp = got
    y_ref, gx_ref, gp_ref = ref
    assert torch.allclose(y, y_ref, atol=atol)
    assert torch.allclose(gx, gx_ref, atol=atol)
    assert len(gp) == len(gp_ref)
    for a, b in zip(gp, gp_ref):
        assert torch.allclose(a, b, atol=atol * 10)
    for name, buf in bn_ref.named_buffers():
        mine = dict(bn_got.named_buffers())[name]
        assert torch.allclose(mine.float(), buf.float(), atol=atol), name


@pytest.mark.parametrize("case", sorted(CASES))
def test_equals_separate_forwards(case):
    bn, x, grad = make(case)
    layer = PerViewBatchNorm.from_batchnorm(copy.deepcopy(bn))
    layer.num_views = K
    got = run(layer, x, grad)
    ref = separate(bn, x, grad)
    assert_same(got, ref, layer, bn)
    assert int(layer.num_batches_tracked) == int(bn.num_batches_tracked) == 2 * K
    if CASES[case][4]:
        assert got[0].is_contiguous(memory_format=torch.channels_last)
        assert got[1].is_contiguous(memory_format=torch.channels_last)


class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("case", ["nchw", "channels_last", "2d"])
def test_no_concatenation_or_copy(case):
    # The point of the layer: K native kernels write straight into one output (and one input
    # gradient), so neither the activations nor their gradients are copied again.
    bn, x, grad = make(case)
    layer = PerViewBatchNorm.from_batchnorm(bn)
    layer.num_views = K
    xi = x.clone().requires_grad_()
    with OpLog() as log:
        layer(xi).backward(grad)
    full_size = [op for op in log.ops if op.startswith(("aten.cat", "aten.copy", "aten.clone", "aten.stack"))]
    assert not full_size, full_size
    assert log.ops.count("aten.native_batch_norm.out") == K
    assert log.ops.count("aten.native_batch_norm_backward.out") == K
    # The same check catches the old layer's concatenation (so it can fail):
    old = lambda v: torch.cat([nn.functional.batch_norm(c, None, None, None, None, True) for c in v.chunk(K)])  # noqa: E731
    with OpLog() as log:
        old(x)
    assert "aten.cat.default" in log.ops


@pytest.mark.parametrize("case", ["nchw", "channels_last", "cumulative_no_affine", "2d"])
def test_compiled_formulation_equals_separate_forwards(case):
    # The formulation torch.compile traces (one var_mean + one multiply-add), run eagerly here.
    bn, x, grad = make(case)
    layer = PerViewBatchNorm.from_batchnorm(copy.deepcopy(bn))
    layer.num_views = K
    layer.forward = lambda v: layer._fused_forward(v, K)
    assert_same(run(layer, x, grad), separate(bn, x, grad), layer, bn)


@pytest.mark.slow  # torch.compile's first compile in a process: 30 s to 100 s on the 2-core VM
@pytest.mark.parametrize("channels_last", [False, True])
def test_torch_compile_equals_eager(channels_last):
    # Under torch.compile the layer switches to the fused formulation: same outputs, gradients, buffers.
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
    convert_per_view_bn(eager)
    eager[1].num_views = 2
    if channels_last:
        eager = eager.to(memory_format=torch.channels_last)
    compiled_net = copy.deepcopy(eager)
    compiled = torch.compile(compiled_net)
    x = torch.randn(2 * 3, 3, 6, 6)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for _ in range(2):
        outs = []
        for net in (eager, compiled):
            y = net(x)
            y.square().sum().backward()
            outs.append(y.detach())
        assert torch.allclose(outs[0], outs[1], atol=1e-5)
    for (name, a), b in zip(eager.named_parameters(), compiled_net.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-4), name
    for (name, a), b in zip(eager.named_buffers(), compiled_net.buffers()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name


def test_batchnorm_act_layer_equals_separate_forwards():
    from timm.layers import BatchNormAct2d

    bn_act = BatchNormAct2d(5, act_layer=nn.SiLU)
    _, x, grad = make("channels_last")
    with torch.no_grad():
        bn_act.weight.uniform_(0.5, 1.5)
    layer = convert_per_view_bn(copy.deepcopy(bn_act))
    assert type(layer) is PerViewBatchNormAct and isinstance(layer.act, nn.SiLU)
    assert layer.state_dict().keys() == bn_act.state_dict().keys()
    layer.num_views = K
    assert_same(run(layer, x, grad), separate(bn_act, x, grad), layer, bn_act)


@pytest.mark.parametrize("backbone", ["efficientnet_b0", "regnety_002"])
def test_batchnorm_act_backbones_per_view(backbone):
    # timm builds these from BatchNormAct2d (BN + drop + activation in one module): every one becomes a
    # per-view layer keeping its activation, and the fused forward equals K separate forwards of the
    # joint-BN network (and differs from the joint forward by far more than the tolerance).
    torch.manual_seed(0)
    small = dict(backbone=backbone, cifar_stem=False, proj_hidden=32, proj_dim=16, pred_hidden=8)
    fused = build_model(bn_mode="per_view", **small)
    plain = build_model(bn_mode="joint", **small)
    plain.load_state_dict(fused.state_dict())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.modules())
    norm_act = [m for m in fused.modules() if isinstance(m, PerViewBatchNormAct)]
    plain_acts = [type(m.act) for m in plain.modules() if type(m).__name__ == "BatchNormAct2d"]
    assert norm_act and [type(m.act) for m in norm_act] == plain_acts
    assert any(not isinstance(m.act, nn.Identity) for m in norm_act)
    x = torch.randn(2, 4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    z, p = fused(x)
    outs = [plain(x[k : k + 1]) for k in range(2)]
    z_ref, p_ref = torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])
    # float32: the convolutions round differently for K*B and B images, which EfficientNet's late 1x1
    # stages (BatchNorm over 4 values) amplify to ~3e-4 in z (0.0 in float64); joint BN differs by ~1.
    assert torch.allclose(z, z_ref, atol=2e-3) and torch.allclose(p, p_ref, atol=2e-3)
    with torch.no_grad():
        z_joint, _ = copy.deepcopy(plain)(x.flatten(0, 1)[None])
    assert (z_joint.view_as(z) - z).abs().max() > 0.1
    ref_buffers = dict(plain.named_buffers())
    for name, buf in fused.named_buffers():
        assert torch.allclose(buf.float(), ref_buffers[name].float(), atol=1e-3), name
    if backbone == "regnety_002":  # EfficientNet's 1x1 stages make float32 gradients ill-conditioned
        ensiam_loss(p, z).backward()
        ensiam_loss(p_ref, z_ref).backward()
        ref = dict(plain.named_parameters())
        for name, param in fused.named_parameters():
            g = ref[name].grad
            assert torch.allclose(param.grad, g, rtol=1e-3, atol=1e-5 * g.abs().max()), name


def test_low_precision_module():
    # A bf16 module on bf16 input: the saved statistics take the kernel's own dtype (asked, not guessed).
    bn, x, grad = make("nchw")
    bn = bn.to(torch.bfloat16)
    layer = PerViewBatchNorm.from_batchnorm(copy.deepcopy(bn))
    layer.num_views = K
    got = run(layer, x.bfloat16(), grad.bfloat16(), steps=1)
    ref = separate(bn, x.bfloat16(), grad.bfloat16(), steps=1)
    assert got[0].dtype == torch.bfloat16
    assert_same(got, ref, layer, bn, atol=1e-2)


def test_errors():
    layer = PerViewBatchNorm(4)
    layer.num_views = 2
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(torch.randn(2, 4))
    with pytest.raises(ValueError, match="num_views=2"):
        layer(torch.randn(3, 4))
    from timm.layers import SyncBatchNormAct

    with pytest.raises(ValueError, match="SyncBatchNormAct"):
        convert_per_view_bn(nn.Sequential(SyncBatchNormAct(4)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", ["nchw", "channels_last", "2d", "cumulative_no_affine"])
def test_equals_separate_forwards_cuda(case):
    bn, x, grad = make(case)
    bn, x, grad = bn.cuda(), x.cuda(), grad.cuda()
    layer = PerViewBatchNorm.from_batchnorm(copy.deepcopy(bn))
    layer.num_views = K
    assert_same(run(layer, x, grad), separate(bn, x, grad), layer, bn, atol=1e-4)
    xi = x.clone().requires_grad_()
    with OpLog() as log:
        layer(xi).backward(grad)
    assert not [op for op in log.ops if op.startswith(("aten.cat", "aten.copy", "aten.clone"))]
    with torch.autocast("cuda", dtype=torch.bfloat16):  # half activations, float32 parameters and buffers
        got = run(layer, x.bfloat16(), grad.bfloat16(), steps=1)
        ref = separate(bn, x.bfloat16(), grad.bfloat16(), steps=1)
    assert got[0].dtype == torch.bfloat16
    assert_same(got, ref, layer, bn, atol=2e-2)
