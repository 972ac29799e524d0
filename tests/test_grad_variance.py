"""ensiam_fast.analysis.gradvar and tools/grad_variance.py: the estimator on problems with a known
answer, then the tool end to end on tiny shards (random init and a checkpoint), and its bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest
import torch
import torch.nn as nn

from ensiam_fast.analysis import gradvar_cli
from ensiam_fast.analysis.gradvar import GradientDraws, PairedDraws, bootstrap_weights, trace_from_gram
from ensiam_fast.checkpoint import save_checkpoint
from ensiam_fast.config import load_config
from ensiam_fast.models import build_model

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "grad_variance.py"


# ------------------------------------------------------------------ a gradient with known covariance


def gaussian_problem(seed: int = 0):
    """L(theta) = |theta - xi|^2 / 2 with xi = A eps: the gradient theta - xi has covariance
    Sigma = A A^T exactly. theta is split into two groups (6 + 4 coordinates)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(10, 10, generator=gen))[0]
    a = q @ torch.diag(torch.arange(1.0, 11.0).sqrt())  # eigenvalues 1..10: tr = 55
    sigma = a @ a.T
    theta_a, theta_b = nn.Parameter(torch.zeros(6)), nn.Parameter(torch.zeros(4))
    groups = {"a": [theta_a], "b": [theta_b]}

    def draws(m: int, gen: torch.Generator) -> GradientDraws:
        gd = GradientDraws(groups, m)
        for _ in range(m):
            xi = a @ torch.randn(10, generator=gen)
            gd.add(0.5 * (torch.cat([theta_a, theta_b]) - xi).square().sum())
        return gd

    return sigma, draws


def within(estimates: list[float], truth: float, sd_one: float) -> bool:
    """The mean of independent estimates agrees with the truth within 4 standard errors
    (a false alarm about once in 16,000 seeds; the seeds here are fixed)."""
    return abs(np.mean(estimates) - truth) <= 4 * sd_one / np.sqrt(len(estimates))


def test_trace_estimate_agrees_with_the_closed_form_and_would_catch_a_bias():
    sigma, draws = gaussian_problem()
    m, reps = 10, 150
    gen = torch.Generator().manual_seed(1)
    total, part_a, part_b, biased = [], [], [], []
    for _ in range(reps):
        gd = draws(m, gen)
        total.append(trace_from_gram(gd.gram()))
        part_a.append(trace_from_gram(gd.grams["a"].matrix()))
        part_b.append(trace_from_gram(gd.grams["b"].matrix()))
        biased.append(total[-1] * (m - 1) / m)  # the mutation: dividing by M instead of M - 1
    # For Gaussian draws Var[tr S] = 2 tr(Sigma^2) / (M - 1) (S: the unbiased sample covariance).
    for est, block in ((total, sigma), (part_a, sigma[:6, :6]), (part_b, sigma[6:, 6:])):
        truth, sd = float(torch.trace(block)), float(np.sqrt(2 * float(torch.trace(block @ block)) / (m - 1)))
        assert within(est, truth, sd), (np.mean(est), truth)
    sd = float(np.sqrt(2 * float(torch.trace(sigma @ sigma)) / (m - 1)))
    assert not within(biased, float(torch.trace(sigma)), sd), "the check must be able to fail"


def test_bootstrap_interval_covers_the_true_trace():
    """The 95% percentile interval covers the known trace in most repetitions (measured: 0.91 over 300
    repetitions at M=20 draws: a percentile interval for a variance is a little short); a wrong
    interval does not."""
    sigma, draws = gaussian_problem(seed=2)
    truth = float(torch.trace(sigma))
    weights = bootstrap_weights(20, 500, np.random.default_rng(0))
    gen = torch.Generator().manual_seed(3)
    covered = narrow = 0
    reps = 120
    for _ in range(reps):
        s = draws(20, gen).summary(weights, 0.95)
        covered += s["ci_low"] <= truth <= s["ci_high"]
        half = (s["ci_high"] - s["ci_low"]) / 4  # the mutation: an interval half as wide
        narrow += s["grad_var_trace"] - half <= truth <= s["grad_var_trace"] + half
        assert s["ci_low"] <= s["grad_var_trace"] <= s["ci_high"] or s["ci_low"] <= s["ci_high"]
    assert 0.78 <= covered / reps <= 0.995, covered / reps
    assert narrow / reps < 0.7, narrow / reps


class IndependentViews(nn.Module):
    """z = the input (identity backbone and projector), p = a linear predictor of z."""

    def __init__(self, dim: int):
        super().__init__()
        self.backbone = nn.Linear(dim, dim, bias=False)
        self.projector = nn.Linear(dim, dim, bias=False)
        self.predictor = nn.Linear(dim, dim)
        with torch.no_grad():
            self.backbone.weight.copy_(torch.eye(dim))
            self.projector.weight.copy_(torch.eye(dim))

    def forward(self, x):
        z = self.projector(self.backbone(x))
        return z, self.predictor(z)


def test_target_variance_is_the_partner_variance_and_k_times_smaller_for_the_mean():
    """Equation (9)'s Var[b] with independent views of variance sigma^2 per coordinate: the K-aug
    partner has D sigma^2, EnSiam's K-view mean D sigma^2 / K."""
    torch.manual_seed(0)
    k, b, d, m, sigma = 4, 8, 16, 40, 0.5
    model = IndependentViews(d)
    centres = 3 * torch.randn(1, b, d)  # the fixed images
    paired = PairedDraws(model, ["ensiam", "simsiam_kaug"], k, m)
    for _ in range(m):
        paired.add(centres + sigma * torch.randn(k, b, d))
    weights = bootstrap_weights(m, 400, np.random.default_rng(0))
    got = {r["method"]: r for r in paired.results(weights, 0.95)}
    truth = {"simsiam_kaug": d * sigma**2, "ensiam": d * sigma**2 / k}
    for method, rows in (("simsiam_kaug", k * b), ("ensiam", b)):
        # the estimate averages `rows` independent per-vector traces, each with sd sqrt(2 D / (M-1)) sigma^2
        sd = sigma**2 * np.sqrt(2 * d / (m - 1) / rows)
        assert abs(got[method]["target_var"] - truth[method]) < 5 * sd, (method, got[method]["target_var"])
        assert got[method]["target_var_ci_low"] <= got[method]["target_var"] <= got[method]["target_var_ci_high"]
    # every result carries the contract's fields, the interval around the point estimate
    for r in got.values():
        assert r["ci_low"] <= r["grad_var_trace"] <= r["ci_high"]
        assert set(r["groups"]) == {"backbone", "projector", "predictor"}
        assert abs(sum(g["trace"] for g in r["groups"].values()) - r["grad_var_trace"]) < 1e-6 * r["grad_var_trace"]


# ------------------------------------------------------------------ the tool, end to end

TINY = ["model.proj_hidden=32", "model.proj_dim=32", "model.pred_hidden=8", "data.image_size=16"]


def tool_args(data: Path, plot: Path, *extra: str) -> list[str]:
    return [
        "--data", str(data), "--views", "2,4", "--draws", "3", "--batch-size", "4", "--seed", "1",
        "--bootstrap", "200", "--threads", "1", "--plot", str(plot), *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_tool_end_to_end_json_contract_and_plot(tiny_dataset, tmp_path):
    plot = tmp_path / "gv.png"
    proc = subprocess.run(
        [sys.executable, str(TOOL), *tool_args(tiny_dataset, plot), *TINY],
        capture_output=True,
        text=True,
        timeout=3600,  # seconds on an idle 2-core machine; the bound only catches a hang
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "draws:" in proc.stderr  # the progress bar
    rows = record["results"]
    assert [(r["method"], r["views"]) for r in rows] == [
        ("ensiam", 2), ("simsiam_kaug", 2), ("ensiam", 4), ("simsiam_kaug", 4)
    ]  # fmt: skip
    for r in rows:
        assert {"method", "views", "grad_var_trace", "ci_low", "ci_high", "target_var"} <= set(r)
        assert 0 < r["grad_var_trace"] and r["ci_low"] <= r["grad_var_trace"] <= r["ci_high"]
        assert r["target_var"] > 0 and set(r["groups"]) == {"backbone", "projector", "predictor"}
    assert [c["views"] for c in record["comparisons"]] == [2, 4]
    assert record["model"].startswith("random init") and record["draws"] == 3 and record["batch_size"] == 4
    image = mpimg.imread(plot)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 200
    assert image[..., :3].std() > 0.05  # something is drawn


def test_checkpoint_of_the_same_weights_gives_the_same_numbers(tiny_dataset, tmp_path, capsys):
    """--run loads the network strictly: a checkpoint of the random init with the same seed measures
    exactly what the random init measures (same views, same weights)."""
    cfg = load_config("demo", TINY)
    torch.manual_seed(1)
    m = cfg.model
    model = build_model(backbone=m.backbone, cifar_stem=m.cifar_stem, proj_layers=m.proj_layers, bn_mode=m.bn_mode,
                        proj_hidden=m.proj_hidden, proj_dim=m.proj_dim, pred_hidden=m.pred_hidden)  # fmt: skip
    run = tmp_path / "run"
    save_checkpoint(
        run, {"step": 7, "epoch": 0, "batch_in_epoch": 7, "config": cfg.to_dict(), "model": model.state_dict()}
    )
    args = ["--views", "2", "--quiet"]
    assert gradvar_cli.main(tool_args(tiny_dataset, tmp_path / "a.png", *args, *TINY)) == 0
    fresh = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert gradvar_cli.main(tool_args(tiny_dataset, tmp_path / "b.png", *args, "--run", str(run))) == 0
    loaded = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "step 7" in loaded["model"]
    for a, b in zip(fresh["results"], loaded["results"], strict=True):
        assert a["grad_var_trace"] == pytest.approx(b["grad_var_trace"], rel=1e-5)
        assert a["target_var"] == pytest.approx(b["target_var"], rel=1e-5)


def test_bad_input_is_one_error_line_and_exit_2(tiny_dataset, tmp_path, capsys):
    planted = tmp_path / "step-00000001.pt"
    planted.write_bytes(b"not a checkpoint")
    plot = tmp_path / "never.png"
    cases = [
        (["--data", str(tmp_path / "missing")], "dataset directory"),
        (["--views", "2,3"], "K must be even|even number of views"),
        (["--views", "two"], "--views must be comma-separated integers"),
        (["--draws", "2"], "--draws must be at least 3"),
        (["--checkpoint", str(planted)], "cannot read checkpoint"),
        (["--batch-size", "500"], "batch_size 500 is larger"),
    ]
    for extra, message in cases:
        argv = [*tool_args(tiny_dataset, plot), *extra, "--quiet"]
        argv += [] if "--checkpoint" in extra else TINY
        assert gradvar_cli.main(argv) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err
        assert __import__("re").search(message, err[0]), err[0]
    assert not plot.exists()
    # odd K is fine for EnSiam alone
    assert gradvar_cli.parse_views("3,5") == (3, 5)
