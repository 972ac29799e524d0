"""The training loop: the half of ``Trainer`` (ensiam_fast/train.py) that runs once everything is built.

``TrainingLoop`` holds the step (``train_step``), the loop (``fit``), its logging windows, checkpoints, the
kNN monitor and the run's end; ``Trainer`` inherits it and builds the attributes it uses (``cfg``,
``accelerator``, ``loader``, ``method``, ``raw_method``, ``step_fn``, ``optimizer``, ``pos``, ``stop``, ...).
"""

from __future__ import annotations

import math
import signal

import torch
from tqdm.auto import tqdm

from ensiam_fast import distributed, memory
from ensiam_fast.checkpoint import rng_state, save_checkpoint
from ensiam_fast.curves import write_curves
from ensiam_fast.data import normalize
from ensiam_fast.errors import TrainingError, UserError
from ensiam_fast.evaluate.knn import knn_evaluate
from ensiam_fast.methods import train_views
from ensiam_fast.metrics import Window, run_files
from ensiam_fast.schedule import cosine_lr
from ensiam_fast.stopping import Interrupted, first_non_finite, non_finite_stop


class TrainingLoop:
    """The loop and what it calls; mixed into ``ensiam_fast.train.Trainer``, which builds its state."""

    def pick_views_per_pass(self, x: torch.Tensor) -> int:
        """views_per_pass=auto: trial steps on the first batch (ensiam_fast/memory.py); every rank takes
        the smallest choice, so all run the same chunks."""
        cfg, acc = self.cfg, self.accelerator
        budget = int(cfg.memory_budget_gb * 2**30) if cfg.memory_budget_gb else memory.default_budget(acc.device)
        peaks = memory.trial_peaks(self.raw_method, x, acc.autocast, budget)
        chosen = memory.choose(peaks, budget)
        if acc.num_processes > 1:
            chosen = int(acc.gather(torch.tensor([chosen], device=acc.device)).min())
        self.say(memory.describe(peaks, budget, chosen, cfg.views))
        return chosen

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.raw_method.model.features(x.to(self.accelerator.device, non_blocking=True))

    def knn(self, epoch: int) -> dict:
        cfg, acc = self.cfg, self.accelerator
        distributed.sync_buffers(self.raw_method, acc)  # every rank scores with the same statistics
        self.check_finite()
        self.raw_method.eval()
        result = knn_evaluate(
            self.features, root=cfg.data.root, train_split=cfg.data.knn_train_split,
            test_split=cfg.data.knn_test_split, image_size=self.info["image_size"],
            batch_size=max(1, cfg.eval_batch_size // acc.num_processes), device=self.data_device,
            accelerator=acc, k=cfg.knn_k, t=cfg.knn_t, resize_ratio=cfg.data.eval_resize_ratio,
            backend=cfg.data.backend, channels_last=cfg.model.channels_last, autocast=acc.autocast,
            num_threads=cfg.data.num_threads,
        )  # fmt: skip
        self.raw_method.train()
        with self.stop.deferred():  # the line is written whole
            self.log.write({"step": self.pos.step, "epoch": epoch, **result})
            acc.log(result, step=self.pos.step)
        return result

    def check_finite(self) -> None:
        """Before every checkpoint and kNN evaluation (ensiam_fast/stopping.py has the rule)."""
        bad = first_non_finite(self.raw_method.model)
        if bad is not None:
            raise self.non_finite(f"the model's {bad} became non-finite (inf or NaN)", self.last_finite)

    def non_finite(self, what: str, since: int) -> TrainingError:
        return non_finite_stop(what, since, self.pos.step, self.out / "checkpoints")

    def say(self, line: str) -> None:
        """One line from the main process, through tqdm's writer so a progress bar stays intact."""
        if self.accelerator.is_main_process:
            tqdm.write(line)

    def draw_curves(self) -> None:
        """curves.png from metrics.jsonl (main process); a plot that fails warns, the run is saved."""
        if self.accelerator.is_main_process:
            try:
                write_curves(self.out, f"{self.cfg.method} K={self.cfg.views}: {self.out.name}")
            except (OSError, ValueError, UserError) as e:
                self.say(f"warning: could not draw {self.out / 'curves.png'}: {e}")

    def finish(self, summary: dict, draw: bool = True) -> dict:
        """curves.png, then the run directory and what it holds (the main process writes and says it)."""
        if draw:
            self.draw_curves()
        if self.accelerator.is_main_process:
            summary.update(run_dir=str(self.out), files=run_files(self.out))
        return summary

    def checkpoint(self) -> None:
        acc, pos = self.accelerator, self.pos
        acc.wait_for_everyone()
        distributed.sync_buffers(self.raw_method, acc)  # what is saved is what every rank holds
        self.check_finite()
        self.last_finite = pos.step
        loader = self.loader_states()
        if acc.is_main_process:
            save_checkpoint(self.out, {
                "step": pos.step, "epoch": pos.epoch, "batch_in_epoch": pos.batch_in_epoch,
                "num_processes": acc.num_processes, "fingerprint": self.fingerprint,
                "config": self.cfg.to_dict(), "model": self.raw_method.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
                "rng": rng_state(), "loader": loader,
            }, keep=self.cfg.keep_checkpoints)  # fmt: skip
        acc.wait_for_everyone()

    def loader_states(self) -> list:
        """Every rank's loader position (a DALI pipeline checkpoint, ensiam_fast/data/dali.py), by rank,
        so a resume restores it instead of replaying the epoch's batches (None: nothing to restore)."""
        get = getattr(self.loader, "state_dict", None)
        mine = get(self.pos.batch_in_epoch) if get is not None else None
        if self.accelerator.num_processes == 1:
            return [mine]
        from accelerate.utils import gather_object

        return gather_object([mine])

    def batches(self):
        """The current epoch's batches from the position; the first call after a resume restores the
        loader's saved state (each rank its own) where the checkpoint has one."""
        state, self.resume_loader = self.resume_loader, None
        start = self.pos.batch_in_epoch
        return self.loader.iter_from(start, state) if state else self.loader.iter_from(start)

    def train_step(self, x: torch.Tensor) -> tuple[dict, float]:
        lr = cosine_lr(self.pos.step, self.schedule_steps, self.peak_lr, self.warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = self.peak_lr if group.get("fix_lr") else lr
        # accumulate(): gradients of gradient_accumulation_steps batches add up (backward divides the loss by
        # it, DDP syncs only on the last); the prepared optimizer steps and zeroes only then.
        with self.accelerator.accumulate(self.method):
            with self.accelerator.autocast():
                # A CPU loader may feed a GPU model: the uint8 views cross PCIe, then normalise there.
                x = x.to(self.accelerator.device, non_blocking=True)
                x = normalize(x, channels_last=self.cfg.model.channels_last)
            if self.views_per_pass is None:  # views_per_pass=auto: measured on the first batch
                self.views_per_pass = self.pick_views_per_pass(x)
            # all K views at once, or views_per_pass at a time with gradients synced on the last (methods.py)
            outputs = train_views(self.step_fn, self.raw_method, x, self.views_per_pass, self.accelerator.backward,
                                  self.accelerator.autocast, lambda: self.accelerator.no_sync(self.method))  # fmt: skip
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.pos.batch_in_epoch += 1
        if self.accelerator.sync_gradients:  # an optimizer step happened: the schedule counts these
            self.pos.step += 1
        return outputs, lr

    def close_window(self, window: Window, lr: float, last_good: int, bar) -> None:
        """Log the steps since the last line; a non-finite loss ends the run before any checkpoint."""
        record = window.flush(self.accelerator)
        if not math.isfinite(record["loss"]):
            raise self.non_finite(f"the loss became non-finite ({record['loss']})", last_good)
        record.update(step=self.pos.step, epoch=self.pos.epoch, lr=lr)
        self.log.write(record)
        self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=self.pos.step)
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.4f}", img_s=f"{record['images_per_s']:.0f}",
                        wait=f"{record['data_wait']:.0%}")  # fmt: skip

    def fit(self) -> dict:
        cfg, acc, pos, stop = self.cfg, self.accelerator, self.pos, self.stop
        summary: dict = {"steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch,
                         "num_processes": acc.num_processes, "device": str(acc.device),
                         "mixed_precision": acc.mixed_precision,
                         "gradient_accumulation_steps": acc.gradient_accumulation_steps}  # fmt: skip
        if self.phase == "done":
            # Nothing to do: no kNN, no metrics line, no checkpoint, no config.yaml, curves or logs rewritten.
            self.say(f"run already complete at step {pos.step} (raise epochs with resume.allow_changes=[epochs] "
                     "to train further); nothing was written")  # fmt: skip
            summary.update(already_complete=True, final_step=pos.step, final_epoch=pos.epoch)
            return self.finish(summary, draw=False)
        if self.phase == "evaluate":
            self.say(f"the final checkpoint (step {pos.step}) is saved; finishing the final kNN evaluation")
            return self.finish_run(summary)
        if cfg.knn_every and pos.step == 0:
            with stop.abortable("during the kNN evaluation at step 0 (before any training); nothing was lost. "
                                "Run the same command again."):  # fmt: skip
                summary["knn_start"] = self.knn(0)["knn_top1"]
            self.say(f"kNN top-1 at step 0 (random initialisation): {summary['knn_start']:.2f}%")
        self.method.train()
        bar = tqdm(total=self.total_steps, initial=pos.step, disable=not acc.is_main_process,
                   desc=f"{cfg.method} K={cfg.views}", dynamic_ncols=True)  # fmt: skip
        window, last_good = Window(), pos.step
        with stop.deferred(), bar:  # a signal becomes a checkpoint at the next step boundary
            while pos.step < self.total_steps:
                self.loader.set_epoch(pos.epoch)
                window.restart()
                for x, _ in self.batches():
                    window.data_ready()
                    outputs, lr = self.train_step(x)
                    window.step_done(outputs, cfg.batch_size // cfg.gradient_accumulation_steps)
                    if not acc.sync_gradients:
                        continue  # mid-accumulation: no optimizer step yet
                    save_now = pos.step % cfg.checkpoint_every == 0 and pos.step < self.total_steps
                    # One process acts on a signal at once; several agree on it when a window closes.
                    single_stop = stop.signum is not None and acc.num_processes == 1
                    stopping = False
                    # A checkpoint step also closes the window, so no checkpoint is written unchecked for NaN.
                    if (pos.step % cfg.log_every == 0 or pos.step == self.total_steps or save_now or single_stop
                            or pos.batch_in_epoch == self.batches_per_epoch):  # fmt: skip
                        self.close_window(window, lr, last_good, bar)
                        last_good = pos.step
                        stopping = single_stop or (acc.num_processes > 1 and stop.agreed(acc))
                    bar.update(1)
                    if save_now or stopping:
                        self.checkpoint()
                    if stopping:
                        self.stopped(bar)
                    if pos.step >= self.total_steps or pos.batch_in_epoch >= self.batches_per_epoch:
                        break
                if pos.batch_in_epoch >= self.batches_per_epoch:  # the epoch ran to its end
                    pos.epoch, pos.batch_in_epoch = pos.epoch + 1, 0
                    line = f"epoch {pos.epoch}/{cfg.epochs} step {pos.step}: loss {window.epoch_loss():.4f}"
                    if cfg.knn_every and pos.epoch % cfg.knn_every == 0 and pos.step < self.total_steps:
                        line += f", kNN top-1 {self.monitor_knn(bar):.2f}%"
                    self.say(line)
        bar.close()
        # The final checkpoint first, whole (a signal waits for it), then the final evaluation.
        with stop.deferred():
            self.checkpoint()
        if cfg.knn_every:
            stop.raise_if_signalled(f"at step {pos.step} while the final checkpoint was written; it is complete. "
                                    "Run the same command again to finish the evaluation.")  # fmt: skip
        else:
            stop.raise_if_signalled(f"at step {pos.step} while the final checkpoint was written; it is complete "
                                    "and the run is finished.")  # fmt: skip
        return self.finish_run(summary)

    def monitor_knn(self, bar) -> float:
        """The kNN monitor inside the loop: a signal ends the evaluation at once, then checkpoints."""
        try:
            with self.stop.abortable(""):
                return self.knn(self.pos.epoch)["knn_top1"]
        except Interrupted:
            self.raw_method.train()
            with self.stop.deferred():
                self.checkpoint()
            self.stopped(bar)

    def stopped(self, bar) -> None:
        """After the checkpoint a signal asked for: the curves so far, then ``Interrupted``."""
        bar.close()
        with self.stop.deferred():
            self.draw_curves()  # a stopped run shows its curves so far too
        raise Interrupted(self.stop.signum or signal.SIGTERM, self.pos.step)

    def finish_run(self, summary: dict) -> dict:
        """After the final checkpoint: the final kNN (a signal ends it at once; the checkpoint is saved and
        a rerun only finishes the evaluation), then the curves and the trackers' last write."""
        cfg, acc, pos = self.cfg, self.accelerator, self.pos
        if cfg.knn_every:
            with self.stop.abortable(f"during the final kNN evaluation; the final checkpoint (step {pos.step}) is "
                                     "saved. Run the same command again to finish the evaluation."):  # fmt: skip
                summary["knn_end"] = self.knn(pos.epoch)["knn_top1"]
        with self.stop.deferred():
            acc.end_training()
            summary.update(final_step=pos.step, final_epoch=pos.epoch)
            summary = self.finish(summary)
        self.stop.raise_if_signalled("after the run finished; everything is saved.")
        return summary
