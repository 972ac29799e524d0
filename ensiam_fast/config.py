"""Typed configuration: dataclass defaults, then a YAML preset, then ``key=value`` overrides.

    cfg = load_config("ensiam_fast/configs/cifar10.yaml", ["epochs=10", "data.preset=strong"])

Unknown keys and values of the wrong type fail before anything runs, naming the key. The resolved
config is written into the run directory (``config.yaml``) so a run can be reproduced and resumed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ensiam_fast.config_checks import validate
from ensiam_fast.config_parse import apply_values, load_yaml, parse_overrides, yaml_problem
from ensiam_fast.errors import ConfigError
from ensiam_fast.paths import resolve_data_root

CONFIG_DIR = Path(__file__).parent / "configs"


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
            values = load_yaml(path.read_text(), path) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {yaml_problem(e)}") from e
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from e
        if not isinstance(values, dict):
            raise ConfigError(f"{path} must hold a mapping of config keys")
        try:
            apply_values(cfg, values)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from e
    apply_values(cfg, parse_overrides(overrides or []))
    validate(cfg)
    cfg.data.root = resolve_data_root(cfg.data.root)  # absolute from here on: config.yaml works from anywhere
    return cfg


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """Rebuild a config from ``TrainConfig.to_dict()`` (as stored in checkpoints and config.yaml)."""
    cfg = TrainConfig()
    apply_values(cfg, values)
    validate(cfg)
    return cfg


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
