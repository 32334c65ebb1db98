"""runlog.py: the lines RunLog prints as a run trains and when Ctrl-C stops it, and what
quiet_lightning silences, which the scripts set in main and no module sets on import."""

import logging
import re
import time
import types
import warnings

import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn
from torch.utils.data import DataLoader

from data import SetAnomalyDataset
from harness.runlog import RunLog, quiet_lightning
from helpers import SMALL_SET_MODEL, assert_ran, clustered_features, quiet_trainer, run_code
from import_graph import import_graph, in_import_order
from model import AnomalyPredictor

EPOCH_LINE = re.compile(
    r"Epoch (\d+)/2: train acc (\d+\.\d\d)%, val acc (\d+\.\d\d)% \(\d+\.\d s\)"
)


def test_a_line_as_training_starts_and_one_after_each_epoch(capsys):
    pl.seed_everything(0, verbose=False)
    feats, labels = clustered_features(6, 20, 8, seed=0)
    train_loader = DataLoader(SetAnomalyDataset(feats, labels, set_size=5, train=True),
                              batch_size=16, shuffle=True, drop_last=True)  # fmt: skip
    val_set = SetAnomalyDataset(feats, labels, set_size=5, train=False)
    val_loader = DataLoader(val_set, batch_size=32)
    model = AnomalyPredictor(**SMALL_SET_MODEL, input_dim=8, max_iters=2 * len(train_loader))
    trainer = quiet_trainer(max_epochs=2, callbacks=[RunLog()], num_sanity_val_steps=0)
    capsys.readouterr()
    trainer.fit(model, train_loader, val_loader)
    out, err = capsys.readouterr()
    params = sum(p.numel() for p in model.parameters()) / 1e6
    lines = out.splitlines()
    assert len(lines) == 3, out
    assert lines[0] == (
        f"Training AnomalyPredictor ({params:.2f} M parameters) on cpu: 2 epochs of "
        f"{len(train_loader)} steps"
    )
    epochs = [EPOCH_LINE.fullmatch(line) for line in lines[1:]]
    assert all(epochs), lines[1:]
    assert [int(epoch[1]) for epoch in epochs] == [1, 2]
    # The last epoch's numbers are what Lightning holds at the end, and its val acc the trained
    # model's accuracy over the validation sets, counted here.
    metrics = trainer.callback_metrics
    assert epochs[1][2] == f"{100 * float(metrics['train_acc']):.2f}"
    assert epochs[1][3] == f"{100 * float(metrics['val_acc']):.2f}"
    model.eval()
    with torch.no_grad():
        right = sum(
            (model.anomaly_logits(sets).argmax(dim=-1) == label).sum().item()
            for sets, _, label in val_loader
        )
    assert epochs[1][3] == f"{100 * right / len(val_set):.2f}"
    # Not a terminal: no progress bar, on stdout or stderr (where tqdm draws).
    assert "\r" not in out + err and "Epoch" not in err


def test_an_epoch_line_shows_the_training_accuracy_each_task_logs(capsys):
    # seq2seq logs the teacher-forced tokens' accuracy in training, whole sequences in validation.
    log = RunLog()
    trainer = types.SimpleNamespace(
        is_global_zero=True,
        current_epoch=0,
        max_epochs=10,
        callback_metrics={"train_token_acc": torch.tensor(0.8), "val_acc": torch.tensor(0.994)},
    )
    log.epoch_start = time.time()
    log.on_train_epoch_end(trainer, None)
    assert re.fullmatch(
        r"Epoch 1/10: train token acc 80\.00%, val acc 99\.40% \(\d+\.\d s\)\n",
        capsys.readouterr().out,
    )


def interrupt(log, fn, exception=None, is_global_zero=True):
    """What log.on_exception prints to stderr for exception (Ctrl-C's KeyboardInterrupt) raised
    while the trainer did fn, with a stand-in for the trainer."""
    trainer = types.SimpleNamespace(
        is_global_zero=is_global_zero, state=types.SimpleNamespace(fn=fn)
    )
    log.on_exception(trainer, None, exception or KeyboardInterrupt())


def test_ctrl_c_says_how_to_go_on(tmp_path, capsys):
    last = tmp_path / "last.ckpt"
    log = RunLog(last_path=str(last))
    closed = []
    log.bar = types.SimpleNamespace(close=lambda: closed.append(True))
    interrupt(log, TrainerFn.FITTING)  # before the first epoch was saved
    assert closed == [True] and log.bar is None  # the bar is closed before the line
    assert capsys.readouterr() == (
        "",
        "\nInterrupted; no epoch had finished, so nothing was saved: run the same command again.\n",
    )
    interrupt(RunLog(), TrainerFn.FITTING)  # a run that keeps no last.ckpt
    assert "no epoch had finished" in capsys.readouterr().err
    last.write_bytes(b"")
    interrupt(log, TrainerFn.FITTING)
    assert capsys.readouterr().err == (
        f"\nInterrupted; {last} holds the run after its last finished epoch: run the same command "
        "with --resume to continue from there.\n"
    )
    interrupt(log, TrainerFn.TESTING)
    assert capsys.readouterr().err == (
        "\nInterrupted; the saved model is kept: run the command again, without --retrain or "
        "--resume, to evaluate it.\n"
    )
    # Another error is Python's to show, and only the first process speaks.
    interrupt(log, TrainerFn.FITTING, exception=ValueError("other"))
    interrupt(log, TrainerFn.FITTING, is_global_zero=False)
    assert capsys.readouterr() == ("", "")


# Messages as Lightning and torch word them: the four that quiet_lightning silences, then one a
# user should still see.
SILENCED = [
    "The 'train_dataloader' does not have many workers which may be a bottleneck.",
    "Checkpoint directory /tmp/run/checkpoints exists and is not empty.",
    "You defined a `validation_step` but have no `val_dataloader`. Skipping val loop.",
    "`isinstance(treespec, LeafSpec)` is deprecated, use `treespec.is_leaf()` instead.",
]
SHOWN = "The number of training batches (3) is smaller than the logging interval."


def test_quiet_lightning_silences_lightnings_info_lines_and_the_warnings_it_names():
    loggers = [logging.getLogger(name) for name in ("pytorch_lightning", "lightning_fabric")]
    levels, filters = [logger.level for logger in loggers], list(warnings.filters)
    try:
        with warnings.catch_warnings(record=True) as shown:
            warnings.resetwarnings()  # without pytest.ini's filters: quiet_lightning's alone
            warnings.simplefilter("always")
            for logger in loggers:
                logger.setLevel(logging.INFO)
            quiet_lightning()
            assert [logger.level for logger in loggers] == [logging.WARNING] * 2
            assert not any(logger.isEnabledFor(logging.INFO) for logger in loggers)
            for message in [*SILENCED, SHOWN]:
                warnings.warn(message, UserWarning, stacklevel=1)
        assert [str(w.message) for w in shown] == [SHOWN]
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
    assert warnings.filters == filters  # the test leaves no global change behind


# Each module imported after those it imports, so that each import runs only its own code.
MODULES = in_import_order(import_graph())
IMPORT_CHECK = """
import importlib, logging, sys, warnings
# What the modules import from other packages, first: their own settings are theirs.
import matplotlib.pyplot, matplotlib.ticker, numpy, PIL.Image, tqdm.auto, torch.distributed
import pytorch_lightning.callbacks, pytorch_lightning.loggers, pytorch_lightning.utilities
import torch.fx.experimental.optimization, torch.utils.tensorboard, torchvision.models
from tensorboard.backend.event_processing import event_accumulator

def state():
    loggers = logging.root.manager.loggerDict.items()
    levels = {n: g.level for n, g in loggers if isinstance(g, logging.Logger) and g.level}
    return levels, [repr(f) for f in warnings.filters]

for name in sys.argv[1:]:
    before = state()
    importlib.import_module(name)
    if state() != before:
        print(name, "changed", [s for s in state() if s not in before])
"""


def test_importing_a_module_changes_no_logging_level_or_warning_filter():
    proc = run_code(IMPORT_CHECK, *MODULES)
    assert_ran(proc)
    assert proc.stdout == "", proc.stdout  # the modules that changed them, and what they set
