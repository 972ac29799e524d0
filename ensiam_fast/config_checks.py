"""Validating a config (ensiam_fast/config.py) without data or a network: from tables (the choices, the
presets module) and registries (timm's model names). ``cfg`` is a ``config.TrainConfig``, unannotated here
so that this module does not import config.py, which imports it."""

from __future__ import annotations

import difflib
from typing import Any

from ensiam_fast.choices import BACKENDS, BN_MODES, DATA_DEVICES, LOG_WITH, METHODS, MIXED_PRECISION
from ensiam_fast.errors import ConfigError
from pipelines.presets import CPU_KERNELS, MAX_VIEWS, check_jigsaw, check_views

# The fingerprint keys a resume may change on purpose (resume.allow_changes; ensiam_fast/checkpoint.py):
# the others (method, views, network, batch, accumulation, processes) would reinterpret the weights or
# the stored data position. Changing epochs recomputes the cosine schedule over the new length from the
# step reached (the lr jumps to the new curve's value there).
RESUMABLE_CHANGES = (
    "epochs", "seed", "mixed_precision", "optim.base_lr", "optim.momentum", "optim.weight_decay",
    "optim.warmup_epochs", "optim.fix_pred_lr", "data.preset", "data.preset_overrides", "data.image_size",
    "data.backend", "data.dataset", "data.split", "data.samples", "data.content", "model.sync_bn", "model.pretrained",
)  # fmt: skip


def _close(key: str, options) -> str:
    close = difflib.get_close_matches(key, list(options), n=3)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def check_method_views(method: str, views) -> None:
    """K views for a method: 2..MAX_VIEWS for all, exactly 2 for simsiam, even for simsiam_kaug. The one
    home of this rule: the config and the losses (losses.get_loss, hence every tool building one) call it."""
    try:
        check_views(views, minimum=2)
    except ValueError as e:
        raise ConfigError(f"views={views!r}: every method needs 2 to {MAX_VIEWS} views ({e})") from None
    if method == "simsiam" and views != 2:
        raise ConfigError(f"method=simsiam uses exactly 2 views, got views={views}; use simsiam_kaug")
    if method == "simsiam_kaug" and views % 2:
        raise ConfigError(f"method=simsiam_kaug pairs views, so views must be even, got views={views}")


def validate(cfg) -> None:
    """Checks that need no data: the rest (dataset, splits, sizes) is checked when the data is opened."""
    if cfg.method not in METHODS:
        raise ConfigError(f"method={cfg.method!r} is unknown{_close(cfg.method, METHODS)}; one of {METHODS}")
    check_method_views(cfg.method, cfg.views)
    for key in (
        "batch_size",
        "epochs",
        "log_every",
        "checkpoint_every",
        "keep_checkpoints",
        "eval_batch_size",
        "gradient_accumulation_steps",
    ):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"{key}={getattr(cfg, key)} must be at least 1")
    _validate_views_per_pass(cfg)
    if cfg.max_steps is not None and cfg.max_steps < 1:
        raise ConfigError(f"max_steps={cfg.max_steps} must be at least 1 (or null for no cap)")
    if cfg.knn_every < 0 or cfg.knn_k < 1 or cfg.knn_t <= 0:
        raise ConfigError(
            f"knn_every={cfg.knn_every}, knn_k={cfg.knn_k}, knn_t={cfg.knn_t}: "
            "knn_every must be >= 0, knn_k >= 1 and knn_t > 0"
        )
    choices = {
        "mixed_precision": MIXED_PRECISION,
        "log_with": LOG_WITH,
        "data.backend": BACKENDS,
        "data.device": DATA_DEVICES,
        "data.cpu_kernels": CPU_KERNELS,
        "model.bn_mode": BN_MODES,
    }
    for key, allowed in choices.items():
        section, _, name = key.rpartition(".")
        value = getattr(getattr(cfg, section) if section else cfg, name)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {allowed}")
    if cfg.model.proj_layers not in (2, 3):
        raise ConfigError(f"model.proj_layers={cfg.model.proj_layers}: SimSiam's projector has 2 or 3 layers")
    unknown = [k for k in cfg.resume.allow_changes if k not in RESUMABLE_CHANGES]
    if unknown:
        raise ConfigError(
            f"resume.allow_changes names {unknown}: a resume may change only {', '.join(RESUMABLE_CHANGES)}"
        )
    _validate_ranges(cfg)
    _validate_augmentation(cfg)
    _validate_backbone(cfg)


def _validate_views_per_pass(cfg) -> None:
    """null, auto or a divisor of views (a digit string from the command line becomes the int)."""
    n = cfg.views_per_pass
    if isinstance(n, str) and n.strip().isdigit():
        n = cfg.views_per_pass = int(n)
    if n is not None and n != "auto" and (isinstance(n, str) or not 1 <= n <= cfg.views or cfg.views % n):
        divisors = [d for d in range(1, cfg.views + 1) if cfg.views % d == 0]
        raise ConfigError(
            f"views_per_pass={n!r} must be null, auto or a divisor of views={cfg.views}: one of {divisors}"
        )
    if n is not None and n != cfg.views and cfg.model.bn_mode != "per_view":
        raise ConfigError(
            f"views_per_pass={n!r} needs model.bn_mode=per_view: bn_mode={cfg.model.bn_mode} pools the "
            "BatchNorm statistics of all views, which a pass over some of them cannot reproduce"
        )
    budget = cfg.memory_budget_gb
    if budget is not None and budget <= 0:
        raise ConfigError(f"memory_budget_gb={budget!r} must be > 0 (or null)")


def _validate_ranges(cfg) -> None:
    checks = [
        ("seed", cfg.seed, cfg.seed >= 0, "must be >= 0 (it seeds numpy and DALI)"),
        ("dist_timeout_s", cfg.dist_timeout_s, 0 < cfg.dist_timeout_s <= 366 * 86400,
         "must be > 0 seconds and at most a year (366 days: a longer wait is no deadline at all)"),
        ("output_dir", cfg.output_dir, bool(cfg.output_dir.strip()), "must name a directory"),
        ("optim.base_lr", cfg.optim.base_lr, cfg.optim.base_lr > 0, "must be > 0 (lr = base_lr * batch_size / 256)"),
        ("optim.momentum", cfg.optim.momentum, 0 <= cfg.optim.momentum < 1, "must be in [0, 1)"),
        ("optim.weight_decay", cfg.optim.weight_decay, cfg.optim.weight_decay >= 0, "must be >= 0"),
        ("optim.warmup_epochs", cfg.optim.warmup_epochs, cfg.optim.warmup_epochs >= 0, "must be >= 0"),
        ("data.eval_resize_ratio", cfg.data.eval_resize_ratio, cfg.data.eval_resize_ratio >= 1,
         "must be >= 1 (resize to ratio * size, then centre-crop to size)"),
    ]  # fmt: skip
    for key in ("proj_hidden", "proj_dim", "pred_hidden"):
        value = getattr(cfg.model, key)
        checks.append((f"model.{key}", value, value >= 1, "must be at least 1"))
    for key in ("image_size", "num_threads"):
        value = getattr(cfg.data, key)
        checks.append((f"data.{key}", value, value is None or value >= 1, "must be at least 1 (or null)"))
    gb = cfg.data.gpu_memory_gb
    checks.append(("data.gpu_memory_gb", gb, gb is None or gb > 0, "must be a positive number of GB (or null)"))
    for key, value, ok, rule in checks:
        if not ok:
            raise ConfigError(f"{key}={value!r} {rule}")


def _validate_augmentation(cfg) -> None:
    """The preset name, its overrides, and (when the size is known here) the jigsaw grid."""
    from pipelines.presets import get_preset

    try:
        preset = get_preset(cfg.data.preset)
    except ValueError as e:
        raise ConfigError(f"data.preset={cfg.data.preset!r}: {e}") from None
    for key, value in cfg.data.preset_overrides.items():  # types first: the preset's own range checks need them
        if hasattr(preset, key):
            _check_like(f"data.preset_overrides.{key}", value, getattr(preset, key))
    try:
        preset = preset.replace(**cfg.data.preset_overrides)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"data.preset_overrides: {e}") from None
    if cfg.data.image_size is not None:
        try:
            check_jigsaw(cfg.data.image_size, preset.jigsaw_grid)
        except ValueError as e:
            raise ConfigError(f"data.image_size={cfg.data.image_size} with data.preset={preset.name!r}: {e}") from None


def _check_like(key: str, value: Any, default: Any) -> None:
    """A preset override must have the type of the field's default (a pair stays a pair of numbers)."""

    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif number(default):
        ok = number(value)
    elif isinstance(default, tuple):
        ok = isinstance(value, (list, tuple)) and len(value) == len(default) and all(map(number, value))
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(f"{key}={value!r} should be like the preset's {default!r}")


def check_backbone_name(name: str) -> None:
    """``name`` is in timm's model registry, optionally with a pretrained tag (``resnet18.a1_in1k``);
    ValueError otherwise, with the close matches. Nothing is built."""
    import timm  # here: validating a config imports no model code until a backbone is named

    base, _, tag = name.partition(".")
    if not timm.is_model(base):
        close = difflib.get_close_matches(base, timm.list_models(), n=5, cutoff=0.6)
        hint = f" Close matches: {', '.join(close)}." if close else ""
        raise ValueError(f"unknown backbone {name!r} (not in timm.list_models()).{hint}")
    if tag and name not in timm.list_pretrained(name):
        tags = [t.partition(".")[2] for t in timm.list_pretrained(f"{base}.*")]
        raise ValueError(
            f"backbone {name!r}: timm has no pretrained tag {tag!r} for {base} (tags: {', '.join(tags) or 'none'})"
        )


def _validate_backbone(cfg) -> None:
    """The name, from timm's registry. Whether the family has the CIFAR stem is checked where the
    model is built (``stems.check_backbone``, at the trainer's start, before any data is read)."""
    try:
        check_backbone_name(cfg.model.backbone)
    except ValueError as e:
        raise ConfigError(backbone_error(cfg, e)) from None


def backbone_error(cfg, e: Exception) -> str:
    return f"model.backbone={cfg.model.backbone!r} (model.cifar_stem={cfg.model.cifar_stem}): {e}"
