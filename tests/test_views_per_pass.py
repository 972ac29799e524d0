"""views_per_pass and grad_checkpointing: the fused step's loss, gradients and BatchNorm state."""

from __future__ import annotations

import copy

import pytest
import torch

from ensiam_fast.batchnorm import PerViewBatchNorm, recomputing
from ensiam_fast.batchnorm_ops import freeze_running_stats
from ensiam_fast.methods import build_method, train_views
from ensiam_fast.models import enable_grad_checkpointing

TINY = dict(backbone="test_resnet", cifar_stem=True, proj_hidden=32, proj_dim=16, pred_hidden=8)
CASES = [("simsiam", 2)] + [(m, k) for m in ("ensiam", "simsiam_kaug", "fastsiam") for k in (2, 4, 8)]
# K=8 steps take several seconds each on a loaded 2-core machine: the slow suite runs them
CASES = [pytest.param(m, k, marks=pytest.mark.slow) if k == 8 else (m, k) for m, k in CASES]


def _method(name: str, k: int, checkpointing: bool = False):
    torch.manual_seed(0)
    method = build_method(name, k, **TINY)
    if checkpointing:
        enable_grad_checkpointing(method.model)
    return method.train()


def _step(method, x, views_per_pass):
    """One forward/backward of ``method`` on a copy of itself; its loss, gradients and buffers."""
    method = copy.deepcopy(method)
    out = train_views(method, method, x, views_per_pass, lambda loss: loss.backward())
    grads = {n: p.grad.clone() for n, p in method.named_parameters()}
    return out, grads, {n: b.clone() for n, b in method.named_buffers()}


def _assert_same_step(a, b):
    (out_a, grads_a, bufs_a), (out_b, grads_b, bufs_b) = a, b
    torch.testing.assert_close(out_b["loss"], out_a["loss"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out_b["collapse_std"], out_a["collapse_std"], rtol=1e-5, atol=1e-7)
    for name, g in grads_a.items():
        err = (grads_b[name] - g).norm() / g.norm().clamp_min(1e-12)
        assert err <= 1e-5, f"{name}: relative gradient error {err:.2e}"
    assert bufs_a.keys() == bufs_b.keys()
    for name, buf in bufs_a.items():
        torch.testing.assert_close(bufs_b[name], buf, rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("name,k", CASES)
def test_chunks_give_the_fused_step(name, k):
    method = _method(name, k)
    x = torch.randn(k, 4, 3, 8, 8)
    fused = _step(method, x, k)
    # every per-view BatchNorm counted K training forwards: one per view, as K separate forwards
    layers = [m for m in method.modules() if isinstance(m, PerViewBatchNorm)]
    assert layers and all(b == k for n, b in fused[2].items() if n.endswith("num_batches_tracked"))
    for n in sorted({1, k // 2}):
        _assert_same_step(fused, _step(method, x, n))


def test_chunks_differ_when_stats_update_twice(monkeypatch):
    """The check above can fail: a chunk pass that also updates the running statistics is caught."""
    import ensiam_fast.methods as methods

    method, x = _method("ensiam", 2), torch.randn(2, 4, 3, 8, 8)
    fused = _step(method, x, 2)
    monkeypatch.setattr(methods, "freeze_running_stats", lambda module: _Nothing())
    with pytest.raises(AssertionError, match="running_mean|num_batches_tracked|running_var"):
        _assert_same_step(fused, _step(method, x, 1))


class _Nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("name,k", [("ensiam", 4), ("simsiam_kaug", 4), ("fastsiam", 2)])
def test_grad_checkpointing_gives_the_fused_step(name, k):
    x = torch.randn(k, 4, 3, 8, 8)
    plain = _step(_method(name, k), x, k)
    checkpointed = _method(name, k, checkpointing=True)
    assert checkpointed.model.backbone.grad_checkpointing
    _assert_same_step(plain, _step(checkpointed, x, k))  # BatchNorm updated once, not again in the recompute
    _assert_same_step(plain, _step(checkpointed, x, k // 2 if k > 2 else 1))  # and combined with chunks


@pytest.mark.parametrize("bn_mode", ["per_view", "joint"])
def test_recompute_does_not_update_running_stats(bn_mode):
    """The re-run of a checkpointed stage happens inside backward, and leaves the buffers alone."""
    torch.manual_seed(0)
    method = build_method("ensiam", 2, **{**TINY, "bn_mode": bn_mode}).train()
    enable_grad_checkpointing(method.model)
    seen = []
    bn = method.model.backbone.layer1[0].bn1
    bn.register_forward_hook(lambda m, a, o: seen.append((recomputing(), int(m.num_batches_tracked))))
    method(torch.randn(2, 4, 3, 8, 8))["loss"].backward()
    # the first forward (outside backward) counts; the recompute (inside backward) does not
    first = 2 if bn_mode == "per_view" else 1
    assert seen == [(False, first), (True, first)]


def test_freeze_running_stats_restores_flags():
    method = _method("ensiam", 2)
    before = {n: b.clone() for n, b in method.named_buffers()}
    with freeze_running_stats(method):
        method(torch.randn(2, 4, 3, 8, 8))
    for n, b in method.named_buffers():
        assert torch.equal(b, before[n]), n
    assert not any(m.stats_frozen for m in method.modules() if isinstance(m, PerViewBatchNorm))
    method(torch.randn(2, 4, 3, 8, 8))
    assert any(not torch.equal(b, before[n]) for n, b in method.named_buffers())


def test_chunk_arguments_checked():
    method = _method("ensiam", 4)
    with pytest.raises(ValueError, match="does not divide"):
        train_views(method, method, torch.randn(4, 4, 3, 8, 8), 3, lambda loss: loss.backward())


# The trainer end to end (in process, DALI on the CPU): a CPU-sized network, batch 8 at 16x16.
RUN = [
    "--config", "demo", "batch_size=8", "max_steps=3", "log_every=1", "knn_every=0", "data.image_size=16",
    "data.num_threads=1", "model.proj_hidden=32", "model.proj_dim=32", "model.pred_hidden=8",
    "model.channels_last=false", "model.cifar_stem=true", "optim.warmup_epochs=1", "mixed_precision=no",
    # timm's test_resnet (was the demo's resnet18): still a ResNet with BatchNorm after every convolution
    # and timm's gradient checkpointing, so the view split, per-view BN and checkpointing are all
    # exercised, at a small fraction of resnet18's CPU time for each of the five runs
    "model.backbone=test_resnet",
]  # fmt: skip


def _losses(tmp_path, tiny_dataset, name, *extra):
    import json

    from ensiam_fast import train

    out = tmp_path / name
    assert train.main([*RUN, f"output_dir={out}", f"data.root={tiny_dataset}", *extra]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r], [r["collapse_std"] for r in rows if "loss" in r]


@pytest.mark.slow
def test_trainer_three_steps_same_losses(tmp_path, tiny_dataset):
    """Three optimizer steps of the real trainer: fused, one view per pass, two per pass with gradient
    accumulation (against the fused run with the same accumulation), two per pass with checkpointing."""
    views = 4
    base = ("method=ensiam", f"views={views}")
    fused = _losses(tmp_path, tiny_dataset, "fused", *base)
    assert len(fused[0]) == 3
    for name, extra in [
        ("one", ["views_per_pass=1"]),
        ("half", [f"views_per_pass={views // 2}", "gradient_accumulation_steps=2"]),
        ("ckpt", ["model.grad_checkpointing=true", f"views_per_pass={views // 2}"]),
    ]:
        if "gradient_accumulation_steps=2" in extra:  # its own fused baseline: the batches split in two
            expected = _losses(tmp_path, tiny_dataset, name + "-fused", *base, "gradient_accumulation_steps=2")
        else:
            expected = fused
        got = _losses(tmp_path, tiny_dataset, name, *base, *extra)
        # losses are cosines in [-1, 1]: near 0 the relative tolerance needs an absolute floor
        assert got[0] == pytest.approx(expected[0], rel=1e-5, abs=1e-6), name
        assert got[1] == pytest.approx(expected[1], rel=1e-5, abs=1e-6), name


def test_auto_trials_leave_the_model_as_it_was():
    from ensiam_fast import memory

    method, x = _method("ensiam", 4), torch.randn(4, 4, 3, 8, 8)
    before = copy.deepcopy(method.state_dict())
    peaks = memory.trial_peaks(method, x, budget=None)
    assert list(peaks) == [1, 2, 4] and all(p > 0 for p in peaks.values())
    assert all(p.grad is None for p in method.parameters())
    for key, value in method.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert list(memory.trial_peaks(method, x, budget=1)) == [1]  # over budget: no larger trial
    # the largest that fits; 1 when none does
    assert memory.choose({1: 10, 2: 20, 4: 40}, 30) == 2
    assert memory.choose({1: 10, 2: 20, 4: 40}, 5) == 1
    assert memory.choose({1: 10, 2: None}, None) == 1


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["views_per_pass=3"], "views_per_pass=3 must be null, auto or a divisor of views=4"),
        (["views_per_pass=2", "model.bn_mode=joint"], "needs model.bn_mode=per_view"),
        (["views_per_pass=auto", "memory_budget_gb=-1"], "memory_budget_gb=-1"),
    ],
)
def test_bad_views_per_pass_is_one_line(tmp_path, capsys, extra, needle):
    from ensiam_fast import train

    assert train.main([*RUN, f"output_dir={tmp_path / 'r'}", "views=4", *extra]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.startswith("error:") and not (tmp_path / "r").exists()


@pytest.mark.slow
def test_trainer_auto_prints_its_choice(tmp_path, tiny_dataset, capsys):
    from ensiam_fast import train

    argv = [*RUN, f"output_dir={tmp_path / 'r'}", f"data.root={tiny_dataset}", "views=4", "max_steps=1"]
    assert train.main([*argv, "views_per_pass=auto"]) == 2  # a CPU has no free memory to read: a budget is needed
    assert "needs memory_budget_gb" in capsys.readouterr().err
    assert train.main([*argv, "views_per_pass=auto", "memory_budget_gb=64"]) == 0
    out = capsys.readouterr().out
    assert out.count("views_per_pass=auto: 4 of 4 views per pass") == 1
