"""Pictures of the post's ideas and of the trained models: PNG files in <checkpoint-dir>/figures/.

    python visualize.py [--checkpoint-dir saved_models] [--data-dir datasets]
    python visualize.py --synthetic   # the run of train.py --synthetic: <checkpoint-dir>/synthetic/

Always made: the positional-encoding table (嵌入表示层) and the warm-up + cosine learning-rate
factor. Made when their inputs are on disk, otherwise skipped with a one-line note: the reverse
model's attention (python train.py --task reverse), and, for the set task (python train.py, plus
CIFAR-100 in --data-dir), example sets, one set's prediction with every attention map, the model's
worst mistakes and the training curves from the run's TensorBoard logs. With --synthetic the set
task's figures come from the generated images and the model of python train.py --synthetic: every
kind of picture of the real run, with no download.
"""

from harness import stops

if __name__ == "__main__":
    stops.while_starting()  # Ctrl-C or SIGTERM from the start on: one line, no traceback
    from harness import commands, threads

    threads.wait_briefly()  # before torch loads: how its idle threads wait
    commands.visualize_parser(__doc__).parse_args()  # -h, a mistyped flag: answered before torch


import contextlib
import functools
import json
import os
import sys
import textwrap

import matplotlib

matplotlib.use("Agg")  # files only, no screen needed
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib import font_manager, ft2font, patheffects
from matplotlib.ticker import MaxNLocator
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torchvision.datasets import CIFAR100

from data import SEQ_LEN, ReverseDataset, SetAnomalyDataset
from features import CIFAR100_CLASSES
from harness import commands
from harness.caches import cached_test_features, cifar100_meta
from harness.checkpoints import load_model
from harness.files import make_and_check_folder, save_atomically
from harness.folders import ROOT, last_checkpoint, model_file, run_dir, run_from_elsewhere, task_dir
from harness.lock import lock_folder
from harness.synthetic import SYNTHETIC, GeneratedImages, synthetic_meta
from harness.verdict import is_clear, percent_texts
from model import AnomalyPredictor, CosineWarmupScheduler, PositionalEncoding, ReversePredictor
from train import CHECKPOINT_PATH, DATASET_PATH, IO_DIMS, TASK_DEFAULTS

# The train.py command that makes what a figure needs; train.py's own folder left out.
train_command = functools.partial(commands.train_command, default_dir=CHECKPOINT_PATH)

DPI = 100  # a figure of w×h inches is a PNG of (100·w)×(100·h) pixels
# Fonts that draw Chinese, the post's language and that of file names such as 猫.jpg, of Linux,
# Windows and macOS, the first found preferred: matplotlib's own DejaVu Sans draws none.
CJK_FONTS = (
    "Noto Sans CJK SC", "Noto Sans SC", "Source Han Sans SC", "WenQuanYi Zen Hei",
    "WenQuanYi Micro Hei", "Droid Sans Fallback", "SimHei", "Microsoft YaHei", "PingFang SC",
    "Hiragino Sans GB", "Heiti SC", "Arial Unicode MS",
)  # fmt: skip


def use_cjk_font():
    """Puts the first of CJK_FONTS installed here behind matplotlib's font: each character that
    font lacks is then drawn with it. Returns the font's name, or None where there is none."""
    installed = {font.name for font in font_manager.fontManager.ttflist}
    found = next((name for name in CJK_FONTS if name in installed), None)
    if found:
        plt.rcParams["font.family"] = [plt.rcParams["font.sans-serif"][0], found]
    return found


@functools.cache
def font_characters(families):
    """The characters that the fonts of families (rcParams' font.family) can draw."""
    characters = set()
    for family in families:
        with contextlib.suppress(ValueError):  # a family not installed here draws nothing
            path = font_manager.findfont(family, fallback_to_default=False)
            characters |= set(ft2font.FT2Font(path).get_charmap())
    return characters


def drawable(text):
    """text with each character that no font of the figures has (Chinese where no CJK font is
    installed) written as its code, "\\u706b", instead of a box and a warning."""
    known = font_characters(tuple(plt.rcParams["font.family"]))
    return "".join(c if ord(c) in known or not c.isprintable() else ascii(c)[1:-1] for c in text)


use_cjk_font()


def save_figure(fig, path):
    """Writes fig as a PNG at path (atomically) and closes it; returns path."""
    save_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
    plt.close(fig)
    return path


def plot_positional_encoding(path_table, path_curves, d_model=48, max_len=96):
    """PositionalEncoding's sine/cosine table as a heat map, and four dimensions of it as curves."""
    pe = PositionalEncoding(d_model=d_model, max_len=max_len).pe[0].numpy()  # [max_len, d_model]
    fig, ax = plt.subplots(figsize=(8, 4))
    image = ax.imshow(
        pe.T,
        cmap="RdGy",
        aspect="auto",
        extent=(0.5, max_len + 0.5, d_model + 0.5, 0.5),
        vmin=-1,
        vmax=1,
    )
    # sin and cos span [-1, 1]: the bar shows both ends and the middle.
    fig.colorbar(image, ax=ax, label="encoding value", ticks=[-1, -0.5, 0, 0.5, 1])
    ax.set_title("Positional encoding over positions and hidden dimensions")
    ax.set_xlabel("Position in sequence")
    ax.set_ylabel("Hidden dimension")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    save_figure(fig, path_table)

    fig, axes = plt.subplots(2, 2, figsize=(8, 6))
    for dim, ax in enumerate(axes.flat):
        ax.plot(np.arange(1, 17), pe[:16, dim], color=f"C{dim}", marker="o", markersize=5)
        ax.set_title(f"Encoding in hidden dimension {dim + 1}")
        ax.set_xlabel("Position in sequence")
        ax.set_ylabel("Positional encoding")
        ax.set_ylim(-1.1, 1.1)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle("Four dimensions of the positional encoding")
    fig.tight_layout()
    return path_table, save_figure(fig, path_curves)


def plot_lr_schedule(path, warmup=100, max_iters=2000):
    """The factor by which CosineWarmupScheduler multiplies the learning rate, step by step."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = CosineWarmupScheduler(optimizer, warmup=warmup, max_iters=max_iters)
    steps = np.arange(max_iters)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, [scheduler.get_lr_factor(t) for t in steps])
    ax.set_title(f"Cosine learning-rate schedule with {warmup} warm-up steps")
    ax.set_xlabel("Optimizer step")
    ax.set_ylabel("Learning-rate factor")
    fig.tight_layout()
    return save_figure(fig, path)


def caption(name, percent, width_in, fontsize=8):
    """'name: p=12.34%' wrapped to lines that fit width_in inches at fontsize, so that long file
    names under neighbouring images neither meet nor leave the figure."""
    # 0.7 em a character: wider than the average of DejaVu Sans, matplotlib's font.
    chars = max(int(width_in * 72 / (0.7 * fontsize)), 8)
    return "\n".join(textwrap.wrap(f"{name}: p={percent}", chars))


def mark_predicted(ax):
    """A red frame and a red label: the image the model picks as the odd one out."""
    for spine in ax.spines.values():
        spine.set_edgecolor("red")
        spine.set_linewidth(3)
    ax.xaxis.label.set_color("red")


def plot_image_rows(path, images, title, probs=None, row_label="Set"):
    """Rows of images, one row per set (anomaly last), each image's probability under it if given,
    the predicted anomaly of each row framed in red.

    images - [Sets, SetSize, H, W, 3] floats in [0, 1];  probs - [Sets, SetSize] or None
    """
    num_rows, num_cols = images.shape[:2]
    fig, axes = plt.subplots(
        num_rows, num_cols, figsize=(1.2 * num_cols, 1.3 * num_rows + 0.6), squeeze=False
    )
    for r in range(num_rows):
        texts = percent_texts(probs[r]) if probs is not None else None
        for c in range(num_cols):
            ax = axes[r, c]
            ax.imshow(images[r, c])
            ax.set_xticks([])
            ax.set_yticks([])
            if probs is None:
                ax.set_xlabel("anomaly" if c == num_cols - 1 else f"image {c + 1}", fontsize=8)
                continue
            predicted, true = c == np.argmax(probs[r]), c == num_cols - 1
            notes = ("\ntrue anomaly" if true else "") + ("\npredicted" if predicted else "")
            ax.set_xlabel(f"p={texts[c]}{notes}", fontsize=8)
            if predicted:
                mark_predicted(ax)
        axes[r, 0].set_ylabel(f"{row_label} {r + 1}", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_attention_grid(fig, attention_maps, tick_labels, key_label, query_label):
    """Draws every layer's and head's attention into fig as matrices: query i is row i from the
    top, key j column j from the left. Each map's colours run from 0 to its largest weight, and
    its colour bar gives that weight and marks 1/n, the weight of even attention over n keys: a
    map whose weights all lie near 1/n looks flat, one that picks a single key does not.

    attention_maps - layers × [Head, Query, Key], each row a distribution over the keys
    """
    num_layers, num_heads = len(attention_maps), attention_maps[0].shape[0]
    axes = fig.subplots(num_layers, num_heads, squeeze=False)
    keys = attention_maps[0].shape[-1]
    ticks = tick_positions(len(tick_labels))
    # White edged in black, wider than the bar: seen on viridis' dark bottom and yellow top alike.
    edged = [patheffects.withStroke(linewidth=4.5, foreground="black")]
    for layer, maps in enumerate(attention_maps):
        for head in range(num_heads):
            ax = axes[layer, head]
            high = max(float(maps[head].max()), 1 / keys)
            image = ax.imshow(maps[head], origin="upper", vmin=0, vmax=high)
            ax.set_xticks(ticks, [tick_labels[i] for i in ticks], fontsize=7)
            ax.set_yticks(ticks, [tick_labels[i] for i in ticks], fontsize=7)
            ax.set_xlabel(key_label, fontsize=8)
            ax.set_ylabel(query_label, fontsize=8)
            ax.set_title(f"Layer {layer + 1}, head {head + 1}", fontsize=9)
            bar = fig.colorbar(image, ax=ax, shrink=0.8)
            bar.set_ticks([0, high], labels=["0", f"{high:.3g}"], fontsize=7)
            bar.ax.axhline(
                1 / keys, -0.3, 1.3, color="white", linewidth=2.5, path_effects=edged, clip_on=False
            )
            bar.set_label(f"attention weight; line: 1/{keys}, all {keys} alike", fontsize=7)


def tick_positions(count):
    """The indices of count positions that get a labelled tick: all of up to 16, otherwise the
    first and every 5th or 10th (about ten), so that the numbers never run into each other."""
    if count <= 16:
        return list(range(count))
    step = 5 if count <= 60 else 10
    return [0] + list(range(step - 1, count, step))


def plot_set_prediction(path, images, probs, attention_maps, title=None, names=None, clear=True):
    """One set: its images with the predicted probability of each being the anomaly, the predicted
    one framed in red, and the attention maps of every layer and head.

    images         - [SetSize, H, W, 3] in [0, 1]
    probs          - [SetSize]
    attention_maps - layers × [Head, SetSize, SetSize]
    title          - defaults to the prediction against the true anomaly, the last image
    names          - labels under the images
    clear          - False: no image stands out (verdict.is_clear), none is framed or "predicted"
    """
    set_size, num_layers, num_heads = len(images), len(attention_maps), attention_maps[0].shape[0]
    # Rows of at most 10 images; maps grow with the set, so that its positions stay apart.
    per_row = min(set_size, 10)
    rows = -(-set_size // per_row)
    side = min(2.6 + 0.05 * max(set_size - 10, 0), 4.5)
    width = max(1.2 * per_row, side * num_heads)
    fig = plt.figure(figsize=(width, 2.0 * rows + side * num_layers), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[2.0 * rows, side * num_layers])
    cells = top.subplots(rows, per_row, squeeze=False).flat
    axes = list(cells)[:set_size]
    for ax in list(cells)[set_size:]:
        ax.axis("off")  # the last row's empty places
    predicted, texts = int(np.argmax(probs)), percent_texts(probs)
    for i, ax in enumerate(axes):
        ax.imshow(images[i])
        ax.set_xticks([])
        ax.set_yticks([])
        label = caption(drawable(str(names[i])) if names else i + 1, texts[i], width / per_row)
        ax.set_xlabel(label + ("\npredicted" if clear and i == predicted else ""), fontsize=8)
    if clear:
        mark_predicted(axes[predicted])
    axes[0].set_ylabel("image", fontsize=8)
    truth = f"the true one is image {set_size}"
    verdict = f"Predicted anomaly: image {predicted + 1} ({truth})"
    if not clear:
        verdict = (
            f"No clear odd one out: image {predicted + 1} is the most likely "
            f"({texts[predicted]}); {truth}"
        )
    top.suptitle(drawable(title or verdict))
    numbers = [str(i + 1) for i in range(set_size)]
    plot_attention_grid(bottom, attention_maps, numbers, "attended image (key)", "image (query)")
    return save_figure(fig, path)


def plot_reverse_attention(path, sequence, attention_maps):
    """The reverse model's attention for one input sequence: layers × heads maps over positions,
    output position (query) i in row i from the top, so that reversal is the anti-diagonal."""
    num_layers, num_heads = len(attention_maps), attention_maps[0].shape[0]
    # Square maps with their bars, 5 in wide: 4.4 in tall holds them without a band of empty
    # space between the title and the maps.
    fig = plt.figure(figsize=(5 * num_heads, 4.4 * num_layers + 0.4), layout="constrained")
    fig.suptitle(
        f"Reverse task attention for the input {' '.join(str(int(t)) for t in sequence)}",
        fontsize=10,
    )
    positions = [str(i + 1) for i in range(len(sequence))]
    keys, queries = "input position (key)", "output position (query)"
    plot_attention_grid(fig, attention_maps, positions, keys, queries)
    return save_figure(fig, path)


def read_scalars(log_folder):
    """{tag: {step: value}} of the scalars in all TensorBoard event files of one log folder. Where a
    step repeats (--resume writes on into the folder and may go over steps again) the value written
    last is kept."""
    written = {}  # tag -> [(wall time, step, value)]
    for name in sorted(os.listdir(log_folder)):
        if not name.startswith("events.out.tfevents"):
            continue
        # size_guidance 0 keeps every scalar (TensorBoard keeps a sample of 10 000 by default);
        # repeated steps are resolved below, not purged by the reader.
        events = EventAccumulator(
            os.path.join(log_folder, name), size_guidance={"scalars": 0}, purge_orphaned_data=False
        )
        events.Reload()
        for tag in events.Tags()["scalars"]:
            items = ((e.wall_time, e.step, e.value) for e in events.Scalars(tag))
            written.setdefault(tag, []).extend(items)
    return {
        tag: {step: value for _, step, value in sorted(items, key=lambda item: item[0])}
        for tag, items in written.items()
    }


def newest_training_logs(logs):
    """(folder, read_scalars of it): the newest version_N folder in logs that holds training
    scalars (train_loss and Lightning's epoch), or None."""
    if not os.path.isdir(logs):
        return None
    numbers = [n[8:] for n in os.listdir(logs) if n.startswith("version_") and n[8:].isdigit()]
    for number in sorted(map(int, numbers), reverse=True):
        folder = os.path.join(logs, f"version_{number}")
        scalars = read_scalars(folder)
        if "train_loss" in scalars and "epoch" in scalars:
            return folder, scalars
    return None


def per_epoch(scalars, tag):
    """(epochs [E], values [E]) of one tag of read_scalars: each epoch (counted from 1) in which it
    was logged and the mean of its values there. A step's epoch is the "epoch" scalar that
    Lightning logs with every metric (at a step without it, that of the next step with it)."""
    epoch_steps = np.array(sorted(scalars["epoch"]))
    epoch_at = np.array([scalars["epoch"][s] for s in epoch_steps])
    steps = np.array(sorted(scalars[tag]))
    values = np.array([scalars[tag][s] for s in steps])
    nearest = np.minimum(np.searchsorted(epoch_steps, steps), len(epoch_steps) - 1)
    epochs = epoch_at[nearest].astype(int) + 1
    unique = np.unique(epochs)
    return unique, np.array([values[epochs == e].mean() for e in unique])


def plot_training_curves(path, scalars, title, set_size=10):
    """The set task's loss and accuracy per epoch from a run's logs (read_scalars): the mean
    training loss of the steps logged in each epoch, validation loss, training and validation
    accuracy, each where logged, with chance (1 / set_size) drawn for comparison."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    # Why training lies below validation: it draws fresh sets with dropout on, validation scores
    # the same fixed sets without dropout.
    training, validation = "training: fresh sets, dropout on", "validation: fixed sets, no dropout"
    losses = {"train_loss": f"{training} (mean of the logged steps)", "val_loss": validation}
    accuracies = {"train_acc": training, "val_acc": validation}
    for ax, ylabel, scale, curves in (
        (axes[0], "Loss", 1, losses),
        (axes[1], "Accuracy (%)", 100, accuracies),
    ):
        for tag, label in curves.items():
            if tag in scalars:
                epochs, values = per_epoch(scalars, tag)
                ax.plot(epochs, scale * values, marker="o", markersize=4, label=label)
        if scale == 100:
            ax.axhline(
                100 / set_size, color="grey", linestyle="--", label=f"chance (1 in {set_size})"
            )
        else:  # from 0, with chance's loss: a loss that stays at chance then looks flat
            ax.axhline(
                np.log(set_size), color="grey", linestyle="--",
                label=f"chance: ln {set_size} = {np.log(set_size):.2f}",
            )  # fmt: skip
            ax.set_ylim(bottom=0, top=max(ax.get_ylim()[1], 1.1 * np.log(set_size)))
        ax.set_xlabel("Epoch")
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


PREDICTION_FIGURES = ("anomaly_prediction.png", "anomaly_mistakes.png")
SET_FIGURES = ("anomaly_example_sets.png", *PREDICTION_FIGURES)


def skip(what, why, out_dir=None, stale=()):
    """Says why a picture is not drawn; removes the files stale in out_dir that an earlier run drew
    instead, which would pass for this one's."""
    gone = [name for name in stale if os.path.isfile(os.path.join(out_dir, name))]
    for name in gone:
        os.remove(os.path.join(out_dir, name))
    note = f" (an earlier {', '.join(gone)} removed)" if gone else ""
    print(f"skipped {what}: {why}{note}")
    return []


def unfinished(run_folder, task, command):
    """The train.py command that makes a run's missing model: with --resume where a training
    stopped before its model was saved (a plain run would refuse to start over it)."""
    return command("--resume") if os.path.isfile(last_checkpoint(run_folder, task)) else command()


def reverse_figure(checkpoint_dir, out_dir):
    """[path] of the reverse model's attention map, or [] with a note if there is no usable one."""
    ckpt = model_file(checkpoint_dir, "reverse")
    command = lambda *flags: train_command(*flags, task="reverse", checkpoint_dir=checkpoint_dir)
    stale = ["reverse_attention.png"]
    if not os.path.isfile(ckpt):
        why = f"no {ckpt} ({unfinished(checkpoint_dir, 'reverse', command)} makes it)"
        return skip("reverse attention map", why, out_dir, stale)
    try:
        model = load_model(ckpt, ReversePredictor, IO_DIMS["reverse"])[0]
    except ValueError as error:
        why = f"{error} ({command('--retrain')} makes a new one)"
        return skip("reverse attention map", why, out_dir, stale)
    torch.manual_seed(0)
    sequence = ReverseDataset(model.hparams.num_classes, SEQ_LEN, 1)[0][0]
    x = torch.nn.functional.one_hot(sequence, num_classes=model.hparams.num_classes).float()[None]
    maps = [m[0].numpy() for m in model.get_attention_maps(x)]
    return [plot_reverse_attention(os.path.join(out_dir, "reverse_attention.png"), sequence, maps)]


def open_test_images(data_dir, synthetic):
    """(images [N, 32, 32, 3] uint8, labels [N]) of the test split: the generated images of
    train.py --synthetic (made here, in a moment), or CIFAR-100's from data_dir; None if CIFAR-100
    is not there."""
    if synthetic:
        cfg = SYNTHETIC
        test = GeneratedImages(
            cfg["num_classes"], cfg["per_class"]["test"], None, cfg["seed"], "test"
        )
    else:
        try:
            test = CIFAR100(root=data_dir, train=False, download=False)
        except RuntimeError:  # torchvision's "Dataset not found or corrupted"
            return None
    return test.data, torch.tensor(test.targets)


def anomaly_figures(images, labels, checkpoint_dir, out_dir, synthetic=False, num_mistakes=5):
    """Paths of the set task's figures that the run in checkpoint_dir (with synthetic, that of
    --synthetic) allows: example test sets (the images alone), one set's prediction with every
    attention map and the worst-scored sets (also the run's model and test feature cache); what
    cannot be made is skipped with a note.

    images - [N, 32, 32, 3] uint8, the test split of CIFAR-100 or of the generated images
    labels - [N] their classes
    """
    run_folder = run_dir(checkpoint_dir, synthetic)
    command = lambda *flags: train_command(
        *flags, synthetic=synthetic, checkpoint_dir=checkpoint_dir
    )
    ckpt_path, model = model_file(run_folder), None
    set_size = TASK_DEFAULTS["anomaly"]["set_size"]
    if not os.path.isfile(ckpt_path):
        why = f"no {ckpt_path} ({unfinished(run_folder, 'anomaly', command)} makes it)"
    else:
        try:
            model, ckpt = load_model(ckpt_path, AnomalyPredictor, IO_DIMS["anomaly"])
            set_size = recorded_set_size(ckpt.get("train_settings"))
        except ValueError as error:
            why = f"{error} ({command('--retrain')} makes a new one)"
    # The sets depend on the labels only; the features are not needed to draw them.
    try:
        no_feats = torch.zeros(len(labels), 1)
        test_sets = SetAnomalyDataset(no_feats, labels, set_size=set_size, train=False).test_sets
    except ValueError as error:
        return skip("set-task figures", str(error), out_dir, SET_FIGURES)
    set_indices = torch.cat([test_sets, torch.arange(len(labels))[:, None]], dim=1)  # anomaly last
    title = "Example test sets: the last image is the anomaly"
    path = os.path.join(out_dir, "anomaly_example_sets.png")
    made = [plot_image_rows(path, images[set_indices[:4]] / 255, title)]

    if model is None:
        return made + skip("set-task prediction figures", why, out_dir, PREDICTION_FIGURES)
    meta = synthetic_meta("test") if synthetic else cifar100_meta("test")
    classes = SYNTHETIC["num_classes"] if synthetic else CIFAR100_CLASSES
    cache = cached_test_features(run_folder, meta, classes, f"`{command()}` rebuilds it")
    if cache is None:
        need = f"no usable test feature cache in {run_folder} ({command()} makes it)"
        return made + skip("set-task prediction figures", need, out_dir, PREDICTION_FIGURES)
    if not torch.equal(cache[1], labels):
        why = f"the labels of the test feature cache in {run_folder} are not those of the images"
        return made + skip("set-task prediction figures", why, out_dir, PREDICTION_FIGURES)
    feats = cache[0][set_indices]  # [Sets, SetSize, 512]
    return made + prediction_figures(model, images[set_indices], feats, out_dir, num_mistakes)


@torch.no_grad()
def prediction_figures(model, sets, feats, out_dir, num_mistakes):
    """Paths of the figures of model's predictions on the test sets: the first set with every
    attention map (the odd one framed only where clear, as predict.py decides), and the
    num_mistakes sets that gave their true anomaly, the last image, the lowest probability.

    sets - [Sets, SetSize, 32, 32, 3] uint8;  feats - [Sets, SetSize, 512] their features
    """
    probs = torch.cat([model.anomaly_logits(x).softmax(dim=-1) for x in feats.split(500)]).numpy()
    maps = model.get_attention_maps(feats[:1], add_positional_encoding=False)
    maps = [m[0].numpy() for m in maps]
    path = os.path.join(out_dir, "anomaly_prediction.png")
    first = plot_set_prediction(path, sets[0] / 255, probs[0], maps, clear=is_clear(probs[0]))
    worst = np.argsort(probs[:, -1])[:num_mistakes]
    title = "The model's worst test sets: probability of being the anomaly (true one last)"
    path = os.path.join(out_dir, "anomaly_mistakes.png")
    return [first, plot_image_rows(path, sets[worst] / 255, title, probs[worst], "Test set")]


def training_curves_figure(checkpoint_dir, out_dir, synthetic=False):
    """[path] of the set task's training curves from the newest TensorBoard logs of the run in
    checkpoint_dir (with synthetic, that of --synthetic), or [] with a note if there are none."""
    run_folder = run_dir(checkpoint_dir, synthetic)
    command = train_command(synthetic=synthetic, checkpoint_dir=checkpoint_dir)
    logs = os.path.join(task_dir(run_folder), "lightning_logs")
    try:
        found = newest_training_logs(logs)
    except Exception as error:  # a damaged or unreadable event file fails in many ways
        why = f"the TensorBoard logs in {logs} cannot be read ({type(error).__name__})"
        return skip("training curves", why, out_dir, ["training_curves.png"])
    if found is None:
        why = f"no TensorBoard logs of training in {logs} ({command} makes them)"
        return skip("training curves", why, out_dir, ["training_curves.png"])
    folder, scalars = found
    title = "Set task training curves" + (" (--synthetic)" if synthetic else "")
    path = os.path.join(out_dir, "training_curves.png")
    return [plot_training_curves(path, scalars, title, trained_set_size(run_folder))]


def trained_set_size(run_folder):
    """The set size the run trained with (its results.json), else the post's 10."""
    try:
        with open(os.path.join(task_dir(run_folder), "results.json")) as f:
            results = json.load(f)
    except (OSError, ValueError):  # missing, unreadable or not JSON
        results = None
    return recorded_set_size(results.get("settings") if isinstance(results, dict) else None)


def recorded_set_size(settings):
    """The set size in a run's saved settings (a checkpoint's train_settings, results.json's
    settings) if it is one train.py could have trained with, a whole number of 2 or more; the
    post's 10 for anything else, as for a run that saved none."""
    size = settings.get("set_size") if isinstance(settings, dict) else None
    usable = isinstance(size, int) and not isinstance(size, bool) and size >= 2
    return size if usable else TASK_DEFAULTS["anomaly"]["set_size"]


def main(argv=None):
    args = commands.visualize_parser(__doc__).parse_args(argv)
    args.checkpoint_dir = args.checkpoint_dir or CHECKPOINT_PATH  # train.py's folders
    args.data_dir = args.data_dir or DATASET_PATH
    run_folder = run_dir(args.checkpoint_dir, args.synthetic)
    out_dir = os.path.join(run_folder, "figures")
    if run_from_elsewhere(args.checkpoint_dir):  # a folder of its own here: say so, and the other
        where = os.path.abspath(out_dir)
        print(f"Figures go to {where} (--checkpoint-dir, relative to this folder).")
        beside = os.path.join(ROOT, args.checkpoint_dir)
        if os.path.isdir(beside):
            print(f"To draw the runs beside visualize.py instead, add --checkpoint-dir {beside}.")
    try:  # every figure goes here: find out first that it can
        make_and_check_folder(out_dir)
    except OSError as error:
        sys.exit(f"error: cannot write the figures to {out_dir} ({error}); see --checkpoint-dir.")
    lock_folder(out_dir)  # one visualize.py at a time writes these figures
    made = [
        *plot_positional_encoding(
            os.path.join(out_dir, "positional_encoding.png"),
            os.path.join(out_dir, "positional_encoding_dims.png"),
        ),
        plot_lr_schedule(os.path.join(out_dir, "lr_schedule.png")),
    ]
    if not args.synthetic:  # the reverse task has no synthetic run
        made += reverse_figure(args.checkpoint_dir, out_dir)
    test_images = open_test_images(args.data_dir, args.synthetic)
    if test_images is None:
        where = os.path.abspath(args.data_dir)
        why = f"no CIFAR-100 in {where} ({train_command()} downloads it)"
        skip("set-task figures", why, out_dir, SET_FIGURES)
    else:
        made += anomaly_figures(*test_images, args.checkpoint_dir, out_dir, args.synthetic)
    made += training_curves_figure(args.checkpoint_dir, out_dir, args.synthetic)
    for path in made:
        print(f"wrote {path}")
    return made


if __name__ == "__main__":
    stops.run_main(main, "the figures written so far are whole.")
