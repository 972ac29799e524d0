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
from ensiam_fast.analysis.gradvar import (
    GradientDraws,
    PairedDraws,
    bootstrap_weights,
    mean_sq_from_moments,
    paired_ratio,
    trace_from_gram,
)
from ensiam_fast.checkpoint import save_checkpoint
from ensiam_fast.config import load_config
from ensiam_fast.models import build_model

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "grad_variance.py"


# ------------------------------------------------------------------ a gradient with known covariance


def gaussian_problem(seed: int = 0, mu: torch.Tensor | None = None):
    """L(theta) = |theta - xi|^2 / 2 with xi = mu + A eps at theta = 0: the gradient -xi has mean -mu
    (|E grad|^2 = |mu|^2) and covariance Sigma = A A^T exactly. theta is split into two groups (6 + 4
    coordinates)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(10, 10, generator=gen))[0]
    a = q @ torch.diag(torch.arange(1.0, 11.0).sqrt())  # eigenvalues 1..10: tr = 55
    sigma = a @ a.T
    mu = torch.zeros(10) if mu is None else mu
    theta_a, theta_b = nn.Parameter(torch.zeros(6)), nn.Parameter(torch.zeros(4))
    groups = {"a": [theta_a], "b": [theta_b]}

    def draws(m: int, gen: torch.Generator) -> GradientDraws:
        gd = GradientDraws(groups, m)
        for _ in range(m):
            xi = mu + a @ torch.randn(10, generator=gen)
            gd.add(0.5 * (torch.cat([theta_a, theta_b]) - xi).square().sum())
        return gd

    return sigma, draws


def within(estimates: list[float], truth: float, sd_one: float) -> bool:
    """The mean of independent estimates agrees with the truth within 4 standard errors
    (a false alarm about once in 16,000 seeds; the seeds here are fixed)."""
    return abs(np.mean(estimates) - truth) <= 4 * sd_one / np.sqrt(len(estimates))


def test_trace_estimate_agrees_with_the_closed_form_and_would_catch_a_bias():
    """Sizing: one estimate of tr Sigma = 55 has SD sqrt(2 tr(Sigma^2) / (M - 1)) = 9.25 at M = 10, so
    4 SE over 150 repetitions is 3.0; the mutation's bias tr / M = 5.5 is 7.3 SE, caught with
    probability 0.9995 (0.97 at 100 repetitions, so 150 it stays)."""
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
    """The 95% percentile interval covers the known trace in most repetitions (measured: 0.93 over
    1,500 repetitions at M=20 draws: a percentile interval for a variance is a little short); a wrong
    interval does not.

    Sizing: the mutation (half as wide about the point estimate) covers 0.646 of the time (measured
    over 1,500 repetitions). At 120 repetitions, as this test had, its share has an SD of 0.044, so
    the bound 0.7 was only 1.2 SD away: a false failure for about one seed in nine. At 600 the SD is
    0.020 and the bound 2.8 SD away (false failure 3e-3 a seed); the real interval's 0.93 sits 15 SD
    above its bound 0.78. A repetition costs 5 to 10 ms here."""
    sigma, draws = gaussian_problem(seed=2)
    truth = float(torch.trace(sigma))
    weights = bootstrap_weights(20, 500, np.random.default_rng(0))
    gen = torch.Generator().manual_seed(3)
    covered = narrow = 0
    reps = 600
    for _ in range(reps):
        s = draws(20, gen).summary(weights, 0.95)
        covered += s["ci_low"] <= truth <= s["ci_high"]
        half = (s["ci_high"] - s["ci_low"]) / 4  # the mutation: an interval half as wide
        narrow += s["grad_var_trace"] - half <= truth <= s["grad_var_trace"] + half
        assert s["ci_low"] <= s["ci_high"]  # (a percentile interval need not hold the point estimate)
    assert 0.78 <= covered / reps <= 0.995, covered / reps
    assert narrow / reps < 0.7, narrow / reps


MU = torch.tensor([3.0, -1.0, 0.0, 2.0, 1.0, 0.0, -2.0, 1.0, 0.0, 1.5])  # |mu|^2 = 22.25


def test_mean_grad_sq_is_unbiased_for_the_known_mean_and_the_plain_norm_is_not():
    """|E grad|^2 = |mu|^2 = 22.25 against tr Sigma = 55: the estimate's mean over 75 repetitions
    agrees within 4 standard errors; |mean of the draws|^2, which exceeds it by tr / M = 5.5 on
    average, is rejected by the same check. Sizing: one estimate's SD is 6.1 here (the formula
    below), so 4 SE at 75 repetitions is 2.8 and the plain norm's bias 7.8 SE: it slips through with
    probability 7e-5 (at 50 repetitions 9e-3). The 150 repetitions this test had made that 1e-12 at
    twice the cost; the bias itself (tr S / M per repetition, SD 0.93) is measured to 0.11, an eighth
    of the 25% allowed."""
    sigma, draws = gaussian_problem(seed=4, mu=MU)
    truth = float(MU.square().sum())
    m, reps = 10, 75
    weights = bootstrap_weights(m, 200, np.random.default_rng(0))
    gen = torch.Generator().manual_seed(5)
    est, plain, noise = [], [], []
    for _ in range(reps):
        s = draws(m, gen).summary(weights, 0.95)
        est.append(s["mean_grad_sq"])
        plain.append(s["mean_grad_sq_plain"])
        noise.append(s["relative_noise"])
        assert s["relative_noise"] == pytest.approx(s["grad_var_trace"] / s["mean_grad_sq"]) or s["mean_grad_sq"] <= 0
    # Gaussian draws: mean and sample covariance independent, |mean|^2 has variance
    # 2 tr(Sigma^2) / M^2 + 4 mu' Sigma mu / M and tr S / M has 2 tr(Sigma^2) / ((M - 1) M^2).
    tr2, mus = float(torch.trace(sigma @ sigma)), float(MU @ sigma @ MU)
    sd = np.sqrt(2 * tr2 / m**2 + 4 * mus / m + 2 * tr2 / ((m - 1) * m**2))
    assert within(est, truth, sd), (np.mean(est), truth)
    assert not within(plain, truth, sd), "the check must be able to fail"
    assert np.mean(plain) - np.mean(est) == pytest.approx(float(torch.trace(sigma)) / m, rel=0.25)


def test_mean_grad_sq_and_relative_noise_intervals_cover_the_known_values():
    """At M=32 draws (the tool's default) the 95% intervals of |E grad|^2 (22.25) and of the relative
    noise (55 / 22.25 = 2.47) cover the known values in most repetitions, and the point estimate lies
    inside its interval; an interval half as wide does not cover. Sizing (coverages measured over
    1,000 repetitions: 0.93 for both intervals, 0.64 for both halved ones): at 100 repetitions the
    real intervals' share (SD 0.025) sits 5.4 SD above its bound 0.8 and the halved ones' (SD 0.048)
    3.3 SD below it: false failures 4e-4 a seed, from the halved check."""
    sigma, draws = gaussian_problem(seed=6, mu=MU)
    truth = {"mean_grad_sq": float(MU.square().sum())}
    truth["relative_noise"] = float(torch.trace(sigma)) / truth["mean_grad_sq"]
    weights = bootstrap_weights(32, 500, np.random.default_rng(1))
    gen = torch.Generator().manual_seed(7)
    reps = 100
    covered = dict.fromkeys(truth, 0)
    narrow = dict.fromkeys(truth, 0)
    for _ in range(reps):
        s = draws(32, gen).summary(weights, 0.95)
        for key, value in truth.items():
            low, high, point = s[f"{key}_low"], s[f"{key}_high"], s[key]
            covered[key] += low <= value <= high
            narrow[key] += point - (point - low) / 2 <= value <= point + (high - point) / 2
            assert low <= point <= high, (key, low, point, high)
    for key in truth:
        assert 0.8 <= covered[key] / reps <= 1.0, (key, covered[key] / reps)
        assert narrow[key] / reps < 0.8, (key, narrow[key] / reps)


def test_paired_ratios_are_exact_for_a_scaled_gradient_and_track_a_known_mean():
    """Method b's gradient is c times method a's on every draw: the trace and |E grad|^2 ratios are
    c^2 exactly, the relative-noise ratio 1, with intervals collapsed on those values (paired
    resamples). With the same noise and the mean doubled, the trace ratio is 1 exactly and the
    relative-noise ratio near 1/4."""
    torch.manual_seed(8)
    c, m, d = 3.0, 32, 10
    mu = MU
    theta = nn.Parameter(torch.zeros(d))
    a_draws, b_draws, twice = (GradientDraws({"all": [theta]}, m) for _ in range(3))
    for _ in range(m):
        xi = mu + 2 * torch.randn(d)
        a_draws.add(0.5 * (theta - xi).square().sum())
        b_draws.add(0.5 * (c * theta - c * xi).square().sum() / c)  # gradient c (theta - xi)
        twice.add(0.5 * (theta - (xi + mu)).square().sum())  # the same noise around 2 mu
    weights = bootstrap_weights(m, 500, np.random.default_rng(2))
    expected = {"grad_var_trace": c**2, "mean_grad_sq": c**2, "relative_noise": 1.0}
    for key, value in expected.items():
        r = paired_ratio(b_draws, a_draws, weights, 0.95, key)
        assert r["ratio"] == pytest.approx(value, rel=1e-4), key
        assert r["ci_low"] == pytest.approx(value, rel=1e-3) and r["ci_high"] == pytest.approx(value, rel=1e-3)
    r = paired_ratio(twice, a_draws, weights, 0.95, "grad_var_trace")
    assert r["ratio"] == pytest.approx(1.0, rel=1e-4)
    r = paired_ratio(twice, a_draws, weights, 0.95, "relative_noise")
    assert r["ci_low"] <= r["ratio"] <= r["ci_high"] and r["ci_low"] < 0.25 * 1.6 and r["ci_high"] > 0.25 / 1.6
    mean_a = mean_sq_from_moments(a_draws.moments())
    assert paired_ratio(twice, a_draws, weights, 0.95, "mean_grad_sq")["ratio"] == pytest.approx(
        mean_sq_from_moments(twice.moments()) / mean_a
    )
    with pytest.raises(ValueError, match="ratio of 'loss'"):
        paired_ratio(twice, a_draws, weights, 0.95, "loss")


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
    # timm's test_resnet and the torch loader: the JSON contract and the plot do not depend on the
    # network's size, and a DALI child compiles its Numba operators again (about 14 s CPU)
    small = [*TINY, "model.backbone=test_resnet", "data.backend=torch"]
    proc = subprocess.run(
        [sys.executable, str(TOOL), *tool_args(tiny_dataset, plot), *small],
        capture_output=True,
        text=True,
        timeout=3600,  # seconds on an idle 2-core machine; the bound only catches a hang
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    record = json.loads(last, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    assert "draws:" in proc.stderr  # the progress bar
    rows = record["results"]
    assert [(r["method"], r["views"]) for r in rows] == [
        ("ensiam", 2), ("simsiam_kaug", 2), ("ensiam", 4), ("simsiam_kaug", 4)
    ]  # fmt: skip
    for r in rows:
        assert {"method", "views", "grad_var_trace", "ci_low", "ci_high", "target_var"} <= set(r)
        # strict JSON: an infinite relative noise or upper end (no mean above zero at M=3) is null
        for key in ("mean_grad_sq", "relative_noise"):
            high = float("inf") if r[f"{key}_high"] is None else r[f"{key}_high"]
            point = float("inf") if r[key] is None else r[key]
            assert r[f"{key}_low"] <= point <= high, (key, r)
        if r["mean_grad_sq"] > 0:
            assert r["relative_noise"] == pytest.approx(r["grad_var_trace"] / r["mean_grad_sq"])
        else:
            assert r["relative_noise"] is None
        assert 0 < r["grad_var_trace"] and r["ci_low"] <= r["grad_var_trace"] <= r["ci_high"]
        assert r["target_var"] > 0 and set(r["groups"]) == {"backbone", "projector", "predictor"}
    assert [c["views"] for c in record["comparisons"]] == [2, 4]
    for c in record["comparisons"]:
        for key in ("kaug_over_ensiam", "kaug_over_ensiam_mean_grad_sq", "kaug_over_ensiam_relative_noise"):
            assert {"ratio", "ci_low", "ci_high"} <= set(c[key]), (key, c)
    assert record["model"].startswith("random init") and record["draws"] == 3 and record["batch_size"] == 4
    image = mpimg.imread(plot)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 200
    assert image[..., :3].std() > 0.05  # something is drawn


@pytest.mark.slow  # the tool twice on a resnet18 (its command line in the fast suite: the bad-input test below)
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
        (["--views", "2,3"], "K must be even|even number of views|views must be even"),
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
