"""Losses: hand computations on tiny tensors, independent loop references, gradients, registry."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ensiam_fast.losses import (
    LOSSES,
    TARGETS,
    collapse_std,
    ensiam_loss,
    fastsiam_loss,
    get_loss,
    negative_cosine,
    simsiam_kaug_loss,
    simsiam_loss,
)


def np_cos(a, b):
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


# K=2 views, B=2 samples, D=4: small integers so the numbers below can be checked by hand.
P = np.array([[[1, 0, 0, 0], [1, 1, 0, 0]], [[0, 1, 0, 0], [0, 0, 1, 1]]], dtype=np.float64)
Z = np.array([[[1, 1, 0, 0], [0, 0, 0, 2]], [[1, -1, 0, 0], [2, 0, 0, 0]]], dtype=np.float64)


def t(a):
    return torch.tensor(a, dtype=torch.float64)


def test_negative_cosine_by_hand():
    got = negative_cosine(t([[1.0, 0, 0, 0], [1, 1, 0, 0]]), t([[1.0, 1, 0, 0], [0, 0, 0, 2]]))
    assert torch.allclose(got, t([-1 / math.sqrt(2), 0.0]))


def test_ensiam_by_hand():
    # f_bar: sample 0 -> [1, 0, 0, 0]; sample 1 -> [1, 0, 0, 1].
    # cos: view0: [1,0,0,0].[1,0,0,0] = 1; [1,1,0,0].[1,0,0,1] = 1/2
    #      view1: [0,1,0,0].[1,0,0,0] = 0; [0,0,1,1].[1,0,0,1] = 1/2
    expected = -(1 + 0.5 + 0 + 0.5) / 4
    assert ensiam_loss(t(P), t(Z)).item() == pytest.approx(expected)


def test_simsiam_kaug_k2_by_hand_equals_official_formula():
    # view0 vs z1: [1,0,0,0].[1,-1,0,0] = 1/sqrt2; [1,1,0,0].[2,0,0,0] = 1/sqrt2
    # view1 vs z0: [0,1,0,0].[1,1,0,0] = 1/sqrt2; [0,0,1,1].[0,0,0,2] = 1/sqrt2
    assert simsiam_kaug_loss(t(P), t(Z)).item() == pytest.approx(-1 / math.sqrt(2))
    p1, p2, z1, z2 = t(P[0]), t(P[1]), t(Z[0]), t(Z[1])
    official = (
        -(F.cosine_similarity(p1, z2.detach(), dim=-1).mean() + F.cosine_similarity(p2, z1.detach(), dim=-1).mean())
        * 0.5
    )
    assert torch.allclose(simsiam_kaug_loss(t(P), t(Z)), official)
    assert torch.allclose(simsiam_loss(t(P), t(Z)), official)


def reference_losses(p, z):
    """Loops over views and samples in numpy: the three targets written out independently."""
    k, b, _ = p.shape
    ens = kaug = loo = 0.0
    for i in range(k):
        partner = i + 1 if i % 2 == 0 else i - 1
        for s in range(b):
            ens += -np_cos(p[i, s], z[:, s].mean(axis=0))
            if k % 2 == 0:
                kaug += -np_cos(p[i, s], z[partner, s])
            others = [z[j, s] for j in range(k) if j != i]
            loo += -np_cos(p[i, s], np.mean(others, axis=0))
    return ens / (k * b), kaug / (k * b), loo / (k * b)


@pytest.mark.parametrize("k", [2, 3, 4, 6])
def test_losses_match_loop_reference(k):
    rng = np.random.default_rng(k)
    p, z = rng.normal(size=(k, 5, 7)), rng.normal(size=(k, 5, 7))
    ens, kaug, loo = reference_losses(p, z)
    assert ensiam_loss(t(p), t(z)).item() == pytest.approx(ens, rel=1e-12)
    assert fastsiam_loss(t(p), t(z)).item() == pytest.approx(loo, rel=1e-12)
    if k % 2 == 0:
        assert simsiam_kaug_loss(t(p), t(z)).item() == pytest.approx(kaug, rel=1e-12)


def test_fastsiam_k2_equals_simsiam():
    p, z = torch.randn(2, 8, 16), torch.randn(2, 8, 16)
    assert torch.allclose(fastsiam_loss(p, z), simsiam_loss(p, z), atol=1e-7)


def test_ensiam_differs_from_kaug_for_k4():
    p, z = torch.randn(4, 8, 16), torch.randn(4, 8, 16)
    assert not torch.allclose(ensiam_loss(p, z), simsiam_kaug_loss(p, z))


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_gradient_reaches_p_only(name):
    p = torch.randn(2, 3, 8, requires_grad=True)
    z = torch.randn(2, 3, 8, requires_grad=True)
    LOSSES[name](p, z).backward()
    assert z.grad is None
    assert p.grad is not None and p.grad.abs().sum() > 0


def test_gradient_through_shared_branch_is_prediction_path_only():
    # p and z both come from w; the loss's gradient must be that of the p path alone.
    w = torch.randn(4, 4, requires_grad=True)
    x = torch.randn(2, 3, 4)
    z = x @ w
    p = torch.tanh(z)
    ensiam_loss(p, z).backward()
    w2 = w.detach().clone().requires_grad_()
    target = (x @ w.detach()).mean(0, keepdim=True)
    (-F.cosine_similarity(torch.tanh(x @ w2), target, dim=-1).mean()).backward()
    assert torch.allclose(w.grad, w2.grad)


def test_one_sgd_step_matches_reference():
    # Parameters after a step driven by ensiam_loss equal those from the hand-written mean target.
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 5)
    ref = torch.nn.Linear(6, 5)
    ref.load_state_dict(lin.state_dict())
    x = torch.randn(3, 4, 6)
    z = torch.randn(3, 4, 5)
    for model, loss_of in [
        (lin, lambda q: ensiam_loss(q, z)),
        (ref, lambda q: sum(-F.cosine_similarity(q[i], z.mean(0), dim=-1).mean() for i in range(3)) / 3),
    ]:
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        loss_of(model(x)).backward()
        opt.step()
    assert torch.allclose(lin.weight, ref.weight, atol=1e-6)
    assert torch.allclose(lin.bias, ref.bias, atol=1e-6)


def test_collapse_std():
    d = 256
    healthy = collapse_std(torch.randn(4096, d))
    assert healthy.item() == pytest.approx(1 / math.sqrt(d), rel=0.05)
    collapsed = collapse_std(torch.ones(2, 64, d) + 1e-4 * torch.randn(2, 64, d))
    assert collapsed.item() < 1e-3
    with pytest.raises(ValueError, match="samples x channels"):
        collapse_std(torch.randn(8))


@pytest.mark.parametrize("fn", [ensiam_loss, simsiam_kaug_loss, fastsiam_loss, simsiam_loss])
def test_shape_errors(fn):
    with pytest.raises(ValueError, match="ndim=2"):
        fn(torch.randn(2, 8), torch.randn(2, 8))
    with pytest.raises(ValueError, match=r"p \(2, 3, 8\) and z \(2, 3, 4\)"):
        fn(torch.randn(2, 3, 8), torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="K=1"):
        fn(torch.randn(1, 3, 8), torch.randn(1, 3, 8))


def test_odd_k_errors():
    with pytest.raises(ValueError, match="K=3"):
        simsiam_kaug_loss(torch.randn(3, 2, 4), torch.randn(3, 2, 4))
    with pytest.raises(ValueError, match="K=4"):
        simsiam_loss(torch.randn(4, 2, 4), torch.randn(4, 2, 4))


def test_registry():
    assert get_loss("ensiam", 4) is ensiam_loss
    assert get_loss("simsiam", 2) is simsiam_loss
    assert get_loss("simsiam_kaug", 4) is simsiam_kaug_loss
    assert get_loss("fastsiam", 3) is fastsiam_loss
    with pytest.raises(ValueError, match="Did you mean ensiam"):
        get_loss("emsiam", 4)
    with pytest.raises(ValueError, match="views=4"):
        get_loss("simsiam", 4)
    with pytest.raises(ValueError, match="views=3"):
        get_loss("simsiam_kaug", 3)
    with pytest.raises(ValueError, match="views=1"):
        get_loss("ensiam", 1)


def test_targets_are_what_the_losses_compare_with():
    """TARGETS (used by the gradient-variance analysis) hold exactly the target of every loss, by hand."""
    assert set(TARGETS) == set(LOSSES)
    z = torch.randn(4, 3, 5, requires_grad=True)
    p = torch.randn(4, 3, 5)
    torch.testing.assert_close(TARGETS["ensiam"](z), z.detach().mean(0, keepdim=True))
    torch.testing.assert_close(TARGETS["simsiam_kaug"](z), z.detach()[[1, 0, 3, 2]])
    others = torch.stack([(z.detach().sum(0) - z.detach()[k]) / 3 for k in range(4)])
    torch.testing.assert_close(TARGETS["fastsiam"](z), others)
    for method in ("ensiam", "simsiam_kaug", "fastsiam"):
        assert not TARGETS[method](z).requires_grad
        torch.testing.assert_close(LOSSES[method](p, z), negative_cosine(p, TARGETS[method](z)).mean())


def test_every_method_of_the_config_table_has_a_loss():
    from ensiam_fast.choices import METHODS
    from ensiam_fast.losses import LOSSES

    assert tuple(LOSSES) == METHODS
