"""Typed configuration: dataclass defaults, then a YAML preset, then ``key=value`` overrides.

    cfg = load_config("ensiam_fast/configs/cifar10.yaml", ["epochs=10", "data.preset=strong"])

Unknown keys and values of the wrong type fail before anything runs, naming the key. The resolved
config is written into the run directory (``config.yaml``) so a run can be reproduced and resumed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ensiam_fast.choices import BACKENDS, BN_MODES, DATA_DEVICES, LOG_WITH, METHODS, MIXED_PRECISION
from ensiam_fast.errors import UserError
from ensiam_fast.paths import resolve_data_root
from pipelines.presets import CPU_KERNELS, MAX_VIEWS, check_jigsaw, check_views

CONFIG_DIR = Path(__file__).parent / "configs"


# The fingerprint keys a resume may change on purpose (resume.allow_changes; ensiam_fast/checkpoint.py):
# the others (method, views, network, batch, accumulation, processes) would reinterpret the weights or
# the stored data position. Changing epochs recomputes the cosine schedule over the new length from the
# step reached (the lr jumps to the new curve's value there).
RESUMABLE_CHANGES = (
    "epochs", "seed", "mixed_precision", "optim.base_lr", "optim.momentum", "optim.weight_decay",
    "optim.warmup_epochs", "optim.fix_pred_lr", "data.preset", "data.preset_overrides", "data.image_size",
    "data.backend", "data.dataset", "data.split", "data.samples", "data.content", "model.sync_bn", "model.pretrained",
)  # fmt: skip


class ConfigError(UserError, ValueError):
    """A configuration that cannot run; the message names the key (a user error; still a ValueError for
    callers that catch that)."""


@dataclass
class DataConfig:
    # the dataset folder (manifest.json + shards); relative: from the working directory when it is there,
    # else from the project folder, where tools/make_shards.py writes by default (ensiam_fast/paths.py)
    root: str = "shards/digits"
    split: str = "train"  # pretraining split; several joined with '+' (STL-10 pretrains on 'train+unlabeled')
    knn_train_split: str = "train"  # labelled bank for the kNN monitor (also 'a+b')
    knn_test_split: str = "test"  # labelled split the kNN monitor scores
    preset: str = "default"  # default | strong | very_strong (pipelines/presets.py)
    preset_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {blur_p: 1.0}
    image_size: int | None = None  # None: the dataset's own size (manifest image_size)
    eval_resize_ratio: float = 1.0  # evaluation: resize to ratio*size, centre crop (ImageNet: 256/224)
    backend: str = "dali"  # dali | torch (torchvision reference) | synthetic (random views on the device)
    synthetic_samples: int = 50_000  # images per epoch with backend=synthetic
    device: str = "auto"  # auto (gpu when the process has one) | cpu | gpu: where DALI augments
    num_threads: int | None = None  # None: the cores available to this process
    cpu_kernels: str = "auto"  # CPU pipeline: auto = numba (per-view kernels) | gpu_graph (the GPU graph's proxy)
    # the augmentation pipeline's share of each GPU (GB): a run whose projected need is larger is refused at
    # start (pipelines.presets.pipeline_bytes); None: no check
    gpu_memory_gb: float | None = None


@dataclass
class ModelConfig:
    backbone: str = "resnet18"  # a timm model name, a pretrained tag allowed (resnet18.a1_in1k)
    cifar_stem: bool = True  # stem at stride 1, no max-pool (the paper's small-dataset ResNet-18; ensiam_fast/stems.py)
    pretrained: bool = False  # start from timm's weights for backbone (the host must have or download them)
    proj_layers: int = 2  # 2 for small datasets, 3 for ImageNet
    proj_hidden: int = 2048  # projector hidden width (paper: 2048)
    proj_dim: int = 2048  # projection size D (paper: 2048)
    pred_hidden: int = 512  # predictor bottleneck width (paper: 512)
    bn_mode: str = "per_view"  # per_view (as K separate forwards) | joint
    sync_bn: bool = False  # BatchNorm statistics over all processes (per-view layers stay per view)
    channels_last: bool = True  # NHWC memory layout for the convolutions
    compile: bool = False  # torch.compile the training forward
    # recompute the backbone's stages in the backward pass instead of keeping their activations (timm's
    # set_grad_checkpointing; BatchNorm running statistics still update once per step)
    grad_checkpointing: bool = False


@dataclass
class OptimConfig:
    base_lr: float = 0.1  # lr = base_lr * global batch / 256
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 1e-4  # SGD weight decay
    warmup_epochs: float = 10.0  # linear warm-up before the cosine decay
    fix_pred_lr: bool = False  # SimSiam's option: the predictor keeps the base lr (no schedule)


@dataclass
class ResumeConfig:
    # fingerprint keys a resume may change on purpose, e.g. [epochs] to extend a finished run (the cosine
    # schedule is recomputed over the new length); without it a changed setting is refused
    allow_changes: list[str] = field(default_factory=list)


@dataclass
class TrainConfig:
    method: str = "ensiam"  # ensiam | simsiam_kaug | simsiam | fastsiam
    views: int = 4  # K, the augmented views per image (2 to 16)
    batch_size: int = 256  # global batch (images, not views), split across processes
    epochs: int = 200  # pretraining epochs; the lr schedule spans them
    max_steps: int | None = None  # a cap on optimizer steps, for smoke runs
    seed: int = 0  # model initialisation and augmentation randomness
    output_dir: str = "runs/default"  # the run directory: config, metrics, curves.png, checkpoints
    # auto: Accelerate's setting (accelerate launch --mixed_precision, accelerate config), else bf16 on a GPU
    # that has it, fp16 on other GPUs, none on a CPU | no | bf16 | fp16 (ensiam_fast/placement.py)
    mixed_precision: str = "auto"
    gradient_accumulation_steps: int = 1  # batches per optimizer step; batch_size stays the step's global batch
    # views through the network at once: null = all K in one fused pass | n dividing K: a no-grad pass for the
    # targets, then n views at a time, the same gradients in about n/K of the activation memory (docs/scale.md)
    # | auto: the largest n whose measured peak fits memory_budget_gb (GPU: its free memory)
    views_per_pass: int | str | None = None
    memory_budget_gb: float | None = None  # views_per_pass=auto: bytes allowed (null: a GPU's free memory less 10%)
    log_with: str = "tensorboard"  # tensorboard | wandb (pip install ensiam_fast[wandb]; WANDB_MODE=offline) | none
    log_every: int = 10  # steps between metrics.jsonl lines
    checkpoint_every: int = 500  # steps between checkpoints (one is always written at the end)
    keep_checkpoints: int = 3  # newest checkpoints kept; older ones are removed
    knn_every: int = 10  # epochs between kNN monitor runs (also at step 0 and at the end); 0 = off
    knn_k: int = 200  # neighbours that vote in the kNN monitor
    knn_t: float = 0.1  # temperature of the kNN vote weights exp(similarity / t)
    eval_batch_size: int = 256  # global batch of the kNN monitor's feature extraction
    dist_timeout_s: float = 600.0  # a collective waiting longer (a dead or frozen peer) ends the run with an error
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    resume: ResumeConfig = field(default_factory=ResumeConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _close(key: str, options) -> str:
    close = difflib.get_close_matches(key, list(options), n=3)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _check_type(key: str, value: Any, tp: Any) -> Any:
    """Return ``value`` converted to ``tp`` where that is lossless (int -> float), else raise."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(key, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {tp}")
    if origin is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"config key {key!r} expects a list of names such as [epochs], got {value!r}")
        return list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} expects a mapping, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):  # no setting means anything at inf or nan (a timeout is a number of seconds)
            raise ConfigError(f"config key {key!r} must be a finite number, got {value!r}")
        return float(value)
    if tp in (int, float, str, bool):
        if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
            return value
        raise ConfigError(f"config key {key!r} expects {tp.__name__}, got {value!r} ({type(value).__name__})")
    raise ConfigError(f"config key {key!r}: unsupported type {tp}")


def _apply(obj: Any, values: dict[str, Any], prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in hints:
            close = difflib.get_close_matches(key, list(hints), n=3)
            hint = f" (did you mean {', '.join(prefix + c for c in close)}?)" if close else ""
            raise ConfigError(f"unknown config key {name!r}{hint}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {name!r} is a section; give its fields, e.g. {name}.FIELD=...")
            _apply(current, value, prefix=f"{name}.")
        else:
            if isinstance(value, _Raw):
                try:
                    value = value.parse(hints[key])
                except yaml.YAMLError as e:
                    raise ConfigError(
                        f"config key {name!r}: {str(value)!r} is not a valid value ({yaml_problem(e)})"
                    ) from e
            setattr(obj, key, _check_type(name, value, hints[key]))


class _Loader(yaml.SafeLoader):
    """YAML as users type numbers (PyYAML follows YAML 1.1, which reads ``1e-3`` and ``5E-4`` as text:
    its floats need a dot and a signed exponent), and a key given twice in one mapping is an error."""

    source = "the command line"

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, str) and key in seen:
                raise ConfigError(f"{self.source}: key {key!r} is given twice (lines {seen[key]} and {line}); keep one")
            seen[key] = line
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error in one line (PyYAML's own text spans several, with a caret drawing)."""
    if isinstance(e, yaml.MarkedYAMLError) and e.problem_mark is not None:
        mark = e.problem_mark
        what = " ".join(part for part in (e.context, e.problem) if part)
        return f"{what} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(e).split())


def _load_yaml(text: str, source=None) -> Any:
    loader = _Loader(text)
    if source is not None:
        loader.source = str(source)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


class _Raw(str):
    """A command-line value, parsed once the type of its key is known: a ``str`` key takes the text
    as it is (so ``mixed_precision=no`` stays "no" rather than YAML's False), others parse as YAML."""

    def parse(self, tp: Any) -> Any:
        args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
        if str in args and not (type(None) in args and self in ("null", "~", "None")):
            return str(self)
        return _load_yaml(self) if self != "" else None


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["a.b=1", "c=x"]`` -> ``{"a": {"b": "1"}, "c": "x"}``; values stay text until their key's type
    is known (then YAML parses them, e.g. ``1`` -> 1, ``{p: 1}`` -> a mapping)."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        value = _Raw(raw)
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier one")
        node[parts[-1]] = value
    return tree


def resolve_preset_path(config: str | Path) -> Path:
    """A path, or a preset name from ensiam_fast/configs (``cifar10`` -> configs/cifar10.yaml)."""
    path = Path(config)
    if path.is_file():
        return path
    named = CONFIG_DIR / f"{config}.yaml"
    if named.is_file():
        return named
    presets = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"config file {config!r} not found; presets: {', '.join(presets)}")


def load_config(config: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    cfg = TrainConfig()
    if config is not None:
        path = resolve_preset_path(config)
        try:
            values = _load_yaml(path.read_text(), path) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {yaml_problem(e)}") from e
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from e
        if not isinstance(values, dict):
            raise ConfigError(f"{path} must hold a mapping of config keys")
        try:
            _apply(cfg, values)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from e
    _apply(cfg, parse_overrides(overrides or []))
    validate(cfg)
    cfg.data.root = resolve_data_root(cfg.data.root)  # absolute from here on: config.yaml works from anywhere
    return cfg


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """Rebuild a config from ``TrainConfig.to_dict()`` (as stored in checkpoints and config.yaml)."""
    cfg = TrainConfig()
    _apply(cfg, values)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Checks that need no data: the rest (dataset, splits, sizes) is checked when the data is opened."""
    if cfg.method not in METHODS:
        raise ConfigError(f"method={cfg.method!r} is unknown{_close(cfg.method, METHODS)}; one of {METHODS}")
    try:
        check_views(cfg.views, minimum=2)
    except ValueError as e:
        raise ConfigError(f"views={cfg.views!r}: every method needs 2 to {MAX_VIEWS} views ({e})") from None
    if cfg.method == "simsiam" and cfg.views != 2:
        raise ConfigError(f"method=simsiam uses exactly 2 views, got views={cfg.views}; use simsiam_kaug")
    if cfg.method == "simsiam_kaug" and cfg.views % 2:
        raise ConfigError(f"method=simsiam_kaug pairs views, so views must be even, got views={cfg.views}")
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
        raise ConfigError("knn_every must be >= 0, knn_k >= 1 and knn_t > 0")
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


def _validate_views_per_pass(cfg: TrainConfig) -> None:
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


def _validate_ranges(cfg: TrainConfig) -> None:
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


def _validate_augmentation(cfg: TrainConfig) -> None:
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


def _validate_backbone(cfg: TrainConfig) -> None:
    """The name, from timm's registry. Whether the family has the CIFAR stem is checked where the
    model is built (``stems.check_backbone``, at the trainer's start, before any data is read)."""
    try:
        check_backbone_name(cfg.model.backbone)
    except ValueError as e:
        raise ConfigError(backbone_error(cfg, e)) from None


def backbone_error(cfg: TrainConfig, e: Exception) -> str:
    return f"model.backbone={cfg.model.backbone!r} (model.cifar_stem={cfg.model.cifar_stem}): {e}"


def save_config(cfg: TrainConfig, path: Path) -> None:
    from ensiam_fast.rundir import write_text  # the one writer (light: standard library only)

    write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def _comments(cls) -> dict[str, str]:
    """Field name -> its comment in this file (on the field's line, or the comment lines just above it)."""
    import inspect
    import re

    found, above = {}, []
    for line in inspect.getsource(cls).splitlines()[1:]:
        text = line.strip()
        if text.startswith("#"):
            above.append(text.lstrip("# "))
            continue
        m = re.match(r"(\w+):[^#]*?(?:#\s*(.*))?$", text)
        if m and not text.startswith(("def ", "@", '"')):
            found[m.group(1)] = " ".join(above + ([m.group(2)] if m.group(2) else []))
        above = []
    return found


def describe_keys(obj: Any = None, prefix: str = "") -> list[str]:
    """``key = default  comment`` for every config key, nested sections dotted (for ``--help``)."""
    obj = TrainConfig() if obj is None else obj
    lines, notes = [], _comments(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            lines += describe_keys(value, f"{prefix}{f.name}.")
            continue
        shown = "null" if value is None else yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...")
        note = notes.get(f.name, "")
        lines.append(f"  {prefix}{f.name}={shown.strip()}" + (f"\n      {note}" if note else ""))
    return lines
