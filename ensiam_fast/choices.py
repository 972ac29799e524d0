"""The values each enumerated setting accepts: one table, read by config_checks.py to validate and by the
modules that act on the values. Imports nothing, so validating a config builds and imports nothing
heavy. (``data.cpu_kernels``' choices live with the pipelines: ``pipelines.presets.CPU_KERNELS``.)"""

METHODS = ("ensiam", "simsiam_kaug", "simsiam", "fastsiam")  # losses.LOSSES has one function for each
BACKENDS = ("dali", "torch", "synthetic")  # data.backend
BN_MODES = ("per_view", "joint")  # model.bn_mode
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
DATA_DEVICES = ("auto", "cpu", "gpu")  # data.device
LOG_WITH = ("tensorboard", "wandb", "none")
