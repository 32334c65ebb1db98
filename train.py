"""The post's experiment end to end (数据处理和模型训练, 模型训练和推理): CIFAR-100 features from a
ResNet34, sets of 10 with one odd image, a 4-layer Transformer encoder that finds it; and two
sequence tasks from the tutorial.

    python train.py                  # the post's run; a second run loads the saved model, evaluates
    python train.py --synthetic      # every stage offline on generated images, in seconds on a CPU
    python train.py --task reverse   # the tutorial's sequence task: reverse a sequence (encoder)
    python train.py --task seq2seq   # the decoder the post describes: sorting, token by token
"""

import argparse
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import sys
import time
import urllib.request
import warnings

import numpy as np
import pytorch_lightning as pl
import torch
import torch.utils.data as data
import torchvision
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only
from tqdm.auto import tqdm

from data import ReverseDataset, SetAnomalyDataset, SetBatches, SortDataset, anomaly_datasets
from features import MissingResources, cifar100_features, download_timeout, save_atomically
from model import FAST_PARTS, AnomalyPredictor, ReversePredictor, Seq2SeqPredictor
from synthetic import SYNTHETIC, synthetic_features

# Each task's defaults, the one place they are set: the post's run for anomaly, the tutorial's for
# reverse. A flag overrides any of them; `python train.py -h` shows them all.
TASK_DEFAULTS = {
    "anomaly": dict(set_size=10, batch_size=64, model_dim=256, num_heads=4, num_layers=4,
                    dropout=0.1, input_dropout=0.1, lr=5e-4, warmup=100, epochs=100,
                    gradient_clip_val=2.0),
    "reverse": dict(set_size=None, batch_size=128, model_dim=32, num_heads=1, num_layers=1,
                    dropout=0.0, input_dropout=0.0, lr=5e-4, warmup=50, epochs=10,
                    gradient_clip_val=5.0),
    "seq2seq": dict(set_size=None, batch_size=128, model_dim=64, num_heads=4, num_layers=2,
                    dropout=0.0, input_dropout=0.0, lr=1e-3, warmup=100, epochs=10,
                    gradient_clip_val=5.0),
}  # fmt: skip
# Each task's folder (<name>/: logs, checkpoints, results.json) and best model (<name>.ckpt).
TASK_NAMES = {"anomaly": "SetAnomalyDetect", "reverse": "ReverseTask", "seq2seq": "Seq2SeqTask"}
# The tutorial author's trained models (--pretrained): each task's file in phlippe/saved_models, and
# the file's git blob id there, which the download must match.
PUBLISHED_URL = "https://raw.githubusercontent.com/phlippe/saved_models/main/tutorial6/"
PUBLISHED = {
    "anomaly": ("SetAnomalyTask.ckpt", "d968830ea075a328847da19f8c349655d03ca88e"),
    "reverse": ("ReverseTask.ckpt", "fc76b13c0207fc8c3c3acdd2f453277024442b28"),
}
# The sequence tasks' data, as in the tutorial: 10 categories, length 16, 50 000 / 1 000 / 10 000.
NUM_CATEGORIES, SEQ_LEN, SEQ_SIZES = 10, 16, {"train": 50000, "val": 1000, "test": 10000}

# Feature extraction's DataLoader workers: one per core, at most the post's 4.
DEFAULT_WORKERS = min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 4)

# The run prints its own lines; Lightning's INFO lines (devices found, a logging-service tip, "Seed
# set to") would bury them. Its warnings still show.
for _name in ("pytorch_lightning", "lightning_fabric"):
    logging.getLogger(_name).setLevel(logging.WARNING)
# Warnings that ask nothing of a user: the set loaders read features already in memory (workers
# would only add start-up time), and Lightning still uses a pytree class newer torch deprecates.
warnings.filterwarnings("ignore", ".*does not have many workers.*")
# --resume goes on in the checkpoint folder it resumes from (a new run empties it first).
warnings.filterwarnings("ignore", "Checkpoint directory .* exists and is not empty")
warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated")


# --------------------------------------------------------------------------------------------------
# Where a run keeps its files, and reading them back (train.py, predict.py and visualize.py)
# --------------------------------------------------------------------------------------------------


def run_dir(checkpoint_dir, synthetic=False):
    """The folder of a run's feature caches and models: <checkpoint-dir>, or for --synthetic its
    synthetic/ sub-folder, apart from a real run's files."""
    return os.path.join(checkpoint_dir, "synthetic") if synthetic else checkpoint_dir


def task_dir(run_folder, task="anomaly"):
    """A task's folder in a run folder: <TaskName>/, with its logs, checkpoints and results.json."""
    return os.path.join(run_folder, TASK_NAMES[task])


def last_checkpoint(run_folder, task="anomaly"):
    """A task's full checkpoint (optimizer, scheduler, loop state), replaced after every epoch, that
    --resume continues from: <TaskName>/checkpoints/last.ckpt, beside the best epoch's weights."""
    return os.path.join(task_dir(run_folder, task), "checkpoints", "last.ckpt")


def model_file(run_folder, task="anomaly"):
    """A task's best model in a run folder: <TaskName>.ckpt (the post's SetAnomalyDetect.ckpt)."""
    return task_dir(run_folder, task) + ".ckpt"


def read_checkpoint(path):
    """The dict of the Lightning checkpoint at path; raises ValueError saying what is wrong."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise ValueError(f"{path} cannot be read ({type(error).__name__})") from None
    if not (isinstance(ckpt, dict) and "state_dict" in ckpt and "hyper_parameters" in ckpt):
        raise ValueError(
            f"{path} is not a Lightning checkpoint (the post's torch.save(model, ...) writes a "
            "pickled module instead)"
        )
    return ckpt


def io_mismatch(hparams, io_dims):
    """Where a saved model's hyper-parameters differ from io_dims, the task's inputs and outputs
    (input_dim, num_classes), as "name saved (needs wanted)": a model of another task differs."""
    hparams = hparams if isinstance(hparams, dict) else {}
    return [
        f"{k} {hparams.get(k)!r} (needs {v})" for k, v in io_dims.items() if hparams.get(k) != v
    ]


def save_json(path, obj):
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)

    save_atomically(path, write)


# --------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def probability(text):
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def positive_float(text):
    value = float(text)
    if not 0.0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number greater than 0, got {value}")
    return value


def seed(text):
    value = int(text)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**32) as numpy's seeds are, got {value}")
    return value


def set_size(text):
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(
            f"a set needs the anomaly and at least one other image: at least 2, got {value}"
        )
    return value


# The flags whose defaults depend on --task, with what each sets; TASK_DEFAULTS holds the values.
TASK_FLAGS = [
    ("set_size", set_size, "images per set, the anomaly included"),
    ("batch_size", positive_int, "sets or sequences per batch"),
    ("model_dim", positive_int, "features inside the Transformer"),
    ("num_heads", positive_int, "attention heads"),
    ("num_layers", positive_int, "encoder (and decoder) layers"),
    ("dropout", probability, "dropout in the Transformer"),
    ("input_dropout", probability, "dropout on the inputs"),
    ("lr", positive_float, "Adam learning rate"),
    ("warmup", positive_int, "warm-up steps of the learning-rate schedule"),
    ("epochs", positive_int, "epochs"),
    ("gradient_clip_val", positive_float, "gradient-norm clipping"),
]


def task_defaults_text(name):
    """A flag's defaults as the help shows them: 'anomaly; reverse; seq2seq' from TASK_DEFAULTS."""
    values = [f"{d[name]:g}" for d in TASK_DEFAULTS.values() if d[name] is not None]
    if name == "epochs":
        values[0] += f" ({SYNTHETIC['epochs']} with --synthetic)"
    return "; ".join(values)


def make_parser():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = p.add_argument
    add(
        "--task",
        choices=list(TASK_DEFAULTS),
        default="anomaly",
        help="anomaly: the post's set anomaly detection (default); reverse: the tutorial's "
        "sequence reversal; seq2seq: sorting with the encoder-decoder",
    )
    for name, kind, what in TASK_FLAGS:
        add(
            "--" + name.replace("_", "-"),
            type=kind,
            help=f"{what} (default: {task_defaults_text(name)})",
        )
    add("--seed", type=seed, default=42, help="random seed (default: %(default)s)")
    add("--data-dir", default="datasets", help="where CIFAR-100 is or goes (default: %(default)s)")
    add(
        "--checkpoint-dir",
        default="saved_models",
        help="feature caches, logs, models and results (default: %(default)s)",
    )
    add(
        "--accelerator",
        choices=["auto", "cpu", "cuda", "gpu", "mps"],
        default="auto",
        help="where to extract features, sample sets and train; auto: CUDA, then Apple's MPS, then "
        "the CPU, as Lightning chooses (default: auto)",
    )
    add(
        "--precision",
        choices=["32-true", "16-mixed", "bf16-mixed"],
        default="32-true",
        help="Lightning's training precision; 16-mixed becomes bf16-mixed on a CPU "
        "(default: %(default)s)",
    )
    add("--devices", type=positive_int, default=1, help="devices to train on (default: 1)")
    add("--strategy", default="auto", help="Lightning strategy, e.g. ddp (default: auto)")
    add(
        "--fast",
        action="store_true",
        help="the fast path: batched feature extraction, sets sampled on the device, fused "
        "attention, cheaper dropout masks, fused Adam (see BENCHMARKS.md); the same model and "
        "checkpoints",
    )
    add(
        "--num-workers",
        type=int,
        default=DEFAULT_WORKERS,
        help="DataLoader workers of the feature extraction (default: one per core, at most the "
        "post's 4; here %(default)s)",
    )
    add(
        "--fast-dev-run",
        action="store_true",
        help="one training and one validation batch, then test that model; saves nothing",
    )
    add(
        "--compile",
        action="store_true",
        help="train through torch.compile, the forward and backward as one graph (CUDA graphs on "
        "a GPU); for accelerators: slower than eager on a 2-core CPU",
    )
    add("--retrain", action="store_true", help="train anew even if a saved model exists")
    add(
        "--pretrained",
        action="store_true",
        help="evaluate the tutorial author's trained model (anomaly and reverse) instead of "
        "training one: downloaded once to <checkpoint-dir>/pretrained/ and verified; results in "
        "<checkpoint-dir>/pretrained/<TaskName>/results.json",
    )
    add("--resume", action="store_true", help="continue an interrupted training")
    add(
        "--synthetic",
        action="store_true",
        help="generated images and an untrained ResNet34 instead of CIFAR-100: offline, small, "
        "fast; writes under <checkpoint-dir>/synthetic/",
    )
    p.epilog = "Defaults given as 'a; b; c' are those of --task anomaly; reverse; seq2seq."
    return p


def parse_args(argv=None):
    """The run's settings: the flags given, each task's defaults (TASK_DEFAULTS) for the others."""
    p = make_parser()
    args = p.parse_args(argv)
    if args.synthetic and args.task != "anomaly":
        p.error("--synthetic replaces CIFAR-100 for --task anomaly; sequence tasks need no data")
    if args.set_size is not None and args.task != "anomaly":
        p.error("--set-size belongs to --task anomaly")
    if args.pretrained:
        if args.task not in PUBLISHED:
            p.error(f"--pretrained: the tutorial publishes models for --task anomaly and reverse, "
                    f"not {args.task}")  # fmt: skip
        # The published model is evaluated as it is: it was trained with the tutorial's settings.
        given = [name for name, _, _ in TASK_FLAGS if getattr(args, name) is not None]
        cannot = [n for n in given if n != "batch_size"] + ["devices"] * (args.devices > 1)
        flags = ("retrain", "resume", "synthetic", "compile", "fast_dev_run")
        cannot += [name for name in flags if getattr(args, name)]
        if cannot:
            flags = ", ".join("--" + name.replace("_", "-") for name in cannot)
            p.error(f"--pretrained evaluates the published model as it is: it cannot take {flags}")
    task_defaults = dict(TASK_DEFAULTS[args.task])
    if args.synthetic:
        task_defaults["epochs"] = SYNTHETIC["epochs"]
    for name, value in task_defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.fast_dev_run and args.resume:
        p.error("--fast-dev-run checks one batch of a new model; it cannot --resume a training")
    for flag, folder in (("--checkpoint-dir", args.checkpoint_dir), ("--data-dir", args.data_dir)):
        if not folder or (os.path.exists(folder) and not os.path.isdir(folder)):
            p.error(f"{flag} must name a folder (made if missing), got {folder!r}")
    if args.model_dim % args.num_heads != 0:
        p.error(f"--model-dim {args.model_dim} must be divisible by --num-heads {args.num_heads}")
    if args.num_workers < 0:
        p.error(f"--num-workers must be 0 or more, got {args.num_workers}")
    return args


# --------------------------------------------------------------------------------------------------
# 数据处理: features, datasets and loaders
# --------------------------------------------------------------------------------------------------


def anomaly_setup(args, run_folder, device):
    """The set task's model class, its input and output sizes, and its datasets: cached features,
    the post's split, sets. Exits with a message on missing or unusable data."""
    try:
        if args.synthetic:
            feats = synthetic_features(run_folder, device, args.num_workers, args.fast)
        else:
            feats = cifar100_features(
                args.data_dir, run_folder, device, args.num_workers, args.fast
            )
        datasets = anomaly_datasets(*feats["train"], *feats["test"], args.set_size)
    except (MissingResources, ValueError) as error:
        sys.exit(f"error: {error}")
    # Train accuracy is measured on fixed sets of the training images, drawn as val's and test's
    # are, so that one model always scores the same; training itself draws fresh sets.
    train = datasets["train"]
    datasets["train_eval"] = SetAnomalyDataset(train.img_feats, train.labels, args.set_size, False)
    return AnomalyPredictor, dict(input_dim=feats["train"][0].shape[-1], num_classes=1), datasets


def sequence_setup(args):
    """The sequence tasks' model class, sizes and data, drawn from torch's generator after seeding,
    in the order train, val, test."""
    if args.task == "reverse":
        datasets = {s: ReverseDataset(NUM_CATEGORIES, SEQ_LEN, n) for s, n in SEQ_SIZES.items()}
        sizes = dict(input_dim=NUM_CATEGORIES, num_classes=NUM_CATEGORIES)
        return ReversePredictor, sizes, datasets
    datasets = {s: SortDataset(NUM_CATEGORIES, SEQ_LEN, n) for s, n in SEQ_SIZES.items()}
    vocabulary = NUM_CATEGORIES + 3  # the digits, then BOS, EOS and PAD
    return Seq2SeqPredictor, dict(input_dim=vocabulary, num_classes=vocabulary), datasets


def make_loaders(args, datasets, device):
    """Batches of each of datasets ("train", then the evaluation sets): the post's DataLoaders, or
    with --fast (set task) SetBatches, which samples whole batches with tensor operations on a
    device."""
    if args.fast and args.task == "anomaly":
        return {s: SetBatches(ds, args.batch_size, device, args.seed) for s, ds in datasets.items()}
    loaders = {
        split: data.DataLoader(dataset, args.batch_size, shuffle=False, drop_last=False)
        for split, dataset in datasets.items()
    }
    loaders["train"] = data.DataLoader(
        datasets["train"],
        args.batch_size,
        shuffle=True,
        drop_last=True,
        pin_memory=device.type == "cuda",
    )
    return loaders


def model_hparams(args, io_dims, steps_per_epoch):
    """The model's constructor arguments for this run: io_dims (input_dim, num_classes), the
    flags."""
    return dict(
        io_dims,
        model_dim=args.model_dim,
        num_heads=args.num_heads,
        num_layers=args.num_layers,
        lr=args.lr,
        warmup=args.warmup,
        max_iters=args.epochs * steps_per_epoch,
        dropout=args.dropout,
        input_dropout=args.input_dropout,
    )


# --------------------------------------------------------------------------------------------------
# 模型训练和推理: training, loading the saved model, testing
# --------------------------------------------------------------------------------------------------


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
            for name in ("train_acc", "val_acc")
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
            note = "the saved model is kept: run the same command again to evaluate it."
        elif self.last_path and os.path.isfile(self.last_path):
            note = (
                f"{self.last_path} holds the run after its last finished epoch: run the same "
                "command with --resume to continue from there."
            )
        else:
            note = "no epoch had finished, so nothing was saved: run the same command again."
        print(f"\nInterrupted; {note}", file=sys.stderr, flush=True)


def make_trainer(args, root_dir, callbacks, **overrides):
    """The Lightning Trainer of a run: devices, precision, epochs, clipping, each process's seed,
    TensorBoard logs under root_dir. The run prints its own progress (RunLog)."""
    logs = os.path.join(root_dir, "lightning_logs")
    version = None  # a new version_N folder; --resume goes on in the newest, so its curves continue
    if args.resume and os.path.isdir(logs):
        found = [name[8:] for name in os.listdir(logs) if name.startswith("version_")]
        version = max((int(n) for n in found if n.isdigit()), default=None)
    settings = dict(
        default_root_dir=root_dir,
        callbacks=[*callbacks, SeedEachProcess(args.seed)],
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        logger=TensorBoardLogger(root_dir, "lightning_logs", version, default_hp_metric=False),
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator=args.accelerator,
        devices=args.devices,
        strategy=args.strategy,
        precision=args.precision,
        max_epochs=args.epochs,
        gradient_clip_val=args.gradient_clip_val,
        fast_dev_run=args.fast_dev_run,
    )
    try:
        return pl.Trainer(**dict(settings, **overrides))
    except Exception as error:  # Lightning refuses settings it cannot use, e.g. an unknown strategy
        sys.exit(f"error: {error}")


def fast_parts(args):
    """The parts of the fast path inside the model: all with --fast, except that --compile keeps
    PyTorch's dropout, since the CPU's bit masks are drawn by numpy, outside any compiled graph."""
    if not args.fast:
        return ()
    return tuple(part for part in FAST_PARTS if not (args.compile and part == "dropout"))


def compile_training_forward(model, device, backend="inductor"):
    """Compiles model's forward for training with torch.compile, as one graph (fullgraph: a graph
    break is an error), forward and backward; on CUDA with CUDA graphs (mode reduce-overhead), which
    launch a step's many small kernels at once. Evaluation keeps the eager forward: it runs once an
    epoch, with batches of other sizes, each of which would cost a compilation."""
    mode = "reduce-overhead" if device.type == "cuda" and backend == "inductor" else None
    compiled = torch.compile(model.forward, fullgraph=True, mode=mode, backend=backend)
    eager = model.forward
    model.forward = lambda *args, **kwargs: (compiled if model.training else eager)(*args, **kwargs)
    return model


def run_settings(args):
    """The run's settings that a saved model must match besides its hyper-parameters."""
    settings = dict(
        batch_size=args.batch_size,
        epochs=args.epochs,
        gradient_clip_val=args.gradient_clip_val,
        seed=args.seed,
    )
    if args.task == "anomaly":
        settings["set_size"] = args.set_size
    return settings


def check_saved_model(path, hparams, args, hint):
    """Stops with a message if the model saved at path is unreadable or was trained with other
    settings than asked for."""
    try:
        ckpt = read_checkpoint(path)
    except ValueError as error:
        sys.exit(f"error: {error}. {hint}")
    trained_with = ckpt.get("train_settings", {})
    saved = dict(ckpt["hyper_parameters"], **trained_with)
    asked = dict(hparams, **{k: v for k, v in run_settings(args).items() if k in trained_with})
    differ = [f"{k} {saved.get(k)!r} (asked {v!r})" for k, v in asked.items() if saved.get(k) != v]
    if differ:
        sys.exit(
            f"error: {path} was trained with other settings than asked for: "
            f"{', '.join(differ)}. {hint}"
        )


def resume_from(args, hparams, last):
    """With --resume, the last checkpoint, once its schedule and weights are shown to fit what is
    asked; otherwise None, after clearing its folder (its checkpoints would be mistaken for this
    run's)."""
    if args.resume:
        hint = "Resume with the settings of the interrupted run, or train anew without --resume."
        check_saved_model(last, hparams, args, hint)
        return last
    if not args.fast_dev_run:  # a fast dev run writes no checkpoint, so it clears none
        shutil.rmtree(os.path.dirname(last), ignore_errors=True)
    return None


def save_model(best_checkpoint, path, args):
    """Keeps the best epoch at path as a Lightning checkpoint with the run's settings (the post's
    torch.save(model, ...) pickles the module, which load_from_checkpoint cannot read)."""
    ckpt = read_checkpoint(best_checkpoint)
    ckpt["train_settings"] = run_settings(args)
    save_atomically(path, lambda tmp: torch.save(ckpt, tmp))


def train_model(args, model_class, hparams, loaders, run_folder, seconds):
    """The post's train_anomaly, for every task: load the saved model if there is one, otherwise
    fit, reload the best epoch and save it; then test it on each split. Returns ({"val_acc": ...},
    trained), or None on every process but the first when several train. Fills seconds."""
    start = time.time()
    root_dir, saved = task_dir(run_folder, args.task), model_file(run_folder, args.task)
    last_path = last_checkpoint(run_folder, args.task)
    log = RunLog(last_path)

    trained = args.retrain or args.resume or args.fast_dev_run or not os.path.isfile(saved)
    if not trained:
        hint = "Run with --retrain to train a new model in its place, or another --checkpoint-dir."
        check_saved_model(saved, hparams, args, hint)
        print(f"Found the saved model {saved}, loading it...")
        model = model_class.load_from_checkpoint(saved, fast=fast_parts(args))
    else:
        checkpoints = os.path.dirname(last_path)
        best = ModelCheckpoint(checkpoints, monitor="val_acc", mode="max", save_weights_only=True)
        last = ModelCheckpoint(checkpoints, filename="last")  # for --resume
        callbacks = [log] if args.fast_dev_run else [log, best, last]
        # Logged at least once an epoch, so that even a short run has training curves.
        every = min(50, hparams["max_iters"] // args.epochs)  # steps per epoch of each process
        trainer = make_trainer(args, root_dir, callbacks, log_every_n_steps=every)
        model = model_class(**hparams, fast=fast_parts(args))
        if args.compile:
            compile_training_forward(model, pick_device(args.accelerator))
        checkpoint = resume_from(args, hparams, last_path)
        trainer.fit(model, loaders["train"], loaders["val"], ckpt_path=checkpoint)
        if not trainer.is_global_zero:  # with several processes, the first alone saves and tests
            return None
        if not args.fast_dev_run:  # a fast dev run checkpoints nothing: it tests the model it has
            model = model_class.load_from_checkpoint(best.best_model_path, fast=fast_parts(args))
            save_model(best.best_model_path, saved, args)
            score = f"val acc {100 * float(best.best_model_score):.2f}%"
            print(f"Saved the best epoch ({score}) as {saved}")
    seconds["train"] = time.time() - start

    start = time.time()
    result = test_model(args, model, loaders, root_dir)
    seconds["evaluate"] = time.time() - start
    return result, trained


def test_model(args, model, loaders, root_dir):
    """{"train_acc", "val_acc", "test_acc"} of model (sequence tasks: val and test), tested by
    Lightning on one process, over the full sets (no padded copies). The set task's train accuracy
    is on its fixed training sets. Not logged: results.json holds it."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # the other processes have finished
    log = RunLog()
    tester = make_trainer(args, root_dir, [log], devices=1, strategy="auto", logger=False)
    splits = ("train", "val", "test") if args.task == "anomaly" else ("val", "test")
    result = {}
    for split in splits:
        log.label = f"Testing on the {split} {'sets' if args.task == 'anomaly' else 'sequences'}"
        loader = loaders["train_eval" if split == "train" else split]
        result[f"{split}_acc"] = tester.test(model, loader, verbose=False)[0]["test_acc"]
    return result


# --------------------------------------------------------------------------------------------------
# The tutorial author's trained models: --pretrained
# --------------------------------------------------------------------------------------------------


def git_blob_id(path):
    """The id git gives the file at path: the SHA-1 of b"blob <size>\\0" and its bytes."""
    with open(path, "rb") as f:
        contents = f.read()
    return hashlib.sha1(b"blob %d\0" % len(contents) + contents).hexdigest()


def published_model(checkpoint_dir, task):
    """(path, git blob id) of the tutorial's model for task at <checkpoint-dir>/pretrained/, first
    downloaded if it is not there. A download is kept only once it is whole and verified; a file
    that is there is used only if its id is the published one. Exits with one line otherwise."""
    name, expected = PUBLISHED[task]
    path = os.path.join(checkpoint_dir, "pretrained", name)
    if not os.path.isfile(path):
        url = PUBLISHED_URL + name
        print(f"Downloading {url} to {path}")

        def download(tmp):
            # A new opener reads the proxy settings now; urlopen's is built once per process.
            opener = urllib.request.build_opener()
            with download_timeout(), opener.open(url) as response, open(tmp, "wb") as f:
                shutil.copyfileobj(response, f)
            found = git_blob_id(tmp)
            if found != expected:
                raise ValueError(f"the file downloaded has git blob id {found}, not {expected}")

        try:
            save_atomically(path, download)
        except (OSError, ValueError) as error:  # no network, HTTP errors, another file
            sys.exit(
                f"error: cannot get {url} ({type(error).__name__}: {error}). To place it by hand, "
                f"download it to {path}."
            )
    found = git_blob_id(path)
    if found != expected:
        sys.exit(
            f"error: {path} is not the published {name}: its git blob id is {found}, the "
            f"published one {expected}. Delete it and run again to download it."
        )
    return path, found


def load_published(path, model_class, io_dims, args):
    """The model saved at path, loaded strictly into model_class with its own hyper-parameters,
    once they are shown to fit the task's inputs and outputs (io_dims). Exits with one line
    otherwise."""
    try:
        hparams = read_checkpoint(path)["hyper_parameters"]
    except ValueError as error:
        sys.exit(f"error: {error}. Delete it and run again to download the published model.")
    differ = io_mismatch(hparams, io_dims)
    if differ:
        sys.exit(f"error: {path} is not a model for --task {args.task}: {', '.join(differ)}.")
    try:
        return model_class.load_from_checkpoint(
            path, map_location="cpu", strict=True, fast=fast_parts(args)
        )
    except Exception as error:  # missing or misshapen weights, hyper-parameters it cannot take
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        sys.exit(
            f"error: {path} does not load into {model_class.__name__} "
            f"({type(error).__name__}: {first_line})."
        )


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def pick_device(accelerator):
    """The device --accelerator names, chosen as Lightning chooses it for training (auto and gpu:
    CUDA, then Apple's MPS; auto then the CPU); features and sets are made there too. Exits with
    one line if there is no such device here."""
    is_there = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    available = [kind for kind, there in is_there.items() if there]
    if accelerator == "auto":
        return torch.device((available + ["cpu"])[0])
    wanted = ["cuda", "mps"] if accelerator == "gpu" else [accelerator]
    found = [kind for kind in wanted if kind == "cpu" or kind in available]
    if not found:
        kinds = " or ".join(kind.upper() for kind in wanted)
        sys.exit(
            f"error: --accelerator {accelerator}: this machine has no {kinds} device that PyTorch "
            "can use. Use --accelerator auto or cpu."
        )
    return torch.device(found[0])


def device_name(device):
    """The GPU's name, or the CPU's as the platform reports it: what results are measured on."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or "cpu"


def main(argv=None):
    args = parse_args(argv)
    if rank_zero_only.rank > 0:  # a process that Lightning's DDP started: the first one prints
        sys.stdout = open(os.devnull, "w")
    start, seconds = time.time(), {}
    run_folder = run_dir(args.checkpoint_dir, args.synthetic)
    root_dir = task_dir(run_folder, args.task)
    last_path = last_checkpoint(run_folder, args.task)
    if args.resume and not os.path.isfile(last_path):
        sys.exit(
            f"error: --resume found no {last_path} to continue from. "
            "Run without --resume to start anew."
        )
    device = pick_device(args.accelerator)
    try:  # every output goes here: find out now, not after hours of work, that it cannot
        os.makedirs(run_folder, exist_ok=True)
        if not os.access(run_folder, os.W_OK):
            raise PermissionError("not writable")
    except OSError as error:
        sys.exit(f"error: --checkpoint-dir: cannot write to {run_folder} ({error}).")
    if args.pretrained:  # fetched and verified first: the features may take long
        published, blob_id = published_model(args.checkpoint_dir, args.task)

    if args.task == "anomaly":
        model_class, io_dims, datasets = anomaly_setup(args, run_folder, device)
        seconds["features"] = time.time() - start
    # Seeded after the features: extracting them draws random numbers, and a run must not depend
    # on whether their caches were already there.
    pl.seed_everything(args.seed, verbose=False)
    if args.task != "anomaly":
        model_class, io_dims, datasets = sequence_setup(args)
    loaders = make_loaders(args, datasets, device)
    if len(loaders["train"]) == 0:
        sys.exit(
            f"error: --batch-size {args.batch_size} is larger than the "
            f"{len(datasets['train'])} training items."
        )
    # With several processes each takes every N-th item (Lightning's DistributedSampler): fewer
    # steps.
    per_process = math.ceil(len(datasets["train"]) / args.devices)
    steps_per_epoch = len(loaders["train"]) if args.devices == 1 else per_process // args.batch_size
    hparams = model_hparams(args, io_dims, steps_per_epoch)

    extra = {}
    if args.pretrained:  # the tutorial author's model, tested here; its results go apart
        model = load_published(published, model_class, io_dims, args)
        print(f"Testing the tutorial author's model {published}")
        root_dir = task_dir(os.path.join(args.checkpoint_dir, "pretrained"), args.task)
        test_start = time.time()
        result, trained = test_model(args, model, loaders, root_dir), False
        seconds["evaluate"] = time.time() - test_start
        extra = dict(
            pretrained=os.path.basename(published),
            git_blob_id=blob_id,
            hyper_parameters=dict(model.hparams),
        )
        checkpoint = published
    else:
        outcome = train_model(args, model_class, hparams, loaders, run_folder, seconds)
        if outcome is None:
            return None
        result, trained = outcome
        checkpoint = None if args.fast_dev_run else model_file(run_folder, args.task)
    seconds["total"] = time.time() - start
    for split in ("train", "val", "test"):
        if f"{split}_acc" in result:
            print(f"{split.capitalize() + ' accuracy:':16s}{100.0 * result[f'{split}_acc']:4.2f}%")

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pytorch_lightning": pl.__version__,
        "numpy": np.__version__,
    }
    results = dict(
        result,
        trained=trained,
        checkpoint=checkpoint,
        **extra,
        settings=vars(args),
        device=device_name(device),
        versions=versions,
        seconds=seconds,
    )
    if args.fast_dev_run:  # a one-batch check must not replace a real run's results
        print("Fast dev run: results not saved.")
        return results
    results_file = os.path.join(root_dir, "results.json")
    save_json(results_file, results)
    print(f"Results written to {results_file}")
    return results


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # during training, RunLog says how to resume; files are never half
        sys.exit("\nInterrupted; every file is whole: run the same command again to go on.")
