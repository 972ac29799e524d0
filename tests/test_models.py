"""SiameseNet: CIFAR stem, heads, the fused per-view forward against K separate forwards, SyncBN."""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from ensiam_fast.batchnorm import PerViewBatchNorm
from ensiam_fast.batchnorm_ops import convert_per_view_bn, convert_sync_batchnorm
from ensiam_fast.losses import ensiam_loss
from ensiam_fast.models import build_model

SMALL = dict(proj_hidden=64, proj_dim=32, pred_hidden=16)
K, B = 3, 4


@pytest.fixture(scope="module")
def built():
    torch.manual_seed(0)
    fused = build_model(bn_mode="per_view", **SMALL)
    plain = build_model(bn_mode="joint", **SMALL)
    plain.load_state_dict(fused.state_dict())
    return fused, plain


@pytest.fixture
def pair(built):
    """A per-view model and a plain-BN (joint) model holding the same weights (fresh copies)."""
    return lambda channels_last=False: _copies(*built, channels_last)


def _copies(fused, plain, channels_last):
    fused, plain = copy.deepcopy(fused), copy.deepcopy(plain)
    if channels_last:
        fused, plain = fused.to(memory_format=torch.channels_last), plain.to(memory_format=torch.channels_last)
    return fused, plain


def separate_forwards(model, x):
    """The reference: K separate forwards of B images each, as official SimSiam does."""
    outs = [model(x[k : k + 1]) for k in range(x.shape[0])]
    return torch.cat([z for z, _ in outs]), torch.cat([p for _, p in outs])


def views(k=K, b=B, seed=1):
    return torch.randn(k, b, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_cifar_stem_shapes():
    model = build_model(**SMALL)
    conv = model.backbone.conv1
    assert (conv.kernel_size, conv.stride, conv.padding, conv.bias) == ((3, 3), (1, 1), (1, 1), None)
    assert isinstance(model.backbone.maxpool, nn.Identity)
    x = torch.randn(B, 3, 32, 32)
    assert model.backbone.forward_features(x).shape == (B, 512, 4, 4)
    model.eval()
    assert model.features(x).shape == (B, model.feature_dim) == (B, 512)
    standard = build_model(cifar_stem=False, **SMALL)
    assert standard.backbone.forward_features(x).shape == (B, 512, 1, 1)
    assert (model.backbone_name, model.cifar_stem, standard.cifar_stem) == ("resnet18", True, False)


def test_heads_structure():
    model = build_model(proj_layers=3, **SMALL)
    linears = [m for m in model.projector if isinstance(m, nn.Linear)]
    norms = [m for m in model.projector if isinstance(m, PerViewBatchNorm)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 64), (64, 64), (64, 32)]
    assert all(m.bias is None for m in linears)
    assert len(norms) == 3 and norms[-1].weight is None and norms[0].weight is not None
    pred = [m for m in model.predictor if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in pred] == [(32, 16), (16, 32)]
    assert pred[0].bias is None and pred[1].bias is not None
    z, p = model(views())
    assert z.shape == p.shape == (K, B, 32)
    # features() normalises its N images together (train mode too) and leaves K as it was.
    assert model.features(torch.randn(5, 3, 32, 32)).shape == (5, 512)
    assert {m.num_views for m in model.modules() if isinstance(m, PerViewBatchNorm)} == {K}


@pytest.mark.parametrize("channels_last", [False, True])
def test_per_view_equals_separate_forwards(channels_last, pair):
    fused, plain = pair(channels_last)
    x = views(k=2 if channels_last else K)
    if channels_last:
        x = x.flatten(0, 1).contiguous(memory_format=torch.channels_last).view(x.shape)
    z, p = fused(x)
    z_ref, p_ref = separate_forwards(plain, x)
    assert torch.allclose(z, z_ref, atol=1e-4) and torch.allclose(p, p_ref, atol=1e-4)
    ensiam_loss(p, z).backward()
    ensiam_loss(p_ref, z_ref).backward()
    ref_params = dict(plain.named_parameters())
    for name, param in fused.named_parameters():
        ref = ref_params[name].grad
        assert torch.allclose(param.grad, ref, rtol=1e-3, atol=1e-5 * ref.abs().max()), name
    ref_buffers = dict(plain.named_buffers())
    for name, buf in fused.named_buffers():
        assert torch.allclose(buf.float(), ref_buffers[name].float(), atol=1e-5), name
    assert int(fused.backbone.bn1.num_batches_tracked) == x.shape[0]


def test_sgd_step_matches_loop_over_views(pair):
    fused, plain = pair()
    x = views(k=2)
    for model, run in [(fused, fused), (plain, lambda v: separate_forwards(plain, v))]:
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        z, p = run(x)
        ensiam_loss(p, z).backward()
        opt.step()
    ref = dict(plain.named_parameters())
    for name, param in fused.named_parameters():
        assert torch.allclose(param, ref[name], atol=1e-5), name


def test_joint_differs_in_train_matches_in_eval(pair):
    fused, plain = pair()
    x = views(k=2)
    z_pv, _ = fused(x)
    z_joint, _ = plain(x)
    assert not torch.allclose(z_pv, z_joint, atol=1e-3)
    # The two modes also updated their running stats differently: give both the same ones.
    plain.load_state_dict(fused.state_dict())
    fused.eval()
    plain.eval()
    with torch.no_grad():
        assert torch.allclose(fused(x)[1], plain(x)[1], atol=1e-5)


def test_running_stats_cumulative_momentum():
    # momentum=None (cumulative average) depends on the count: K per-view updates must count K forwards.
    bn = nn.BatchNorm2d(5, momentum=None)
    ref = copy.deepcopy(bn)
    per_view = PerViewBatchNorm.from_batchnorm(bn)
    per_view.num_views = 3
    x = torch.randn(3 * 4, 5, 6, 6) * 3 + 1
    for _ in range(2):
        per_view(x)
        for chunk in x.chunk(3):
            ref(chunk)
    assert torch.allclose(per_view.running_mean, ref.running_mean)
    assert torch.allclose(per_view.running_var, ref.running_var)
    assert int(per_view.num_batches_tracked) == int(ref.num_batches_tracked) == 6


def test_bf16_autocast_forward(pair):
    fused, plain = pair()
    x = views(k=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, p = fused(x)
        z_ref, p_ref = separate_forwards(plain, x)
    assert z.dtype == torch.bfloat16 and torch.isfinite(z.float()).all()
    assert torch.allclose(p.float(), p_ref.float(), atol=0.1)


def test_errors():
    with pytest.raises(ValueError, match="resnet18"):
        build_model(backbone="resnet1B")
    with pytest.raises(ValueError, match="bn_mode"):
        build_model(bn_mode="perview")
    with pytest.raises(ValueError, match="cifar_stem.*VisionTransformer"):  # a family without a CIFAR stem
        build_model(backbone="vit_tiny_patch16_224", cifar_stem=True, **SMALL)
    model = build_model(**SMALL)
    with pytest.raises(ValueError, match=r"\(K, B, 3, H, W\)"):
        model(torch.randn(4, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        model.features(views())
    layer = PerViewBatchNorm(4)
    layer.num_views = 3
    with pytest.raises(ValueError, match="num_views=3"):
        layer(torch.randn(4, 4))
    with pytest.raises(ValueError, match="SyncBatchNorm"):
        convert_per_view_bn(nn.Sequential(nn.SyncBatchNorm(4)))


def test_torch_sync_conversion_leaves_per_view_layers(pair):
    fused, plain = pair()
    torch_converted = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(fused))
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in torch_converted.modules())
    ours = convert_sync_batchnorm(copy.deepcopy(fused))
    flags = [m.sync for m in ours.modules() if isinstance(m, PerViewBatchNorm)]
    assert flags and all(flags)
    joint = convert_sync_batchnorm(plain)
    assert any(isinstance(m, nn.SyncBatchNorm) for m in joint.modules())


def _rank_slice(t, rank, world):
    """Rank's share of every view of a (2*B, ...) batch, as a (2*B/world, ...) batch."""
    per_view = t.view(2, -1, *t.shape[1:])
    half = per_view.shape[1] // world
    return per_view[:, rank * half : (rank + 1) * half].reshape(-1, *t.shape[1:])


def _synced_worker(rank, world, port, x, upstream, out_queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    layer = PerViewBatchNorm(x.shape[1])
    layer.weight.data.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(0))
    layer.num_views, layer.sync = 2, True
    local = _rank_slice(x, rank, world).clone().requires_grad_()
    y = layer(local)
    y.backward(_rank_slice(upstream, rank, world))
    # numpy, not tensors: torch's queue shares tensors through the sender's memory, gone once it exits
    out_queue.put(
        (
            rank,
            *(
                t.detach().numpy().copy()
                for t in (y, local.grad, layer.weight.grad, layer.running_mean, layer.running_var)
            ),
        )
    )
    dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes in a gloo group (distributed)
def test_synced_per_view_matches_single_process():
    # Two ranks, each holding half of every view, must normalise as one process holding all of it.
    x = torch.randn(2 * 8, 3, 4, 4) * 2 + 0.5
    upstream = torch.randn_like(x)  # the gradient arriving from the layers above
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_synced_worker, args=(r, 2, port, x, upstream, queue)) for r in range(2)]
    for proc in procs:
        proc.start()
    results = {r[0]: [torch.from_numpy(a) for a in r[1:]] for r in (queue.get(timeout=120) for _ in procs)}
    for proc in procs:
        proc.join(timeout=60)
    ref = PerViewBatchNorm(3)
    ref.weight.data.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(0))
    ref.num_views = 2
    xr = x.clone().requires_grad_()
    y = ref(xr)
    y.backward(upstream)
    for rank, (y_loc, g_loc, _, r_mean, r_var) in results.items():
        assert torch.allclose(y_loc, _rank_slice(y.detach(), rank, 2), atol=1e-5)
        assert torch.allclose(g_loc, _rank_slice(xr.grad, rank, 2), atol=1e-4)
        assert torch.allclose(r_mean, ref.running_mean, atol=1e-5)
        assert torch.allclose(r_var, ref.running_var, atol=1e-5)
    # Each rank's weight gradient covers its own samples; DDP would sum (average) them.
    assert torch.allclose(results[0][2] + results[1][2], ref.weight.grad, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_per_view_equals_separate_forwards_cuda(pair):
    fused, plain = (m.cuda() for m in pair())
    x = views(k=2).cuda()
    z, p = fused(x)
    z_ref, p_ref = separate_forwards(plain, x)
    assert torch.allclose(z, z_ref, atol=1e-3) and torch.allclose(p, p_ref, atol=1e-3)
    ensiam_loss(p, z).backward()
    ensiam_loss(p_ref, z_ref).backward()
    ref = dict(plain.named_parameters())
    for name, param in fused.named_parameters():
        assert torch.allclose(param.grad, ref[name].grad, rtol=1e-2, atol=1e-3 * ref[name].grad.abs().max()), name
