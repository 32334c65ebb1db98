"""What train.py's Trainer is given beyond the post's ModelCheckpoint: the best epoch kept until
last.ckpt names its successor, a diverging loss stopped at once, each process seeded apart, and
every checkpoint written whole.
"""

import os
import shutil
import sys

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.plugins.io import TorchCheckpointIO

from harness.files import save_atomically


class BestCheckpoint(ModelCheckpoint):
    """The best epoch's checkpoint, by validation accuracy, written as the epoch ends and just
    before last.ckpt. Lightning would remove the one it replaces at once, while last.ckpt still
    named it: a stop between the two writes left a training that --resume could not continue.
    Here the replaced one goes only as the next epoch starts, when last.ckpt names its successor;
    so whatever moment a run stops, the best epoch that last.ckpt names is on disk."""

    def __init__(self, dirpath):
        super().__init__(dirpath, monitor="val_acc", mode="max", save_weights_only=True)
        self.replaced = []

    def _remove_checkpoint(self, trainer, filepath):
        self.replaced.append(filepath)

    def on_train_epoch_start(self, trainer, pl_module):
        for path in self.replaced:
            super()._remove_checkpoint(trainer, path)
        self.replaced = []


class StopDiverging(pl.Callback):
    """Stops a training whose loss is no longer a finite number, at the first such step and before
    its update, with one line: a too large learning rate does this, and every later step and
    checkpoint would hold NaN. Its checkpoints go: resuming would diverge again, and another
    learning rate is a new training."""

    def __init__(self, args, checkpoints, usual_lr):
        self.args, self.checkpoints, self.usual_lr = args, checkpoints, usual_lr

    def on_before_backward(self, trainer, pl_module, loss):
        if torch.isfinite(loss).all():
            return
        shutil.rmtree(self.checkpoints, ignore_errors=True)
        lr = self.args.lr
        smaller = self.usual_lr if lr > self.usual_lr else lr / 10  # the task's own, or a tenth
        sys.exit(
            f"error: the training diverged: its loss became {loss.item()} at epoch "
            f"{trainer.current_epoch + 1}, step {trainer.global_step + 1}, with --lr {lr:g}. "
            "Its checkpoints are removed (resuming would diverge again); train anew with a "
            f"smaller learning rate: the same command{' without --resume,' * self.args.resume} "
            f"with --lr {smaller:g}."
        )


class SeedEachProcess(pl.Callback):
    """With several processes, seeds process r with seed + r once they are set up.

    Lightning seeds every process alike, so without this each would draw the same random sets
    (numpy) and dropout masks (torch) as the others. One process keeps the run's seed untouched.
    """

    def __init__(self, seed):
        self.seed = seed

    def setup(self, trainer, pl_module, stage):
        if trainer.world_size > 1:
            pl.seed_everything(self.seed + trainer.global_rank, verbose=False)
            # But Lightning's DistributedSampler shuffles with PL_GLOBAL_SEED, which must be the
            # same in every process: otherwise their shares of an epoch overlap.
            os.environ["PL_GLOBAL_SEED"] = str(self.seed)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, writing each checkpoint beside its place and renaming it
    there (save_atomically): Lightning's own writes it in the system's temporary folder and moves
    it, which across file systems is a copy that a kill leaves half done."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        save_atomically(str(path), lambda tmp: torch.save(checkpoint, tmp))
