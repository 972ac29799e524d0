"""``train.main`` inside a process started by ``accelerate launch``, recording what this rank saw.

The test dataset gives every sample its own class, so the labels of the training batches name the
samples. After the run, OUT/rank-<r>.pt holds ``labels`` (every training sample this rank read) and
``state`` (the model's parameters and buffers as this rank holds them). OUT comes from $DUMP_DIR.
With $HIDE_CHECKPOINTS_ON_RANK=R, rank R finds no checkpoint to resume from.
"""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ensiam_fast import train  # noqa: E402


class Recording:
    def __init__(self, loader):
        self.loader, self.labels = loader, []

    def __len__(self):
        return len(self.loader)

    def set_epoch(self, epoch):
        self.loader.set_epoch(epoch)

    def iter_from(self, start):
        for x, y in self.loader.iter_from(start):
            self.labels.append(y.cpu().clone())
            yield x, y


_build, _fit = train.Trainer.build_train_loader, train.Trainer.fit


def build_recording(self):
    self.recorder = Recording(_build(self))
    return self.recorder


def fit_and_dump(self):
    summary = _fit(self)
    state = {k: v.detach().clone() for k, v in self.raw_method.model.state_dict().items()}
    dump = {"labels": torch.cat(self.recorder.labels).tolist(), "state": state}
    torch.save(dump, Path(os.environ["DUMP_DIR"]) / f"rank-{self.accelerator.process_index}.pt")
    return summary


train.Trainer.build_train_loader = build_recording
train.Trainer.fit = fit_and_dump
if os.environ.get("HIDE_CHECKPOINTS_ON_RANK") == os.environ.get("RANK"):
    # this rank sees no checkpoint where the others resume (as on a machine without the shared output_dir)
    train.latest_checkpoint = lambda out: None

if __name__ == "__main__":
    sys.exit(train.main(sys.argv[1:]))
