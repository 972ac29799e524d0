"""The kNN monitor (the paper's Figure 3), also the ``evaluate knn`` command's protocol.

kNN follows the usual SSL protocol (Wu et al. 2018, InstDisc): l2-normalised backbone features of
the labelled training split form the bank; each test image votes with its k most cosine-similar
bank images, weighted by exp(similarity / t) (k and t: the run's ``knn_k`` and ``knn_t``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ensiam_fast.data import build_loader, normalize
from ensiam_fast.errors import UserError
from pipelines.presets import get_preset


def gather_uneven(accelerator, tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every process along dim 0, where lengths may differ per rank."""
    if accelerator is None or accelerator.num_processes == 1:
        return tensor
    sizes = accelerator.gather(torch.tensor([tensor.shape[0]], device=tensor.device)).tolist()
    padded = accelerator.gather(accelerator.pad_across_processes(tensor, dim=0))
    longest = max(sizes)
    return torch.cat([padded[r * longest : r * longest + n] for r, n in enumerate(sizes)])


@torch.no_grad()
def extract_features(
    backbone_features, loader, *, channels_last: bool = False, autocast=None, l2_normalize: bool = True
):
    """Run ``backbone_features`` ((N,3,H,W) -> (N,D)) over one evaluation pass of ``loader``.

    Returns float32 features (N, D), l2-normalised unless ``l2_normalize=False``, and labels (N,)
    of this process's samples."""
    feats, labels = [], []
    for x, y in loader:
        x = normalize(x, channels_last=channels_last)[0]  # (1, B, 3, H, W) -> (B, 3, H, W)
        if autocast is not None:
            with autocast():
                f = backbone_features(x)
        else:
            f = backbone_features(x)
        f = f.float()
        feats.append(F.normalize(f, dim=1) if l2_normalize else f)
        labels.append(y.to(f.device))  # the loader may run on another device than the model
    return torch.cat(feats), torch.cat(labels)


def knn_predict(
    features: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    k: int = 200,
    t: float = 0.1,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class scores (N, C) by weighted cosine kNN. ``features`` and ``bank`` are l2-normalised."""
    k = min(k, bank.shape[0])
    scores = []
    for start in range(0, features.shape[0], chunk):
        sim = features[start : start + chunk] @ bank.T  # (n, M) cosine similarities
        top_sim, top_idx = sim.topk(k, dim=1)  # (n, k)
        weights = (top_sim / t).exp()
        votes = torch.zeros(sim.shape[0], num_classes, device=sim.device, dtype=weights.dtype)
        votes.scatter_add_(1, bank_labels[top_idx], weights)  # sum the weights per class
        scores.append(votes)
    return torch.cat(scores)


def topk_correct(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> dict[int, int]:
    """How many rows have their label among the top-k scores, for each k."""
    ranked = scores.argsort(dim=1, descending=True)
    hits = ranked == labels[:, None]
    return {k: int(hits[:, : min(k, scores.shape[1])].any(dim=1).sum()) for k in ks}


def knn_evaluate(
    backbone_features,
    *,
    root: str,
    train_split: str,
    test_split: str,
    image_size: int | None,
    batch_size: int,
    device: str = "cpu",
    accelerator=None,
    k: int = 200,
    t: float = 0.1,
    resize_ratio: float = 1.0,
    backend: str = "dali",
    channels_last: bool = False,
    autocast=None,
    num_threads: int | None = None,
) -> dict[str, float]:
    """kNN top-1/top-5 accuracy (percent) of the test split against the train-split bank.

    Each process extracts features for its share of both splits; the bank is gathered whole on every
    process, and each test sample is scored exactly once, by the process that holds it."""
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    common = dict(
        views=1,
        preset=get_preset("eval", resize_ratio=resize_ratio),
        device=device,
        shard_id=rank,
        num_shards=world,
        train=False,
        image_size=image_size,
        backend=backend,
        num_threads=num_threads,
    )
    bank_loader = build_loader(root, train_split, batch_size=batch_size, **common)
    test_loader = build_loader(root, test_split, batch_size=batch_size, **common)
    for loader, split in ((bank_loader, train_split), (test_loader, test_split)):
        if not loader.labeled:
            raise UserError(f"kNN needs labels, but split {split!r} of {root} is unlabelled")
    bank, bank_labels = extract_features(backbone_features, bank_loader, channels_last=channels_last, autocast=autocast)
    bank, bank_labels = gather_uneven(accelerator, bank), gather_uneven(accelerator, bank_labels)
    feats, labels = extract_features(backbone_features, test_loader, channels_last=channels_last, autocast=autocast)
    scores = knn_predict(feats, bank, bank_labels, bank_loader.num_classes, k=k, t=t)
    correct = topk_correct(scores, labels)
    counts = torch.tensor([correct[1], correct[5], labels.shape[0]], device=feats.device, dtype=torch.float64)
    if accelerator is not None and world > 1:
        counts = accelerator.reduce(counts, reduction="sum")
    top1, top5, n = counts.tolist()
    return {"knn_top1": 100.0 * top1 / n, "knn_top5": 100.0 * top5 / n, "knn_samples": int(n)}
