"""The loader factory: K augmented uint8 views per image from a shard directory (DALI, CPU or GPU).

    loader = build_loader(root, "train", batch_size=256, views=4, preset="default", device="gpu")
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for x, y in loader:          # x: (K, B, 3, H, W) uint8 on the device, y: (B,) int64
            x = normalize(x)         # float, on the device: only bytes crossed PCIe

Data order and augmentation are a function of (seed, epoch, shard_id): every epoch gets its own
freshly built DALI pipeline, whose tar list is permuted with a seed shared by all ranks before the
reader splits it into ``num_shards`` blocks, and whose shuffle buffer and augmentation seeds differ
per rank. A build costs ~0.2-0.3 s for the default preset (K=4) and 2-4 s for very_strong, whose
RandAugment graph DALI traces through AutoGraph; so a training loader builds epoch e+1's
pipeline in a background thread as soon as epoch e starts, and ``set_epoch(e + 1)`` only picks it
up (``loader.last_build_s`` is the time ``set_epoch`` spent, ``loader.last_built_ahead`` says
whether the pipeline came from the background). Any other epoch is built on the spot.
``backend="torch"`` (or a host without DALI) uses ``ensiam_fast.data.torch.reference_loader``
with the same contract.

Modules: ``spec`` (the manifest read once and every argument checked into a ``LoaderSpec``, which
both loaders take), ``dali`` (the DALI loader), ``torch`` (the torchvision/webdataset loader),
``preflight`` (checks before DALI reads a split), ``synthetic`` (random views, no shards).
"""

# The package's names; ``ensiam_fast.data.torch`` is a submodule, so nothing here may be called torch.
from ensiam_fast.data.loader import build_loader, dali_available, normalize

__all__ = ["build_loader", "dali_available", "normalize"]
