"""Gradient variance of EnSiam and SimSiam K-aug, measured: the paper's Section 3.3 (equations 6-9).

For a fixed network and a fixed batch of B images, M independent draws of K augmented views go
through one forward each; on the same views (paired draws) the parameter gradient of every
method's loss is taken, and the trace of its covariance over the draws is estimated, in total and
per parameter group (backbone, projector, predictor), with a bootstrap interval.

Equation (8) splits Var[Gamma(a, b)] into a part that does not depend on the target b and one that
grows with Var[b]. Equation (9): SimSiam K-aug's target is one sampled partner f_N(k), with Var[f];
EnSiam's is the K-view mean, with about Var[f] / K, so EnSiam's gradient variance should be the
smaller. ``target_var`` is the measured Var[b]: the trace of a target vector's covariance over the
draws, averaged over the target vectors (one per image for EnSiam, one per view and image for K-aug).

The trace alone ignores the size of the gradient, so each result also carries ``mean_grad_sq``, an
unbiased estimate of |E grad|^2 (the squared norm of the mean gradient over the draws, less its
noise term tr / M), and ``relative_noise`` = trace / mean_grad_sq: how noisy one draw's gradient is
against the gradient it estimates (infinite when no mean is measured above the noise). Both come
with bootstrap intervals (``_low``/``_high``) and as paired K-aug/EnSiam ratios.

The estimator (:class:`DrawGram`) keeps every draw, centred on the first (the covariance does not
change under a shift, and centring keeps float32 inner products free of cancellation), their Gram
matrix and each draw's product with the first (:class:`Moments`): the unbiased trace, the mean's
squared norm and every bootstrap replicate are functions of those alone.
Memory: draws x parameters x 4 bytes per method.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from ensiam_fast.losses import LOSSES, TARGETS, get_loss

GROUPS = ("backbone", "projector", "predictor")


class DrawGram:
    """Draws of one random vector and their Gram matrix; ``trace()`` estimates tr Cov."""

    def __init__(self, dim: int, max_draws: int, device: torch.device | str = "cpu"):
        if max_draws < 2:
            raise ValueError(f"a covariance needs at least 2 draws, got {max_draws}")
        self.rows = torch.empty(max_draws, dim, dtype=torch.float32, device=device)
        self.gram = np.zeros((max_draws, max_draws))
        self.n = 0
        self.origin: torch.Tensor | None = None
        self.origin_sq = 0.0
        self.origin_dots = np.zeros(max_draws)  # origin . (v_m - origin), per draw

    def add(self, v: torch.Tensor) -> None:
        if self.n == len(self.rows):
            raise ValueError(f"DrawGram holds at most {len(self.rows)} draws")
        v = v.detach().reshape(-1).to(self.rows)
        if self.origin is None:
            self.origin = v.clone()
            self.origin_sq = float(v.double().square().sum())
        h = v - self.origin
        self.rows[self.n] = h
        dots = (self.rows[: self.n + 1] @ h).double().cpu().numpy()
        self.gram[self.n, : self.n + 1] = dots
        self.gram[: self.n + 1, self.n] = dots
        self.origin_dots[self.n] = float(self.origin.double() @ h.double())
        self.n += 1

    def matrix(self) -> np.ndarray:
        return self.gram[: self.n, : self.n]

    def moments(self) -> Moments:
        return Moments(self.matrix(), self.origin_sq, self.origin_dots[: self.n].copy())


@dataclass
class Moments:
    """What every estimate of one random vector needs, from its draws v_m = origin + h_m: the Gram
    matrix of the h_m, |origin|^2 and origin . h_m. Moments of disjoint coordinates (parameter
    groups) add up to the moments of the whole vector."""

    gram: np.ndarray
    origin_sq: float
    origin_dots: np.ndarray

    def __add__(self, other: Moments) -> Moments:
        return Moments(self.gram + other.gram, self.origin_sq + other.origin_sq, self.origin_dots + other.origin_dots)

    def resampled_mean_sq(self, weights: np.ndarray) -> np.ndarray:
        """|mean of the resampled draws|^2 per row of ``weights`` (counts over the draws)."""
        n = len(self.gram)
        s2 = np.einsum("ri,ij,rj->r", weights, self.gram, weights, optimize=True)
        return self.origin_sq + 2 * (weights @ self.origin_dots) / n + s2 / n**2


def trace_from_gram(gram: np.ndarray) -> float:
    """Unbiased tr Cov from the Gram matrix of the draws: (sum_m |h_m|^2 - |sum_m h_m|^2 / M) / (M - 1)."""
    n = len(gram)
    if n < 2:
        raise ValueError(f"a covariance needs at least 2 draws, got {n}")
    return float((np.trace(gram) - gram.sum() / n) / (n - 1))


def mean_sq_from_moments(mo: Moments) -> float:
    """Unbiased |E v|^2: |mean of the draws|^2 - tr Cov / M (the plain |mean|^2 exceeds |E v|^2 by
    tr Cov / M on average: with a noisy gradient and few draws that is most of it). Can come out
    below zero when the mean is small against the noise."""
    n = len(mo.gram)
    plain = float(mo.resampled_mean_sq(np.ones((1, n)))[0])
    return plain - trace_from_gram(mo.gram) / n


def bootstrap_weights(n: int, reps: int, rng: np.random.Generator) -> np.ndarray:
    """(reps, n) multinomial counts: each row is one resample of the n draws with replacement."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=reps).astype(np.float64)


def bootstrap_traces(gram: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The trace estimate of every resample (rows of ``weights``), from the Gram matrix alone.

    Each is scaled by n / (n - 1): a resample's unbiased covariance estimates the covariance of the
    resampled draws, which is (n - 1) / n of the estimate, and with many coordinates that bias is
    larger than the spread, so unscaled percentiles can miss the estimate altogether."""
    n = len(gram)
    s1 = weights @ np.diag(gram)
    s2 = np.einsum("ri,ij,rj->r", weights, gram, weights, optimize=True)
    return (s1 - s2 / n) * n / (n - 1) ** 2


def bootstrap_mean_sq(mo: Moments, weights: np.ndarray, traces: np.ndarray | None = None) -> np.ndarray:
    """The |E v|^2 estimate of every resample, centred on ``mean_sq_from_moments``.

    A resample's |mean|^2 exceeds the sample's |mean|^2 by (n-1)/n tr / n on average, and the
    estimate sits tr / n below it: each replicate subtracts (2n - 1)/n of its own (scaled, see
    ``bootstrap_traces``) trace / n, so that the replicates average the estimate."""
    n = len(mo.gram)
    traces = bootstrap_traces(mo.gram, weights) if traces is None else traces
    return mo.resampled_mean_sq(weights) - (2 * n - 1) / n * traces / n


def noise_ratio(trace: np.ndarray | float, mean_sq: np.ndarray | float) -> np.ndarray:
    """tr Cov / |E v|^2, infinite where the mean's estimate is not above zero (no signal measured)."""
    trace, mean_sq = np.asarray(trace, dtype=float), np.asarray(mean_sq, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(mean_sq > 0, trace / np.where(mean_sq > 0, mean_sq, 1.0), np.inf)


def interval(samples: np.ndarray, level: float) -> tuple[float, float]:
    """The percentile interval holding ``level`` of the bootstrap samples."""
    tail = (1.0 - level) / 2 * 100
    with np.errstate(invalid="ignore"):  # inf - inf (infinite replicates) gives nan: read as inf
        low, high = np.percentile(samples, [tail, 100 - tail])
    return float(np.inf if np.isnan(low) else low), float(np.inf if np.isnan(high) else high)


def flat_size(params: Iterable[nn.Parameter]) -> int:
    return sum(p.numel() for p in params)


class GradientDraws:
    """The gradient of one loss per draw, accumulated per parameter group."""

    def __init__(self, groups: dict[str, list[nn.Parameter]], max_draws: int):
        self.groups = groups
        self.params = [p for ps in groups.values() for p in ps]
        device = self.params[0].device
        self.grams = {name: DrawGram(flat_size(ps), max_draws, device) for name, ps in groups.items()}
        self.losses: list[float] = []

    def add(self, loss: torch.Tensor, retain_graph: bool = False) -> None:
        grads = torch.autograd.grad(loss, self.params, retain_graph=retain_graph, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads)]
        start = 0
        for name, ps in self.groups.items():
            self.grams[name].add(torch.cat([g.reshape(-1) for g in grads[start : start + len(ps)]]))
            start += len(ps)
        self.losses.append(float(loss.detach()))

    def gram(self) -> np.ndarray:
        return sum(g.matrix() for g in self.grams.values())

    def moments(self) -> Moments:
        parts = [g.moments() for g in self.grams.values()]
        return sum(parts[1:], parts[0])

    def replicates(self, weights: np.ndarray) -> dict[str, np.ndarray]:
        """Bootstrap replicates of the trace, |E grad|^2 and their ratio (the same resamples)."""
        mo = self.moments()
        traces = bootstrap_traces(mo.gram, weights)
        mean_sq = bootstrap_mean_sq(mo, weights, traces)
        return {"grad_var_trace": traces, "mean_grad_sq": mean_sq, "relative_noise": noise_ratio(traces, mean_sq)}

    def summary(self, weights: np.ndarray, level: float) -> dict:
        """Trace of the gradient covariance, total and per group, each with its bootstrap interval;
        the squared norm of the mean gradient and the relative noise (trace / that), with theirs."""
        total = self.gram()
        reps = self.replicates(weights)
        low, high = interval(reps["grad_var_trace"], level)
        trace = trace_from_gram(total)
        mean_sq = mean_sq_from_moments(self.moments())
        m_low, m_high = interval(reps["mean_grad_sq"], level)
        r_low, r_high = interval(reps["relative_noise"], level)
        groups = {}
        for name, g in self.grams.items():
            g_low, g_high = interval(bootstrap_traces(g.matrix(), weights), level)
            groups[name] = {"trace": trace_from_gram(g.matrix()), "ci_low": g_low, "ci_high": g_high}
        return {
            "grad_var_trace": trace,
            "ci_low": low,
            "ci_high": high,
            "groups": groups,
            "mean_grad_sq": mean_sq,
            "mean_grad_sq_low": m_low,
            "mean_grad_sq_high": m_high,
            "relative_noise": float(noise_ratio(trace, mean_sq)),
            "relative_noise_low": r_low,
            "relative_noise_high": r_high,
            "mean_grad_sq_plain": mean_sq + trace / len(total),  # |mean of the draws|^2, biased up
            "loss_mean": float(np.mean(self.losses)),
        }


def model_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """The SiameseNet's trainable parameters by part, in ``GROUPS`` order."""
    return {name: [p for p in getattr(model, name).parameters() if p.requires_grad] for name in GROUPS}


class PairedDraws:
    """Per draw: one forward of the K views, then every method's gradient and target on those views."""

    def __init__(self, model: nn.Module, methods: list[str], views: int, max_draws: int):
        for method in methods:
            get_loss(method, views)  # a method that cannot take K views fails before any work
        self.model, self.methods, self.views = model, list(methods), views
        groups = model_groups(model)
        self.grads = {m: GradientDraws(groups, max_draws) for m in self.methods}
        self.targets: dict[str, DrawGram] = {}
        self.target_rows: dict[str, int] = {}
        self.max_draws = max_draws

    def add(self, x: torch.Tensor) -> None:
        """``x``: normalised float views (K, B, 3, H, W) of the fixed batch."""
        z, p = self.model(x)  # (K, B, D) each
        z, p = z.float(), p.float()  # the loss in float32, as the trainer's method module does
        for i, method in enumerate(self.methods):
            self.grads[method].add(LOSSES[method](p, z), retain_graph=i + 1 < len(self.methods))
            target = TARGETS[method](z)  # (1 or K, B, D), detached
            if method not in self.targets:
                self.targets[method] = DrawGram(target.numel(), self.max_draws, target.device)
                self.target_rows[method] = target.shape[0] * target.shape[1]
            self.targets[method].add(target)

    def results(self, weights: np.ndarray, level: float) -> list[dict]:
        out = []
        for method in self.methods:
            rows = self.target_rows[method]
            tgram = self.targets[method].matrix()
            t_low, t_high = interval(bootstrap_traces(tgram, weights) / rows, level)
            out.append(
                {
                    "method": method,
                    "views": self.views,
                    **self.grads[method].summary(weights, level),
                    "target_var": trace_from_gram(tgram) / rows,
                    "target_var_ci_low": t_low,
                    "target_var_ci_high": t_high,
                }
            )
        return out

    def ratio(self, numerator: str, denominator: str, weights: np.ndarray, level: float, key: str) -> dict:
        return paired_ratio(self.grads[numerator], self.grads[denominator], weights, level, key)


RATIO_KEYS = ("grad_var_trace", "mean_grad_sq", "relative_noise")


def paired_ratio(num: GradientDraws, den: GradientDraws, weights: np.ndarray, level: float, key: str) -> dict:
    """num's ``key`` (one of RATIO_KEYS) / den's, with a paired bootstrap: the same resamples of the
    same draws for both, so what the two share (the views) does not widen the interval."""
    if key not in RATIO_KEYS:
        raise ValueError(f"ratio of {key!r}: one of {', '.join(RATIO_KEYS)}")
    points = []
    for draws in (num, den):
        trace = trace_from_gram(draws.gram())
        mean_sq = mean_sq_from_moments(draws.moments())
        points.append(
            {"grad_var_trace": trace, "mean_grad_sq": mean_sq, "relative_noise": float(noise_ratio(trace, mean_sq))}[
                key
            ]
        )
    a, b = num.replicates(weights)[key], den.replicates(weights)[key]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = a / b  # relative noise: infinite over finite is infinite, finite over infinite 0
        ratio = float(np.float64(points[0]) / np.float64(points[1]))
    # no ratio from a resample without spread (one repeated draw), a mean not above zero (trace,
    # mean_grad_sq), or two infinite relative noises
    keep = ~np.isnan(ratios) if key == "relative_noise" else (b > 0) & np.isfinite(ratios)
    low, high = interval(ratios[keep], level) if keep.any() else (float("nan"), float("nan"))
    if key != "relative_noise" and not points[1] > 0:
        ratio = float("nan")
    return {"ratio": ratio, "ci_low": low, "ci_high": high, "resamples_used": int(keep.sum())}


@dataclass
class Settings:
    views: tuple[int, ...] = (2, 4, 8)
    methods: tuple[str, ...] = ("ensiam", "simsiam_kaug")
    draws: int = 32
    seed: int = 0
    bootstrap: int = 2000
    level: float = 0.95


def check_settings(s: Settings) -> None:
    """Every setting checked before any data is read or network built."""
    if s.draws < 3:
        raise ValueError(f"--draws must be at least 3 (a covariance and its bootstrap), got {s.draws}")
    if s.bootstrap < 100:
        raise ValueError(f"--bootstrap must be at least 100 resamples, got {s.bootstrap}")
    if not 0.5 <= s.level < 1:
        raise ValueError(f"--level must be in [0.5, 1), got {s.level}")
    if not s.views:
        raise ValueError("--views needs at least one K")
    if len(set(s.views)) != len(s.views):
        raise ValueError(f"--views lists a K twice: {','.join(map(str, s.views))}")
    for method in s.methods:
        for k in s.views:
            try:
                get_loss(method, k)
            except ValueError as e:
                raise ValueError(f"--views {','.join(map(str, s.views))}: {e}") from None


def measure(
    model: nn.Module,
    draw_views: Callable[[int, int], torch.Tensor],
    s: Settings,
    on_draw: Callable[[], None] = lambda: None,
) -> dict:
    """Paired draws for every K; ``draw_views(K, m)`` gives draw m's normalised views of the fixed batch.

    The network is in training mode (per-view BatchNorm statistics, as in training) and left
    unchanged: its running statistics are restored after the draws.
    """
    check_settings(s)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    rng = np.random.default_rng([s.seed, 0xB007])
    weights = bootstrap_weights(s.draws, s.bootstrap, rng)  # shared by every K and method: paired
    results, comparisons = [], []
    try:
        for k in s.views:
            paired = PairedDraws(model, list(s.methods), k, s.draws)
            for m in range(s.draws):
                paired.add(draw_views(k, m))
                on_draw()
            results += paired.results(weights, s.level)
            if {"ensiam", "simsiam_kaug"} <= set(s.methods):
                comparisons.append(
                    {
                        "views": k,
                        "kaug_over_ensiam": paired.ratio("simsiam_kaug", "ensiam", weights, s.level, "grad_var_trace"),
                        **{
                            f"kaug_over_ensiam_{key}": paired.ratio("simsiam_kaug", "ensiam", weights, s.level, key)
                            for key in ("mean_grad_sq", "relative_noise")
                        },
                    }
                )
            del paired  # free the stored gradients before the next K
    finally:
        model.load_state_dict(saved)
    return {"results": results, "comparisons": comparisons}
