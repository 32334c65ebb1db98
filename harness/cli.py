"""The commands' flags: train.py's (each task's defaults, each value checked as it is parsed),
predict.py's, visualize.py's and bench.py's. `python <command> -h` shows them. Only the standard
library here: each script parses its command line before the large libraries load, so that -h and
a mistyped flag answer at once. (The checks that need the run's folder and device are
runs.check_before_work.)
"""

import argparse
import difflib
import math
import os
import shlex

DESCRIPTION = """\
The post's experiment end to end (数据处理和模型训练, 模型训练和推理): CIFAR-100 features from a
ResNet34, sets of 10 with one odd image, a 4-layer Transformer encoder that finds it; and two
sequence tasks: the tutorial's reversal, and sorting with the encoder-decoder.

    python train.py                  # the post's run; a second run loads the saved model, evaluates
    python train.py --synthetic      # every stage offline on generated images, in seconds on a CPU
    python train.py --task reverse   # the tutorial's sequence task: reverse a sequence (encoder)
    python train.py --task seq2seq   # the decoder the post describes: sorting, token by token

Defaults given as 'a; b; c' are those of --task anomaly; reverse; seq2seq.
"""

# The post's folders: where CIFAR-100 goes and where features, models and results go.
DATASET_PATH = "datasets"
CHECKPOINT_PATH = "saved_models"
SYNTHETIC_EPOCHS = 2  # --synthetic's epochs: its data are small, a run takes seconds
# What runs without CIFAR-100 and the ResNet34 weights, for a run that could not download them.
OFFLINE = (
    "Offline? `python train.py --synthetic` runs every stage on generated images, in seconds; "
    "`python train.py --pretrained` tests the tutorial author's model instead of training one "
    "(with the same features, so these files too)."
)

# Each task's defaults, the one place they are set: the post's run for anomaly, the tutorial's for
# reverse. A flag overrides any of them.
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


def usable_cores():
    """The CPU cores this process may run on (its affinity: a container's or taskset's share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


# Feature extraction's DataLoader workers: one per core, at most the post's 4.
DEFAULT_WORKERS = min(4, usable_cores())


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


FLOAT32_MAX = 3.4028234663852886e38  # the largest float32: the optimizer computes in float32


def learning_rate(text):
    value = float(text)
    if not 0.0 < value <= FLOAT32_MAX:
        raise argparse.ArgumentTypeError(
            f"must be greater than 0 and at most {FLOAT32_MAX:.4g}, the largest float32 that the "
            f"optimizer computes with, got {value:g}"
        )
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
    ("lr", learning_rate, "Adam learning rate"),
    ("warmup", positive_int, "warm-up steps of the learning-rate schedule"),
    ("epochs", positive_int, "epochs"),
    ("gradient_clip_val", positive_float, "gradient-norm clipping"),
]

# Every other flag: (name, argparse settings). "%(default)s" in a help shows the default.
FLAGS = [
    ("--seed", dict(type=seed, default=42, help="random seed (default: %(default)s)")),
    ("--data-dir", dict(default=DATASET_PATH,
        help="where CIFAR-100 is or goes (default: %(default)s)")),
    ("--checkpoint-dir", dict(default=CHECKPOINT_PATH,
        help="feature caches, logs, models and results (default: %(default)s)")),
    ("--accelerator", dict(choices=["auto", "cpu", "cuda", "gpu", "mps"], default="auto",
        help="where to extract features, sample sets and train; auto: CUDA, then Apple's MPS, then "
        "the CPU, as Lightning chooses (default: auto)")),
    ("--precision", dict(choices=["32-true", "16-mixed", "bf16-mixed"], default="32-true",
        help="Lightning's training precision; 16-mixed becomes bf16-mixed on a CPU "
        "(default: %(default)s)")),
    ("--devices", dict(type=positive_int, default=1, help="devices to train on (default: 1)")),
    ("--strategy", dict(default="auto", help="Lightning strategy, e.g. ddp (default: auto)")),
    ("--fast", dict(action="store_true",
        help="the fast path: batched feature extraction, sets sampled on the device, fused "
        "attention, cheaper dropout masks, fused Adam (see BENCHMARKS.md); the same model and "
        "checkpoints")),
    ("--num-workers", dict(type=int, default=DEFAULT_WORKERS,
        help="DataLoader workers of the feature extraction (default: one per core, at most the "
        "post's 4; here %(default)s)")),
    ("--fast-dev-run", dict(action="store_true",
        help="one training and one validation batch, then test that model; saves nothing")),
    ("--compile", dict(action="store_true",
        help="train through torch.compile: the forward as one graph, its backward derived by AOT "
        "autograd (CUDA graphs on a GPU); for accelerators: slower than eager on a 2-core CPU")),
    ("--retrain", dict(action="store_true", help="train anew even if a saved model exists")),
    ("--pretrained", dict(action="store_true",
        help="evaluate the tutorial author's trained model (anomaly and reverse) instead of "
        "training one: downloaded once to <checkpoint-dir>/pretrained/ and verified; results in "
        "<checkpoint-dir>/pretrained/<TaskName>/results.json")),
    ("--resume", dict(action="store_true", help="continue an interrupted training")),
    ("--synthetic", dict(action="store_true",
        help="generated images and an untrained ResNet34 instead of CIFAR-100: offline, small, "
        "fast; writes under <checkpoint-dir>/synthetic/")),
]  # fmt: skip


def task_defaults_text(name):
    """A flag's defaults as the help shows them: 'anomaly; reverse; seq2seq' from TASK_DEFAULTS."""
    values = [f"{d[name]:g}" for d in TASK_DEFAULTS.values() if d[name] is not None]
    if name == "epochs":
        values[0] += f" ({SYNTHETIC_EPOCHS} with --synthetic)"
    return "; ".join(values)


class Parser(argparse.ArgumentParser):
    """argparse's parser, whose error is one line: a mistyped flag names the closest one, and -h
    is named for the rest, instead of the usage block. A flag is taken only as spelled in full:
    argparse would take `--epoch 3` for --epochs, a flag the user never wrote."""

    def __init__(self, prog, description, **settings):
        super().__init__(
            prog=prog,
            description=description,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            allow_abbrev=False,
            **settings,
        )

    def error(self, message):
        unknown = message.removeprefix("unrecognized arguments: ")
        if unknown != message:
            flags = [flag for action in self._actions for flag in action.option_strings]
            words = [word.split("=")[0] for word in unknown.split() if word.startswith("-")]
            close = [match for word in words for match in difflib.get_close_matches(word, flags, 1)]
            message += f"; did you mean {', '.join(close)}?" if close else ""
        self.exit(2, f"{self.prog}: error: {message} (`python {self.prog} -h` lists every flag)\n")


def make_parser():
    """train.py's parser."""
    p = Parser("train.py", DESCRIPTION)
    p.add_argument(
        "--task",
        choices=list(TASK_DEFAULTS),
        default="anomaly",
        help="anomaly: the post's set anomaly detection (default); reverse: the tutorial's "
        "sequence reversal; seq2seq: sorting with the encoder-decoder",
    )
    for name, kind, what in TASK_FLAGS:
        flag, default = "--" + name.replace("_", "-"), task_defaults_text(name)
        p.add_argument(flag, type=kind, help=f"{what} (default: {default})")
    for flag, settings in FLAGS:
        p.add_argument(flag, **settings)
    return p


def refuse_for_pretrained(p, args):
    """--pretrained evaluates the published model as it is, trained with the tutorial's settings:
    a flag that would change or train it is refused."""
    from harness.pretrained import PUBLISHED  # with torch: loaded only when asked for

    if args.task not in PUBLISHED:
        p.error(f"--pretrained: the tutorial publishes models for --task anomaly and reverse, "
                f"not {args.task}")  # fmt: skip
    given = [name for name, _, _ in TASK_FLAGS if getattr(args, name) is not None]
    cannot = [n for n in given if n != "batch_size"] + ["devices"] * (args.devices > 1)
    flags = ("retrain", "resume", "synthetic", "compile", "fast_dev_run")
    cannot += [name for name in flags if getattr(args, name)]
    if cannot:
        flags = ", ".join("--" + name.replace("_", "-") for name in cannot)
        p.error(f"--pretrained evaluates the published model as it is: it cannot take {flags}")


def parse_args(argv=None):
    """The run's settings: the flags given, each task's defaults (TASK_DEFAULTS) for the others."""
    p = make_parser()
    args = p.parse_args(argv)
    if args.synthetic and args.task != "anomaly":
        p.error("--synthetic replaces CIFAR-100 for --task anomaly; sequence tasks need no data")
    if args.set_size is not None and args.task != "anomaly":
        p.error("--set-size belongs to --task anomaly")
    if args.pretrained:
        refuse_for_pretrained(p, args)
    task_defaults = dict(TASK_DEFAULTS[args.task])
    if args.synthetic:
        task_defaults["epochs"] = SYNTHETIC_EPOCHS
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
    if args.num_workers > usable_cores():  # more would only wait for each other
        p.error(
            f"--num-workers {args.num_workers}: this process may use {usable_cores()} CPU "
            "cores, a worker each at most"
        )
    return args


def train_command(*flags, synthetic=False, checkpoint_dir=CHECKPOINT_PATH, task="anomaly"):
    """The train.py command, as a user types it, that makes or remakes what a message is about:
    `python train.py [--task T] [--synthetic] [flags] [--checkpoint-dir D]`, each part only where
    it is not the default; a folder with spaces is quoted for the shell."""
    words = ["python", "train.py"] + ["--task", task] * (task != "anomaly")
    words += ["--synthetic"] * synthetic + list(flags)
    if checkpoint_dir != CHECKPOINT_PATH:
        words += ["--checkpoint-dir", shlex.quote(str(checkpoint_dir))]
    return " ".join(words)


def predict_parser(description):
    """predict.py's parser; description: predict.py's docstring."""
    p = Parser("predict.py", description)
    add = p.add_argument
    add("images", nargs="*", help="two or more image files, or one folder of them")
    add(
        "--pretrained",
        action="store_true",
        help="the tutorial author's trained set model (SetAnomalyTask.ckpt, downloaded once to "
        "<checkpoint-dir>/pretrained/ and verified, as train.py --pretrained does) with the "
        "ImageNet ResNet34: no CIFAR-100, no training",
    )
    add(
        "--checkpoint-dir",
        default=CHECKPOINT_PATH,
        help="where train.py saved its model (default: %(default)s)",
    )
    add("--ckpt", help="the model file (default: <checkpoint-dir>/SetAnomalyDetect.ckpt)")
    add("--json", action="store_true", help="print the result as JSON")
    add("--figure", help="save the images, their probabilities and attention maps to this PNG")
    add(
        "--set-sizes",
        type=set_size,
        nargs="+",
        metavar="N",
        help="instead of images: the model's accuracy on the cached test features at these sizes",
    )
    add(
        "--synthetic",
        action="store_true",
        help="the model and backbone of `python train.py --synthetic` (untrained ResNet34)",
    )
    return p


def visualize_parser(description):
    """visualize.py's parser; description: visualize.py's docstring."""
    p = Parser("visualize.py", description)
    add = p.add_argument
    add(
        "--checkpoint-dir",
        default=CHECKPOINT_PATH,
        help="where train.py saved its models (default: %(default)s)",
    )
    add("--data-dir", default=DATASET_PATH, help="where CIFAR-100 is (default: %(default)s)")
    add(
        "--synthetic",
        action="store_true",
        help="the set task's figures of python train.py --synthetic, from its generated images, "
        "into <checkpoint-dir>/synthetic/figures/ (no CIFAR-100 needed)",
    )
    return p


def bench_parser(description):
    """bench.py's parser; description: bench.py's docstring. The limits are checked by bench.py."""
    p = Parser("bench.py", description)
    add = p.add_argument
    add("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    add(
        "--steps",
        type=int,
        default=60,
        help="timed training steps per path, at least 50 for a steady median (default: 60)",
    )
    add(
        "--warmup",
        type=int,
        default=10,
        help="untimed training steps first, at least 1 (default: 10)",
    )
    add(
        "--images",
        type=int,
        default=256,
        help="images to time extraction on, 1 to 60000 (default: 256)",
    )
    add(
        "--min-seconds",
        type=float,
        default=10,
        help="least timed extraction, in seconds, 0 or more (default: 10)",
    )
    add(
        "--rounds",
        type=int,
        default=2,
        help="turns per path, the best counts, at least 1 (default: 2)",
    )
    add("--out", default="bench.json", help="where the results go (default: %(default)s)")
    add(
        "--ablation",
        action="store_true",
        help="only the training step: faithful, each part of the fast path alone, and all of them",
    )
    add(
        "--threads",
        action="store_true",
        help="only the set task's epoch with each setting of the CPU threads, quiet and beside 1 "
        "and 2 busy processes (--rounds turns each, the median counts); takes minutes",
    )
    return p
