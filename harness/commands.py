"""The command lines of predict.py, visualize.py and bench.py, and the train.py command that a
message of theirs suggests. Only the standard library here, as in cli.py, whose Parser they use.
"""

import shlex

from harness.cli import Parser, valid_set_size


def train_command(*flags, synthetic=False, checkpoint_dir=None, task="anomaly", default_dir=None):
    """The train.py command, as a user types it, that makes or remakes what a message is about:
    `python train.py [--task T] [--synthetic] [flags] [--checkpoint-dir D]`, each part only where
    it is not the default (default_dir: train.py's CHECKPOINT_PATH); a folder with spaces is
    quoted for the shell."""
    words = ["python", "train.py"] + ["--task", task] * (task != "anomaly")
    words += ["--synthetic"] * synthetic + list(flags)
    if checkpoint_dir is not None and checkpoint_dir != default_dir:
        words += ["--checkpoint-dir", shlex.quote(str(checkpoint_dir))]
    return " ".join(words)


# fmt: off
def predict_parser(description):
    """predict.py's parser; description: predict.py's docstring."""
    p = Parser("predict.py", description)
    add = p.add_argument
    add("images", nargs="*", help="two or more image files, or one folder of them")
    add("--pretrained", action="store_true",
        help="the tutorial author's trained set model (SetAnomalyTask.ckpt, downloaded once to "
        "<checkpoint-dir>/pretrained/ and verified, as train.py --pretrained does) with the "
        "ImageNet ResNet34: no CIFAR-100, no training")
    add("--checkpoint-dir",
        help="where train.py saved its model (default: train.py's CHECKPOINT_PATH, saved_models)")
    add("--ckpt", help="the model file (default: <checkpoint-dir>/SetAnomalyDetect.ckpt)")
    add("--json", action="store_true", help="print the result as JSON")
    add("--figure", help="save the images, their probabilities and attention maps to this PNG")
    add("--set-sizes", type=valid_set_size, nargs="+", metavar="N",
        help="instead of images: the model's accuracy on the cached test features at these sizes")
    add("--synthetic", action="store_true",
        help="the model and backbone of `python train.py --synthetic` (untrained ResNet34)")
    return p


def visualize_parser(description):
    """visualize.py's parser; description: visualize.py's docstring."""
    p = Parser("visualize.py", description)
    add = p.add_argument
    add("--checkpoint-dir",
        help="where train.py saved its models (default: train.py's CHECKPOINT_PATH, saved_models)")
    add("--data-dir", help="where CIFAR-100 is (default: train.py's DATASET_PATH, datasets)")
    add("--synthetic", action="store_true",
        help="the set task's figures of python train.py --synthetic, from its generated images, "
        "into <checkpoint-dir>/synthetic/figures/ (no CIFAR-100 needed)")
    return p


def bench_parser(description):
    """bench.py's parser; description: bench.py's docstring. The limits are checked by bench.py."""
    p = Parser("bench.py", description)
    add = p.add_argument
    add("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    add("--steps", type=int, default=60,
        help="timed training steps per path, at least 50 for a steady median (default: 60)")
    add("--warmup", type=int, default=10,
        help="untimed training steps first, at least 1 (default: 10)")
    add("--images", type=int, default=256,
        help="images to time extraction on, 1 to 60000 (default: 256)")
    add("--min-seconds", type=float, default=10,
        help="least timed extraction, in seconds, 0 or more (default: 10)")
    add("--rounds", type=int, default=2,
        help="turns per path, the best counts, at least 1 (default: 2)")
    add("--out", default="bench.json", help="where the results go (default: %(default)s)")
    add("--ablation", action="store_true",
        help="only the training step: faithful, each part of the fast path alone, and all of them")
    add("--threads", action="store_true",
        help="only the set task's epoch with each setting of the CPU threads, quiet and beside 1 "
        "and 2 busy processes (--rounds turns each, the median counts); takes minutes")
    return p
# fmt: on
