"""Evaluation: ``knn`` (the training monitor and the CLI's kNN), ``linear`` (the linear protocol),
``cli`` (``python -m ensiam_fast.evaluate``). The names below are the package's public API."""

from ensiam_fast.evaluate.cli import main, make_runtime, parse_args, run_command
from ensiam_fast.evaluate.knn import extract_features, gather_uneven, knn_evaluate, knn_predict, topk_correct
from ensiam_fast.evaluate.linear import (
    FEATURE_NORMS,
    EvalData,
    EvaluationError,
    LinearSettings,
    Runtime,
    classifier_correct,
    cosine_lr,
    linear_classifier,
    linear_evaluate,
    resolve_eval_data,
    train_linear,
)

__all__ = [
    "FEATURE_NORMS", "EvalData", "EvaluationError", "LinearSettings", "Runtime", "classifier_correct", "cosine_lr",
    "extract_features", "gather_uneven", "knn_evaluate", "knn_predict", "linear_classifier", "linear_evaluate",
    "main", "make_runtime", "parse_args", "resolve_eval_data", "run_command", "topk_correct", "train_linear",
]  # fmt: skip
