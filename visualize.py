"""Pictures of the post's ideas and of the trained models: PNG files in <checkpoint-dir>/figures/.

    python visualize.py [--checkpoint-dir saved_models] [--data-dir datasets]

Always made: the positional-encoding table (嵌入表示层) and the warm-up + cosine learning-rate
factor. Made when their inputs are on disk, otherwise skipped with a one-line note: the reverse
model's attention (python train.py --task reverse), and, for the set task (python train.py, plus
CIFAR-100 in --data-dir), example sets, one set's prediction with every attention map, and the
model's worst mistakes.
"""

import argparse
import os

import matplotlib

matplotlib.use("Agg")  # files only, no screen needed
import matplotlib.pyplot as plt
import numpy as np
import torch
from torchvision.datasets import CIFAR100

from data import ReverseDataset, SetAnomalyDataset
from features import (
    DATA_MEANS,
    DATA_STD,
    cached_test_features,
    cifar100_meta,
    image_transform,
    save_atomically,
)
from model import AnomalyPredictor, CosineWarmupScheduler, PositionalEncoding, ReversePredictor
from train import model_file, read_checkpoint

DPI = 100  # a figure of w×h inches is a PNG of (100·w)×(100·h) pixels


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
        pe.T, cmap="RdGy", aspect="auto", extent=(0.5, max_len + 0.5, d_model + 0.5, 0.5)
    )
    fig.colorbar(image, ax=ax)
    ax.set_title("Positional encoding over positions and hidden dimensions")
    ax.set_xlabel("Position in sequence")
    ax.set_ylabel("Hidden dimension")
    fig.tight_layout()
    save_figure(fig, path_table)

    fig, axes = plt.subplots(2, 2, figsize=(8, 6))
    for dim, ax in enumerate(axes.flat):
        ax.plot(np.arange(1, 17), pe[:16, dim], color=f"C{dim}", marker="o", markersize=5)
        ax.set_title(f"Encoding in hidden dimension {dim + 1}")
        ax.set_xlabel("Position in sequence")
        ax.set_ylabel("Positional encoding")
        ax.set_ylim(-1.1, 1.1)
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


def plot_image_rows(path, images, title, probs=None, row_label="Set"):
    """Rows of images, one row per set (anomaly last), each image's probability under it if given.

    images - [Sets, SetSize, H, W, 3] floats in [0, 1];  probs - [Sets, SetSize] or None
    """
    num_rows, num_cols = images.shape[:2]
    fig, axes = plt.subplots(
        num_rows, num_cols, figsize=(1.2 * num_cols, 1.3 * num_rows + 0.6), squeeze=False
    )
    for r in range(num_rows):
        for c in range(num_cols):
            ax = axes[r, c]
            ax.imshow(images[r, c])
            ax.set_xticks([])
            ax.set_yticks([])
            label = (
                f"p={probs[r, c]:.2f}"
                if probs is not None
                else ("anomaly" if c == num_cols - 1 else f"image {c + 1}")
            )
            ax.set_xlabel(label, fontsize=8)
        axes[r, 0].set_ylabel(f"{row_label} {r + 1}", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_attention_grid(fig, attention_maps, tick_labels, axis_name):
    """Draws every layer's and head's attention into fig: a list (layers) of [Head, Query, Key]."""
    num_layers, num_heads = len(attention_maps), attention_maps[0].shape[0]
    axes = fig.subplots(num_layers, num_heads, squeeze=False)
    for layer, maps in enumerate(attention_maps):
        for head in range(num_heads):
            ax = axes[layer, head]
            ax.imshow(maps[head], origin="lower", vmin=0, vmax=1, cmap="viridis")
            ax.set_xticks(range(len(tick_labels)))
            ax.set_xticklabels(tick_labels, fontsize=7)
            ax.set_yticks(range(len(tick_labels)))
            ax.set_yticklabels(tick_labels, fontsize=7)
            ax.set_xlabel(f"attended {axis_name} (key)", fontsize=8)
            ax.set_ylabel(f"{axis_name} (query)", fontsize=8)
            ax.set_title(f"Layer {layer + 1}, head {head + 1}", fontsize=9)


def plot_set_prediction(path, images, probs, attention_maps, title=None, names=None):
    """One set: its images with the predicted probability of each being the anomaly, and the
    attention maps of every layer and head.

    images         - [SetSize, H, W, 3] in [0, 1]
    probs          - [SetSize]
    attention_maps - layers × [Head, SetSize, SetSize]
    title          - defaults to the prediction against the true anomaly, the last image
    names          - labels under the images
    """
    set_size, num_layers, num_heads = len(images), len(attention_maps), attention_maps[0].shape[0]
    fig = plt.figure(
        figsize=(max(1.2 * set_size, 2.6 * num_heads), 2.0 + 2.6 * num_layers), layout="constrained"
    )
    top, bottom = fig.subfigures(2, 1, height_ratios=[2.0, 2.6 * num_layers])
    axes = top.subplots(1, set_size, squeeze=False)[0]
    for i, ax in enumerate(axes):
        ax.imshow(images[i])
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(f"{names[i] if names else i + 1}: p={probs[i]:.2f}", fontsize=8)
    axes[0].set_ylabel("image", fontsize=8)
    predicted = int(np.argmax(probs)) + 1
    top.suptitle(
        title or f"Predicted anomaly: image {predicted} (the true one is image {set_size})"
    )
    plot_attention_grid(bottom, attention_maps, [str(i + 1) for i in range(set_size)], "image")
    return save_figure(fig, path)


def plot_reverse_attention(path, sequence, attention_maps):
    """The reverse model's attention for one input sequence: layers × heads maps over positions."""
    num_layers, num_heads = len(attention_maps), attention_maps[0].shape[0]
    fig = plt.figure(figsize=(5 * num_heads, 5 * num_layers + 0.6), layout="constrained")
    fig.suptitle(
        f"Reverse task attention for input {' '.join(str(int(t)) for t in sequence)}", fontsize=10
    )
    plot_attention_grid(fig, attention_maps, [str(int(t)) for t in sequence], "input digit")
    return save_figure(fig, path)


def denormalise(images):
    """[N, 3, H, W] ImageNet-normalised images -> [N, H, W, 3] in [0, 1], as before normalising."""
    mean, std = torch.tensor(DATA_MEANS).view(1, 3, 1, 1), torch.tensor(DATA_STD).view(1, 3, 1, 1)
    return (images * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def skip(what, why):
    print(f"skipped {what}: {why}")
    return []


def reverse_figure(checkpoint_dir, out_dir):
    """[path] of the reverse model's attention map, or [] with a note if there is no model."""
    ckpt = model_file(checkpoint_dir, "reverse")
    if not os.path.isfile(ckpt):
        return skip("reverse attention map", f"no {ckpt} (python train.py --task reverse makes it)")
    model = ReversePredictor.load_from_checkpoint(ckpt, map_location="cpu").eval()
    torch.manual_seed(0)
    sequence = ReverseDataset(model.hparams.num_classes, 16, 1)[0][0]
    x = torch.nn.functional.one_hot(sequence, num_classes=model.hparams.num_classes).float()[None]
    maps = [m[0].numpy() for m in model.get_attention_maps(x)]
    return [plot_reverse_attention(os.path.join(out_dir, "reverse_attention.png"), sequence, maps)]


def anomaly_figures(checkpoint_dir, data_dir, out_dir, num_mistakes=5):
    """Paths of the set task's figures that its inputs allow: example sets (CIFAR-100), one set's
    prediction and attention and the worst mistakes (also the trained model and test features)."""
    try:
        cifar = CIFAR100(root=data_dir, train=False, download=False, transform=image_transform(32))
    except RuntimeError:
        where = os.path.abspath(data_dir)
        return skip("set-task figures", f"no CIFAR-100 in {where} (python train.py downloads it)")
    labels = torch.tensor(cifar.targets)
    images = denormalise(torch.stack([cifar[i][0] for i in range(len(cifar))]))
    ckpt_path = model_file(checkpoint_dir)
    set_size = 10
    if os.path.isfile(ckpt_path):
        set_size = read_checkpoint(ckpt_path).get("train_settings", {}).get("set_size", set_size)
    # The sets depend on the labels only; the features are not needed to draw them.
    no_feats = torch.zeros(len(labels), 1)
    test_sets = SetAnomalyDataset(no_feats, labels, set_size=set_size, train=False).test_sets
    set_indices = torch.cat([test_sets, torch.arange(len(labels))[:, None]], dim=1)  # anomaly last
    title = "Example test sets: the last image is the anomaly"
    path = os.path.join(out_dir, "anomaly_example_sets.png")
    made = [plot_image_rows(path, images[set_indices[:4]], title)]

    then = "`python train.py` rebuilds it"
    cache = cached_test_features(checkpoint_dir, cifar100_meta("test"), then)
    if not os.path.isfile(ckpt_path) or cache is None:
        need = f"need {ckpt_path} and the test feature cache (python train.py makes both)"
        return made + skip("set-task prediction figures", need)
    model = AnomalyPredictor.load_from_checkpoint(ckpt_path, map_location="cpu").eval()
    feats = cache[0][set_indices]  # [Sets, SetSize, 512]
    with torch.no_grad():
        probs = torch.cat([model.anomaly_logits(x).softmax(dim=-1) for x in feats.split(500)])
        probs = probs.numpy()
        maps = model.get_attention_maps(feats[:1], add_positional_encoding=False)
    path = os.path.join(out_dir, "anomaly_prediction.png")
    made.append(
        plot_set_prediction(path, images[set_indices[0]], probs[0], [m[0].numpy() for m in maps])
    )
    # The sets that gave the true anomaly (last) the lowest probability.
    worst = np.argsort(probs[:, -1])[:num_mistakes]
    title = "The model's worst test sets: probability of being the anomaly (true one last)"
    path = os.path.join(out_dir, "anomaly_mistakes.png")
    made.append(plot_image_rows(path, images[set_indices[worst]], title, probs[worst], "Test set"))
    return made


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--checkpoint-dir",
        default="saved_models",
        help="where train.py saved its models (default: saved_models)",
    )
    p.add_argument("--data-dir", default="datasets", help="where CIFAR-100 is (default: datasets)")
    args = p.parse_args(argv)
    out_dir = os.path.join(args.checkpoint_dir, "figures")
    made = [
        *plot_positional_encoding(
            os.path.join(out_dir, "positional_encoding.png"),
            os.path.join(out_dir, "positional_encoding_dims.png"),
        ),
        plot_lr_schedule(os.path.join(out_dir, "lr_schedule.png")),
        *reverse_figure(args.checkpoint_dir, out_dir),
        *anomaly_figures(args.checkpoint_dir, args.data_dir, out_dir),
    ]
    for path in made:
        print(f"wrote {path}")
    return made


if __name__ == "__main__":
    main()
