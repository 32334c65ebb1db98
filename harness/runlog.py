"""What a run shows a person (train.py, and bench.py through train.py's Trainer): its own lines as
training starts and after each epoch, labelled progress bars on a terminal, one line on Ctrl-C;
and, set by the scripts' main, not on import, Lightning's INFO lines and warnings that ask nothing
of a user silenced.
"""

import logging
import os
import sys
import time
import warnings

import pytorch_lightning as pl
from tqdm.auto import tqdm

from harness import stops


def quiet_lightning():
    """Silences what would bury the run's own lines: Lightning's INFO lines (devices found, a
    logging-service tip, "Seed set to") and warnings a user cannot act on. Its other warnings
    still show."""
    for name in ("pytorch_lightning", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # The set loaders read features already in memory: workers would only add start-up time.
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    # --resume goes on in the checkpoint folder it resumes from (a new run empties it first).
    warnings.filterwarnings("ignore", "Checkpoint directory .* exists and is not empty")
    # bench.py times training steps alone, with no validation to run.
    warnings.filterwarnings(
        "ignore", "You defined a `validation_step` but have no `val_dataloader`"
    )
    # Lightning still uses a pytree class that newer torch deprecates.
    warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated")


class RunLog(pl.Callback):
    """What a run shows a person: a line as training starts and after each epoch, a labelled
    progress bar while an epoch or an evaluation runs (on a terminal only: none in a file), and on
    Ctrl-C how to go on. The first process alone prints."""

    def __init__(self, last_path=None):
        self.last_path = last_path  # where --resume finds the run after its last finished epoch
        self.label = "Evaluating"  # the evaluation bar's label, set before each trainer.test
        self.bar = None

    def start_bar(self, trainer, total, label):
        if trainer.is_global_zero:  # disable=None: no bar unless the output is a terminal
            self.bar = tqdm(total=total, desc=label, leave=False, disable=None, dynamic_ncols=True)

    def advance(self, *_):
        if self.bar is not None:
            self.bar.update()

    def close_bar(self, *_):
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def say(self, trainer, line):
        if trainer.is_global_zero:
            print(line, flush=True)

    def on_train_start(self, trainer, pl_module):
        params = sum(p.numel() for p in pl_module.parameters()) / 1e6
        since = f", from epoch {trainer.current_epoch + 1}" if trainer.current_epoch else ""
        precision = "" if trainer.precision == "32-true" else f" in {trainer.precision} precision"
        self.say(
            trainer,
            f"Training {type(pl_module).__name__} ({params:.2f} M parameters) on "
            f"{pl_module.device.type}{precision}: {trainer.max_epochs} epochs of "
            f"{trainer.num_training_batches} steps{since}",
        )

    def on_train_epoch_start(self, trainer, pl_module):
        self.epoch_start = time.time()
        label = f"Epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"
        self.start_bar(trainer, trainer.num_training_batches, label)

    on_train_batch_end = advance

    def on_train_epoch_end(self, trainer, pl_module):
        self.close_bar()
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        shown = [
            f"{name.replace('_', ' ')} {100 * metrics[name]:.2f}%"
            # seq2seq's training scores tokens (teacher-forced), its validation whole sequences.
            for name in ("train_acc", "train_token_acc", "val_acc")
            if name in metrics
        ]
        seconds = time.time() - self.epoch_start
        epoch = f"Epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"
        self.say(trainer, f"{epoch}: {', '.join(shown)} ({seconds:.1f} s)")

    def on_test_epoch_start(self, trainer, pl_module):
        self.start_bar(trainer, sum(trainer.num_test_batches), self.label)

    on_test_batch_end = advance
    on_test_epoch_end = close_bar

    def on_exception(self, trainer, pl_module, exception):
        self.close_bar()
        if not (isinstance(exception, KeyboardInterrupt) and trainer.is_global_zero):
            return
        if trainer.state.fn != "fit":
            note = (
                "the saved model is kept: run the command again, without --retrain or --resume, "
                "to evaluate it."
            )
        elif self.last_path and os.path.isfile(self.last_path):
            note = (
                f"{self.last_path} holds the run after its last finished epoch: run the same "
                "command with --resume to continue from there."
            )
        else:
            note = "no epoch had finished, so nothing was saved: run the same command again."
        print(f"\nInterrupted; {note}", file=sys.stderr, flush=True)
        stops.SAID.append(note)  # run_main, after Lightning's exit, says no second line
