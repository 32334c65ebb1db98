"""train.py's command line: its flags, each task's defaults (train.py's TASK_DEFAULTS), each value
checked as it is parsed, and the parser every command uses (Parser; the other commands' flags are
commands.py's). Only the standard library here: each script parses its command line before the
large libraries load, so that -h and a mistyped flag answer at once. (The checks that need the
run's folder and device are preflight.py's.)
"""

import argparse
import difflib
import math
import os

from harness.folders import PUBLISHED_FILES
from harness.threads import usable_cores

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

SYNTHETIC_EPOCHS = 2  # --synthetic's epochs: its data are small, a run takes seconds
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


def valid_seed(text):
    value = int(text)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**32) as numpy's seeds are, got {value}")
    return value


def valid_set_size(text):
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(
            f"a set needs the anomaly and at least one other image: at least 2, got {value}"
        )
    return value


# The flags whose defaults depend on --task, with what each sets; train.py's TASK_DEFAULTS holds
# the values.
TASK_FLAGS = [
    ("set_size", valid_set_size, "images per set, the anomaly included"),
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
    ("--seed", dict(type=valid_seed, default=42, help="random seed (default: %(default)s)")),
    ("--data-dir", dict(help="where CIFAR-100 is or goes (default: %(default)s)")),
    ("--checkpoint-dir",
        dict(help="feature caches, logs, models and results (default: %(default)s)")),
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


def task_defaults_text(task_defaults, name):
    """A flag's defaults as the help shows them, 'anomaly; reverse; seq2seq', from task_defaults."""
    values = [f"{d[name]:g}" for d in task_defaults.values() if d[name] is not None]
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


def make_parser(task_defaults, data_dir, checkpoint_dir):
    """train.py's parser, with train.py's defaults: each task's (task_defaults) and its folders."""
    p = Parser("train.py", DESCRIPTION)
    p.add_argument(
        "--task",
        choices=list(task_defaults),
        default="anomaly",
        help="anomaly: the post's set anomaly detection (default); reverse: the tutorial's "
        "sequence reversal; seq2seq: sorting with the encoder-decoder",
    )
    for name, kind, what in TASK_FLAGS:
        flag, default = "--" + name.replace("_", "-"), task_defaults_text(task_defaults, name)
        p.add_argument(flag, type=kind, help=f"{what} (default: {default})")
    for flag, settings in FLAGS:
        p.add_argument(flag, **settings)
    p.set_defaults(data_dir=data_dir, checkpoint_dir=checkpoint_dir)
    return p


def refuse_for_pretrained(p, args):
    """--pretrained evaluates the published model as it is, trained with the tutorial's settings:
    a flag that would change or train it is refused."""
    if args.task not in PUBLISHED_FILES:
        p.error(f"--pretrained: the tutorial publishes models for --task anomaly and reverse, "
                f"not {args.task}")  # fmt: skip
    given = [name for name, _, _ in TASK_FLAGS if getattr(args, name) is not None]
    cannot = [n for n in given if n != "batch_size"] + ["devices"] * (args.devices > 1)
    flags = ("retrain", "resume", "synthetic", "compile", "fast_dev_run")
    cannot += [name for name in flags if getattr(args, name)]
    if cannot:
        flags = ", ".join("--" + name.replace("_", "-") for name in cannot)
        p.error(f"--pretrained evaluates the published model as it is: it cannot take {flags}")


def parse_args(argv, task_defaults, data_dir, checkpoint_dir):
    """train.py's settings: the flags given in argv (None: the command line's), and train.py's
    defaults for the others (make_parser)."""
    p = make_parser(task_defaults, data_dir, checkpoint_dir)
    args = p.parse_args(argv)
    if args.synthetic and args.task != "anomaly":
        p.error("--synthetic replaces CIFAR-100 for --task anomaly; sequence tasks need no data")
    if args.set_size is not None and args.task != "anomaly":
        p.error("--set-size belongs to --task anomaly")
    if args.pretrained:
        refuse_for_pretrained(p, args)
    defaults = dict(task_defaults[args.task])
    if args.synthetic:
        defaults["epochs"] = SYNTHETIC_EPOCHS
    for name, value in defaults.items():
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
