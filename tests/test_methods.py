"""SSLMethod: the module the training loop calls without looking inside."""

from __future__ import annotations

import pytest
import torch

from ensiam_fast.losses import ensiam_loss, simsiam_kaug_loss
from ensiam_fast.methods import SSLMethod, build_method
from ensiam_fast.models import build_model

SMALL = dict(proj_hidden=64, proj_dim=32, pred_hidden=16)


@pytest.fixture(scope="module")
def ensiam():
    torch.manual_seed(0)
    return build_method("ensiam", 2, **SMALL)


def test_forward_dict(ensiam):
    x = torch.randn(2, 4, 3, 32, 32)
    out = ensiam(x)
    assert set(out) >= {"loss", "collapse_std"}
    assert out["loss"].ndim == 0 and out["loss"].requires_grad
    assert out["collapse_std"].ndim == 0 and not out["collapse_std"].requires_grad
    # The loss is the registry's loss applied to the model's own outputs.
    ensiam.eval()
    with torch.no_grad():
        z, p = ensiam.model(x)
        assert torch.allclose(ensiam(x)["loss"], ensiam_loss(p, z))
    ensiam.train()


def test_param_groups_cover_every_parameter_once(ensiam):
    groups = ensiam.param_groups(0.05, fix_pred_lr=True)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in ensiam.parameters())
    by_name = {g["name"]: g for g in groups}
    assert by_name["predictor"]["fix_lr"] is True and by_name["encoder"]["fix_lr"] is False
    assert {id(p) for p in by_name["predictor"]["params"]} == {id(p) for p in ensiam.model.predictor.parameters()}
    assert all(g["lr"] == 0.05 for g in groups)
    assert not any(g["fix_lr"] for g in ensiam.param_groups(0.05, fix_pred_lr=False))
    torch.optim.SGD(groups, lr=0.05)  # accepted by an optimizer as is


def test_built_model_and_method_choice():
    model = build_model(**SMALL)
    method = build_method("simsiam_kaug", 4, model=model)
    assert method.model is model and method.loss_fn is simsiam_kaug_loss
    assert isinstance(method, SSLMethod)


def test_errors():
    with pytest.raises(ValueError, match="views=3"):
        build_method("simsiam", 3, **SMALL)
    with pytest.raises(ValueError, match="unknown method"):
        build_method("byol", 2, **SMALL)
    with pytest.raises(ValueError, match="not both"):
        build_method("ensiam", 2, model=build_model(**SMALL), proj_dim=8)
    method = build_method("ensiam", 4, **SMALL)
    with pytest.raises(ValueError, match=r"4 views shaped \(K, B, 3, H, W\), got \(2, 4, 3, 32, 32\)"):
        method(torch.randn(2, 4, 3, 32, 32))
