"""train.py's command line (cli.py): the post's and the tutorial's defaults, values refused with
argparse's error, flags refused where they mean nothing; and importing a module changes no global
state."""

import os
import subprocess
import sys
from importlib.metadata import version

import pytest

from harness.cli import parse_args
from helpers import HANG_GUARD_S, ROOT, run_script


def test_defaults_are_the_posts_run():
    args = parse_args([])
    assert (
        args.task,
        args.set_size,
        args.batch_size,
        args.model_dim,
        args.num_heads,
        args.num_layers,
    ) == ("anomaly", 10, 64, 256, 4, 4)
    assert (
        args.dropout,
        args.input_dropout,
        args.lr,
        args.warmup,
        args.epochs,
        args.gradient_clip_val,
    ) == (0.1, 0.1, 5e-4, 100, 100, 2.0)
    assert (args.seed, args.data_dir, args.checkpoint_dir) == (42, "datasets", "saved_models")
    # Feature extraction's workers: the post's 4, but never more than this machine's cores.
    assert args.num_workers == min(4, len(os.sched_getaffinity(0)))


@pytest.mark.parametrize(
    "argv",
    [
        ["--epochs", "0"],
        ["--set-size", "1"],
        ["--model-dim", "10", "--num-heads", "4"],
        ["--dropout", "1"],
        ["--dropout", "-0.1"],
        ["--input-dropout", "1.5"],
        ["--lr", "0"],
        ["--lr", "inf"],
        ["--gradient-clip-val", "nan"],
        ["--batch-size", "0"],
        ["--task", "other"],
        ["--num-workers", "-1"],
        ["--seed", "-1"],
        ["--seed", str(2**32)],
        ["--fast-dev-run", "--resume"],
        ["--checkpoint-dir", ""],
        ["--checkpoint-dir", __file__],
        ["--data-dir", __file__],
    ],
)
def test_invalid_values_get_an_argparse_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_sequence_tasks_have_the_tutorials_defaults():
    args = parse_args(["--task", "reverse"])
    assert (
        args.batch_size,
        args.model_dim,
        args.num_heads,
        args.num_layers,
        args.dropout,
        args.lr,
        args.warmup,
        args.epochs,
        args.gradient_clip_val,
    ) == (128, 32, 1, 1, 0.0, 5e-4, 50, 10, 5.0)
    assert parse_args(["--task", "seq2seq", "--epochs", "3"]).epochs == 3


@pytest.mark.parametrize(
    "argv", [["--task", "reverse", "--synthetic"], ["--task", "seq2seq", "--set-size", "5"]]
)
def test_anomaly_only_flags_are_refused_for_sequence_tasks(argv):
    with pytest.raises(SystemExit):
        parse_args(argv)


@pytest.mark.parametrize(
    "argv",
    [
        ["--retrain"],
        ["--resume"],
        ["--synthetic"],
        ["--model-dim", "128"],
        ["--epochs", "3"],
        ["--set-size", "5"],
        ["--compile"],
        ["--task", "seq2seq"],
    ],
)
def test_flags_it_cannot_honour_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--pretrained", *argv])
    assert exit_info.value.code == 2 and "--pretrained" in capsys.readouterr().err


# Each module imported after those it imports, so that each import runs only its own code.
MODULES = [
    "harness.files", "harness.stops", "data", "features", "harness.synthetic", "model",
    "harness.runs", "harness.pretrained", "harness.cli", "harness.runlog", "train", "predict",
    "visualize", "bench",
]  # fmt: skip
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
    proc = subprocess.run(
        [sys.executable, "-c", IMPORT_CHECK, *MODULES],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=HANG_GUARD_S,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == "", proc.stdout  # the modules that changed them, and what they set


def test_a_torchvision_of_another_build_is_one_line_naming_both(tmp_path):
    """As a CPU torch beside a CUDA torchvision fails: on loading, an operator is missing."""
    fake = tmp_path / "torchvision"
    fake.mkdir()
    (fake / "__init__.py").write_text(
        'raise RuntimeError("operator torchvision::nms does not exist")\n'
    )
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    proc = run_script("train.py", "--task", "reverse", "--checkpoint-dir", tmp_path, env=env)
    torch, torchvision = version("torch"), version("torchvision")
    assert proc.returncode == 1 and proc.stderr == (
        f"error: torchvision {torchvision} does not fit torch {torch} (operator torchvision::nms "
        "does not exist). Install the two together: pip install --force-reinstall torch "
        "torchvision (add --index-url https://download.pytorch.org/whl/cpu for the CPU build).\n"
    )
