"""visualize.py: every figure made from generated data, with its expected pixel size and what it
shows (the data it draws, checked against formulas and inputs written out here, or its pixels); the
training curves read back from TensorBoard logs; the skip notes."""

import glob
import itertools
import json
import os
import re
import shutil
import warnings

import numpy as np
import pytest
import torch
from matplotlib.axes import Axes
from matplotlib.text import Text
from PIL import Image
from torch.utils.tensorboard import SummaryWriter

import features
import visualize
from harness import caches, folders, verdict
from harness.synthetic import SYNTHETIC, GeneratedImages, synthetic_meta
from helpers import drawn, red_and_grey, red_frames, spoil_truncate, true_runs
from model import AnomalyPredictor, ReversePredictor


def png_size(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def names(paths):
    return sorted(os.path.basename(str(p)) for p in paths)


def save_checkpoint(path, model_class, hparams, **extra):
    """A Lightning checkpoint of a randomly initialised model, as train.py saves its best one."""
    checkpoint = {
        "state_dict": model_class(**hparams).state_dict(),
        "hyper_parameters": hparams,
        "pytorch-lightning_version": "2.0.0",
        **extra,
    }
    torch.save(checkpoint, path)


REVERSE_HPARAMS = dict(
    input_dim=10, model_dim=16, num_classes=10, num_heads=2, num_layers=2, lr=5e-4, warmup=5,
    max_iters=10,
)  # fmt: skip
SET_HPARAMS = dict(
    input_dim=512, model_dim=16, num_classes=1, num_heads=2, num_layers=2, lr=5e-4, warmup=5,
    max_iters=10,
)  # fmt: skip


def write_events(folder, events, first_wall_time=0.0):
    """One new TensorBoard event file in folder holding events [(tag, step, value)], in that order,
    a second apart."""
    with SummaryWriter(str(folder)) as writer:
        for i, (tag, step, value) in enumerate(events):
            writer.add_scalar(tag, value, step, walltime=first_wall_time + i)


@pytest.fixture(scope="module")
def made_up_run(tmp_path_factory):
    """A checkpoint folder as `train.py --synthetic` leaves it, made in-process in a moment: a set
    model trained with sets of 5 (random weights), random test features of the generated test
    images, and two epochs of TensorBoard logs."""
    checkpoint_dir = tmp_path_factory.mktemp("models")
    run_folder = checkpoint_dir / "synthetic"
    run_folder.mkdir()
    save_checkpoint(
        run_folder / "SetAnomalyDetect.ckpt",
        AnomalyPredictor,
        SET_HPARAMS,
        train_settings=dict(set_size=5),
    )
    cfg = SYNTHETIC
    test = GeneratedImages(cfg["num_classes"], cfg["per_class"]["test"], None, cfg["seed"], "test")
    torch.manual_seed(0)
    caches.save_cache(
        str(run_folder / "test_set_features.tar"),
        torch.randn(len(test), 512),
        torch.tensor(test.targets),
        synthetic_meta("test"),
    )
    events = []
    for step in range(6):  # 2 epochs of 3 steps
        events += [("train_loss", step, 2.3 - 0.1 * step), ("epoch", step, step // 3)]
        if step % 3 == 2:
            events += [("val_acc", step, 0.1 * step), ("train_acc", step, 0.05 * step)]
    write_events(run_folder / "SetAnomalyDetect" / "lightning_logs" / "version_0", events)
    return checkpoint_dir


@pytest.fixture
def figures(monkeypatch, tmp_path):
    """The figures the plot functions make, written as PNGs as they write them but kept open for
    their contents; one named by file name alone is written in tmp_path."""
    made, save, close = [], visualize.save_figure, visualize.plt.close
    monkeypatch.setattr(visualize.plt, "close", lambda fig=None: None)  # kept open, as drawn
    monkeypatch.setattr(
        visualize, "save_figure", lambda fig, path: made.append(fig) or save(fig, path)
    )
    monkeypatch.chdir(tmp_path)
    yield made
    close("all")


def panel_titles(num_layers, num_heads):
    """The attention maps' titles, layer by layer and head by head."""
    layers, heads = range(1, num_layers + 1), range(1, num_heads + 1)
    return [f"Layer {layer}, head {head}" for layer in layers for head in heads]


def has_its_bar_beside(ax):
    """Whether the colour bar of ax's image stands just right of ax, level with its middle."""
    panel, bar = ax.get_position(), ax.get_images()[0].colorbar.ax.get_position()
    level = bar.y0 < (panel.y0 + panel.y1) / 2 < bar.y1
    return 0 <= bar.x0 - panel.x1 < panel.width / 2 and level


def sin_cos_table(d_model, max_len):
    """PE[pos, 2i] = sin(pos / 10000^(2i/d)) and PE[pos, 2i+1] = cos(pos / 10000^(2i/d))."""
    table = np.zeros((max_len, d_model))
    for pos in range(max_len):
        for i in range(d_model // 2):
            angle = pos / 10000 ** (2 * i / d_model)
            table[pos, 2 * i], table[pos, 2 * i + 1] = np.sin(angle), np.cos(angle)
    return table


def test_the_positional_encoding_heat_map_is_the_sin_cos_table(tmp_path, figures):
    table, curves = visualize.plot_positional_encoding(tmp_path / "pe.png", tmp_path / "pe.2.png")
    assert png_size(table) == (800, 400) and png_size(curves) == (800, 600)
    heat_map = figures[0].axes[0].get_images()[0]
    # Dimensions down, positions across; dimension 1 at the top, position 1 at the left.
    np.testing.assert_allclose(heat_map.get_array(), sin_cos_table(48, 96).T, atol=1e-4)
    assert heat_map.get_extent() == [0.5, 96.5, 48.5, 0.5]


def test_the_positional_encoding_curves_are_the_first_four_dimensions(figures):
    visualize.plot_positional_encoding("pe.png", "pe_dims.png")
    table = sin_cos_table(48, 96)
    axes = figures[1].axes
    titles = [f"Encoding in hidden dimension {d}" for d in range(1, 5)]
    assert [ax.get_title() for ax in axes] == titles
    for dim, ax in enumerate(axes):
        (line,) = ax.lines
        assert line.get_xdata().tolist() == list(range(1, 17))  # positions 1 to 16
        np.testing.assert_allclose(line.get_ydata(), table[:16, dim], atol=1e-5)


def test_the_lr_schedule_is_linear_warm_up_then_half_a_cosine(tmp_path, figures):
    assert png_size(visualize.plot_lr_schedule(tmp_path / "lr.png")) == (600, 400)
    (line,) = figures[0].axes[0].lines
    t = np.arange(2000)  # warmup=100, max_iters=2000
    factor = 0.5 * (1 + np.cos(np.pi * t / 2000)) * np.where(t <= 100, t / 100, 1)
    assert line.get_xdata().tolist() == t.tolist()
    np.testing.assert_allclose(line.get_ydata(), factor, atol=1e-12)
    assert line.get_ydata()[0] == 0 and np.argmax(line.get_ydata()) == 100


def printed_probability(label):
    """The probability in an image's label, "...p=25.00%\n...": as a number, 0.25."""
    percent = label.split("p=")[1].split("\n")[0]
    assert percent.endswith("%")
    return float(percent[:-1]) / 100


@pytest.mark.parametrize("with_probs", [False, True])
def test_image_rows_show_each_set_in_order_with_its_probabilities(tmp_path, figures, with_probs):
    rng = np.random.default_rng(0)
    images = rng.random((4, 10, 32, 32, 3))
    probs = rng.dirichlet(np.ones(10), size=4) if with_probs else None
    path = visualize.plot_image_rows(tmp_path / "rows.png", images, "sets", probs=probs)
    assert png_size(path) == (1200, 580)  # 1.2 in per image, 1.3 in per row + 0.6 in for the title
    axes = np.reshape(figures[0].axes, (4, 10))
    for r, c in np.ndindex(4, 10):
        assert np.array_equal(axes[r, c].get_images()[0].get_array(), images[r, c])
    assert [row[0].get_ylabel() for row in axes] == ["Set 1", "Set 2", "Set 3", "Set 4"]
    labels = [[ax.get_xlabel() for ax in row] for row in axes]
    if with_probs:  # at least 2 decimals: within 0.005
        np.testing.assert_allclose(np.vectorize(printed_probability)(labels), probs, atol=0.005)
    else:
        assert labels == [[f"image {c}" for c in range(1, 10)] + ["anomaly"]] * 4


def coloured_pixels(path):
    """How many pixels of a PNG are neither white, black nor grey: what is drawn besides the text
    and the axes."""
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return int((np.ptp(pixels, axis=-1) > 30).sum())


@pytest.mark.parametrize("predicted", [0, 3])
def test_the_predicted_image_is_framed_in_red(tmp_path, predicted):
    # Grey images on white: the only red is the mark, around the predicted image and no other.
    probs = np.full((1, 5), 0.1)
    probs[0, predicted] = 0.6
    images = np.full((1, 5, 8, 8, 3), 0.5)
    red, grey = red_and_grey(visualize.plot_image_rows(tmp_path / "p.png", images, "", probs))
    image_columns = true_runs(grey.sum(axis=0) > 20)  # text antialiasing greys a few pixels at most
    assert len(image_columns) == 5
    red_x = np.nonzero(red)[1]
    framed = [i for i, (a, b) in enumerate(image_columns) if red_x.min() < a and b < red_x.max()]
    assert framed == [predicted]
    red, _ = red_and_grey(visualize.plot_image_rows(tmp_path / "plain.png", images, ""))
    assert not red.any()


def test_probabilities_print_with_enough_digits_to_rank_them():
    assert verdict.probability_texts([0.5, 0.25, 0.25]) == ["0.50", "0.25", "0.25"]
    assert verdict.probability_texts([0.1234, 0.1237, 0.7529]) == ["0.123", "0.124", "0.753"]
    assert verdict.probability_texts(np.array([0.10046, 0.10012, 0.79942], dtype=np.float32)) == [
        "0.1005",
        "0.1001",
        "0.7994",
    ]
    # Closer than 6 decimals tell apart: 6 decimals, no more.
    third = 1 / 3
    assert verdict.probability_texts([third, third + 1e-9, third - 2e-9]) == ["0.333333"] * 3


def test_set_prediction_shows_the_images_and_their_probabilities(tmp_path, figures):
    rng = np.random.default_rng(0)
    images, probs = rng.random((10, 32, 32, 3)), rng.dirichlet(np.ones(10))
    maps = [rng.dirichlet(np.ones(10), size=(1, 10)) for _ in range(2)]  # 2 layers of 1 head
    path = visualize.plot_set_prediction(tmp_path / "set.png", images, probs, maps)
    assert png_size(path) == (1200, 720)  # 10 images wide; 2 in for them + 2.6 in per layer
    shown = drawn(figures[0], 3)
    assert len(shown) == 10
    assert all(np.array_equal(array, images[i]) for i, array in enumerate(shown.values()))
    labels = [ax.get_xlabel() for ax in shown]
    assert [label.split(":")[0] for label in labels] == [str(i) for i in range(1, 11)]
    np.testing.assert_allclose([printed_probability(label) for label in labels], probs, atol=0.005)
    assert [i for i, label in enumerate(labels) if "predicted" in label] == [np.argmax(probs)]


def test_long_captions_fit_the_figure_without_running_into_each_other(figures):
    # Nine pictures with long file names, as predict.py --figure draws them.
    names = [f"flower_from_the_garden_{i}.jpg" for i in range(1, 10)]
    probs = np.random.default_rng(0).dirichlet(np.ones(9))
    maps = [np.full((1, 9, 9), 1 / 9)]
    visualize.plot_set_prediction("set.png", np.zeros((9, 8, 8, 3)), probs, maps, names=names)
    fig = figures[0]
    fig.canvas.draw()
    captions = [ax.xaxis.label for ax in drawn(fig, 3)]
    boxes = [caption.get_window_extent(fig.canvas.get_renderer()) for caption in captions]
    page = fig.bbox
    assert all(page.x0 <= b.x0 and b.x1 <= page.x1 and page.y0 <= b.y0 for b in boxes)
    assert not any(a.overlaps(b) for a, b in itertools.combinations(boxes, 2))
    # Wrapped, each caption still holds the whole name and the probability.
    for name, caption, p in zip(names, captions, probs, strict=True):
        assert caption.get_text().replace("\n", "").startswith(name + ":")
        assert printed_probability(caption.get_text()) == pytest.approx(p, abs=0.00005)


def test_the_figures_give_probabilities_in_percent(figures):
    probs = np.array([0.1234, 0.1237, 0.7529])
    visualize.plot_set_prediction("s.png", np.zeros((3, 8, 8, 3)), probs, [np.full((1, 3, 3), 0.3)])
    visualize.plot_image_rows("rows.png", np.zeros((1, 3, 8, 8, 3)), "rows", probs[None])
    for fig in figures:
        captions = [ax.get_xlabel() for ax in drawn(fig, 3)]
        shown = [re.search(r"p=(\S+)", caption).group(1) for caption in captions]
        assert shown == ["12.34%", "12.37%", "75.29%"]  # the decimals that tell them apart


def test_set_prediction_shows_every_layer_and_head_with_a_colour_bar_each(figures, tmp_path):
    rng = np.random.default_rng(1)
    maps = [rng.dirichlet(np.ones(5), size=(2, 5)) for _ in range(3)]  # 3 layers of 2 heads
    visualize.plot_set_prediction(tmp_path / "s.png", np.zeros((5, 8, 8, 3)), np.full(5, 0.2), maps)
    panels = drawn(figures[0], 2)
    assert [ax.get_title() for ax in panels] == panel_titles(3, 2)
    expected = [maps[layer][head] for layer in range(3) for head in range(2)]
    assert all(map(np.array_equal, panels.values(), expected)) and len(panels) == 6
    assert len(colour_bars(figures[0])) == 6 and all(map(has_its_bar_beside, panels))


def test_the_set_prediction_frames_the_most_probable_image_in_red(tmp_path):
    probs = np.array([0.1, 0.6, 0.1, 0.1, 0.1])  # neither the first nor the true anomaly, the last
    maps = [np.full((1, 5, 5), 0.2)]  # one layer, one head
    images = np.full((5, 8, 8, 3), 0.5)  # grey: the only red is the mark
    red, grey = red_and_grey(visualize.plot_set_prediction(tmp_path / "s.png", images, probs, maps))
    image_columns = true_runs(grey.sum(axis=0) > 20)
    assert len(image_columns) == 5
    red_x = np.nonzero(red)[1]
    framed = [i for i, (a, b) in enumerate(image_columns) if red_x.min() < a and b < red_x.max()]
    assert framed == [1]


def test_reverse_attention_shows_every_map_over_the_positions(tmp_path, figures):
    rng = np.random.default_rng(0)
    sequence = rng.integers(0, 10, 16)
    maps = [rng.dirichlet(np.ones(16), size=(2, 16)) for _ in range(2)]  # 2 layers of 2 heads
    path = visualize.plot_reverse_attention(tmp_path / "rev.png", sequence, maps)
    assert png_size(path) == (1000, 920)  # 5 in per head, 4.4 in per layer + 0.4 in for the title
    fig = figures[0]
    assert fig.get_suptitle().endswith(" ".join(str(t) for t in sequence))
    panels = drawn(fig, 2)
    assert [ax.get_title() for ax in panels] == panel_titles(2, 2)
    expected = [maps[layer][head] for layer in range(2) for head in range(2)]
    assert all(map(np.array_equal, panels.values(), expected)) and len(panels) == 4
    positions = [str(i) for i in range(1, 17)]
    for ax in panels:
        assert ax.get_xlabel() == "input position (key)"
        assert ax.get_ylabel() == "output position (query)"
        assert [t.get_text() for t in ax.get_xticklabels()] == positions
        assert [t.get_text() for t in ax.get_yticklabels()] == positions


def test_reverse_attention_reads_as_a_matrix_with_position_1_at_the_top(tmp_path, figures):
    reversal = np.eye(16)[::-1][None]  # output position i attends to input position 17 - i
    visualize.plot_reverse_attention("rev.png", np.arange(16) % 10, [reversal])
    fig = figures[0]
    fig.savefig(tmp_path / "rev.png", dpi=visualize.DPI)
    (ax,) = drawn(fig, 2)
    assert ax.get_xlabel() == "input position (key)"
    assert ax.get_ylabel() == "output position (query)"
    assert ax.get_ylim() == (15.5, -0.5)  # row 1 (position 1) at the top, 16 at the bottom
    assert ax.get_xlim() == (-0.5, 15.5)
    # In the PNG, the bright (viridis' yellow) cells run from the top right to the bottom left.
    pixels = np.asarray(Image.open(tmp_path / "rev.png").convert("RGB")).astype(int)
    height, width = pixels.shape[:2]
    box = ax.get_position()
    panel = pixels[
        round((1 - box.y1) * height) : round((1 - box.y0) * height),
        round(box.x0 * width) : round(box.x1 * width),
    ]
    rows, columns = np.nonzero((panel[..., 0] > 200) & (panel[..., 1] > 200) & (panel[..., 2] < 80))
    assert len(rows) > 16 * 100 and np.corrcoef(rows, columns)[0, 1] < -0.99
    top_row = columns[rows == rows.min()]  # the top cell: in the last column of 16
    assert top_row.min() > panel.shape[1] * 0.9
    # The title sits just above the panel's, not an inch above it.
    renderer = fig.canvas.get_renderer()
    (title,) = fig.findobj(lambda a: isinstance(a, Text) and a.get_text() == fig.get_suptitle())
    gap = title.get_window_extent(renderer).y0 - ax.title.get_window_extent(renderer).y1
    assert 0 < gap < 0.3 * visualize.DPI  # 0.6 in and more before


def test_training_curves_are_read_back_as_logged(tmp_path):
    logs = tmp_path / "SetAnomalyDetect" / "lightning_logs"
    write_events(logs / "version_0", [("train_loss", 0, 9.0), ("epoch", 0, 0)])  # an older run
    # The newest training run, 2 steps an epoch: stopped in its second epoch after step 2, then
    # resumed from the end of the first, into the same folder: step 2 again, then step 3.
    first = [("train_loss", 0, 2.5), ("epoch", 0, 0), ("train_loss", 1, 2.25), ("epoch", 1, 0)]
    first += [("val_acc", 1, 0.5), ("train_acc", 1, 0.25), ("epoch", 1, 0)]
    first += [("train_loss", 2, 2.0), ("epoch", 2, 1)]
    resumed = [("train_loss", 2, 1.75), ("epoch", 2, 1), ("train_loss", 3, 1.5), ("epoch", 3, 1)]
    resumed += [("val_acc", 3, 0.75), ("train_acc", 3, 0.5), ("epoch", 3, 1)]
    write_events(logs / "version_1", first, first_wall_time=100)
    write_events(logs / "version_1", resumed, first_wall_time=200)
    write_events(logs / "version_2", [("test_acc", 0, 0.5), ("epoch", 0, 0)])  # evaluation only

    folder, scalars = visualize.newest_training_logs(str(logs))
    assert folder == str(logs / "version_1")
    assert scalars == {
        "train_loss": {0: 2.5, 1: 2.25, 2: 1.75, 3: 1.5},
        "epoch": {0: 0.0, 1: 0.0, 2: 1.0, 3: 1.0},
        "val_acc": {1: 0.5, 3: 0.75},
        "train_acc": {1: 0.25, 3: 0.5},
    }
    epochs, loss = visualize.per_epoch(scalars, "train_loss")
    assert epochs.tolist() == [1, 2] and loss.tolist() == [(2.5 + 2.25) / 2, (1.75 + 1.5) / 2]
    epochs, acc = visualize.per_epoch(scalars, "val_acc")
    assert epochs.tolist() == [1, 2] and acc.tolist() == [0.5, 0.75]

    made = visualize.training_curves_figure(str(tmp_path), str(tmp_path / "figures"))
    assert names(made) == ["training_curves.png"] and png_size(made[0]) == (1000, 400)


@pytest.mark.parametrize(
    "spoil, note",
    [
        ("garbage", "no TensorBoard logs of training in"),
        ("folder", "cannot be read (IsADirectoryError)"),
    ],
)
def test_unreadable_logs_are_skipped_with_a_note(tmp_path, capsys, spoil, note):
    folder = tmp_path / "SetAnomalyDetect" / "lightning_logs" / "version_0"
    folder.mkdir(parents=True)
    if spoil == "garbage":
        (folder / "events.out.tfevents.1.host").write_bytes(b"not an event file" * 10)
    else:
        (folder / "events.out.tfevents.1.host").mkdir()
    assert visualize.training_curves_figure(str(tmp_path), str(tmp_path / "figures")) == []
    out = capsys.readouterr().out
    assert out.startswith("skipped training curves: ") and note in out and out.count("\n") == 1


def test_main_makes_what_it_can_and_says_what_it_skips(tmp_path, capsys):
    checkpoint_dir = tmp_path / "models"
    checkpoint_dir.mkdir()
    save_checkpoint(checkpoint_dir / "ReverseTask.ckpt", ReversePredictor, REVERSE_HPARAMS)
    made = visualize.main(
        ["--checkpoint-dir", str(checkpoint_dir), "--data-dir", str(tmp_path / "no_data")]
    )
    assert names(made) == [
        "lr_schedule.png",
        "positional_encoding.png",
        "positional_encoding_dims.png",
        "reverse_attention.png",
    ]
    # 2 heads, 2 layers.
    assert png_size(checkpoint_dir / "figures" / "reverse_attention.png") == (1000, 920)
    out = capsys.readouterr().out
    assert "skipped set-task figures: no CIFAR-100" in out
    assert "skipped training curves: no TensorBoard logs" in out


def test_set_task_figures_from_generated_cifar(tmp_path, monkeypatch, capsys):
    # CIFAR-100 replaced by 100 generated images in 10 classes, with a feature cache and a model to
    # match.
    monkeypatch.setattr(
        visualize,
        "CIFAR100",
        lambda root, train, download: GeneratedImages(10, 10, None, seed=0, split="test"),
    )
    monkeypatch.setitem(features.CIFAR100_SIZES, "test", 100)
    monkeypatch.setattr(visualize, "CIFAR100_CLASSES", 10)
    images, labels = visualize.open_test_images(str(tmp_path / "data"), synthetic=False)
    assert images.shape == (100, 32, 32, 3) and images.dtype == np.uint8
    caches.save_cache(
        str(tmp_path / "test_set_features.tar"),
        torch.randn(100, 512),
        labels,
        caches.cifar100_meta("test"),
    )
    save_checkpoint(
        tmp_path / "SetAnomalyDetect.ckpt", AnomalyPredictor, dict(SET_HPARAMS, num_layers=3)
    )
    made = visualize.anomaly_figures(
        images, labels, str(tmp_path), str(tmp_path / "figures"), num_mistakes=3
    )
    sizes = {os.path.basename(str(p)): png_size(p) for p in made}
    assert sizes == {
        "anomaly_example_sets.png": (1200, 580),  # 4 sets of 10
        "anomaly_prediction.png": (1200, 980),  # 10 images over 3 layers
        "anomaly_mistakes.png": (1200, 450),  # 3 sets of 10
    }
    assert all(coloured_pixels(p) > 1000 for p in made)
    # Each of the 3 worst sets: a frame each; the example sets, no prediction; the one predicted
    # set, by a random model, no clear odd one out: no frame (as predict.py draws it).
    assert [red_frames(p) for p in made] == [0, 0, 3]
    assert "skipped" not in capsys.readouterr().out


def test_the_example_sets_are_of_one_class_with_the_anomaly_last(tmp_path, figures):
    test = GeneratedImages(10, 10, None, seed=0, split="test")  # 10 classes of 10 images
    # No model in tmp_path: the example sets alone are drawn, 4 sets of 10.
    visualize.anomaly_figures(test.data, torch.tensor(test.targets), str(tmp_path), str(tmp_path))
    index = {image.tobytes(): i for i, image in enumerate(test.data)}
    shown = [np.rint(np.asarray(a) * 255).astype(np.uint8) for a in drawn(figures[0], 3).values()]
    sets = np.reshape([index[image.tobytes()] for image in shown], (4, 10))
    assert all(len(set(row)) == 10 for row in sets)  # 10 different images in each set
    classes = np.array(test.targets)[sets]
    assert (classes[:, :9] == classes[:, :1]).all() and (classes[:, 9] != classes[:, 0]).all()


def test_synthetic_mode_makes_every_kind_of_figure(made_up_run, capsys):
    made = visualize.main(["--synthetic", "--checkpoint-dir", str(made_up_run)])
    assert all(os.path.dirname(str(p)) == str(made_up_run / "synthetic" / "figures") for p in made)
    sizes = {os.path.basename(str(p)): png_size(p) for p in made}
    # The sets have the checkpoint's size, 5: 1.2 in per image; the model has 2 layers of 2 heads.
    assert sizes == {
        "positional_encoding.png": (800, 400),
        "positional_encoding_dims.png": (800, 600),
        "lr_schedule.png": (600, 400),
        "anomaly_example_sets.png": (600, 580),  # 4 sets
        "anomaly_prediction.png": (600, 720),  # 2 in for the images + 2.6 in per layer
        "anomaly_mistakes.png": (600, 710),  # 5 sets
        "training_curves.png": (1000, 400),
    }
    assert all(coloured_pixels(p) > 1000 for p in made)  # each draws something besides its text
    frames = {os.path.basename(str(p)): red_frames(p) for p in made if "anomaly" in str(p)}
    assert frames == {  # a frame for each worst set; the random model's prediction is not clear
        "anomaly_example_sets.png": 0,
        "anomaly_prediction.png": 0,
        "anomaly_mistakes.png": 5,
    }
    assert "skipped" not in capsys.readouterr().out


def test_synthetic_mode_without_a_run_names_the_synthetic_command(tmp_path, capsys):
    made = visualize.main(["--synthetic", "--checkpoint-dir", str(tmp_path)])
    # The generated images need no run: the example sets are drawn all the same.
    assert names(made) == [
        "anomaly_example_sets.png",
        "lr_schedule.png",
        "positional_encoding.png",
        "positional_encoding_dims.png",
    ]
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("skipped")]
    assert [note.split(":")[0] for note in notes] == [
        "skipped set-task prediction figures",
        "skipped training curves",
    ]
    # The command that makes the run in that folder.
    command = f"(python train.py --synthetic --checkpoint-dir {tmp_path} makes"
    assert all(command in note for note in notes)


def spoil_other_task(path):
    save_checkpoint(path, ReversePredictor, REVERSE_HPARAMS)


@pytest.mark.parametrize(
    "spoil, note",
    [
        (spoil_truncate, "SetAnomalyDetect.ckpt cannot be read"),
        (spoil_other_task, "is a model of another task"),
    ],
)
def test_a_bad_set_model_is_skipped_and_the_rest_made(made_up_run, tmp_path, capsys, spoil, note):
    shutil.copytree(made_up_run, tmp_path / "models")
    spoil(tmp_path / "models" / "synthetic" / "SetAnomalyDetect.ckpt")
    made = visualize.main(["--synthetic", "--checkpoint-dir", str(tmp_path / "models")])
    assert "anomaly_example_sets.png" in names(made) and "training_curves.png" in names(made)
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("skipped")]
    assert len(notes) == 1 and notes[0].startswith("skipped set-task prediction figures: ")
    assert note in notes[0] and "python train.py --synthetic --retrain" in notes[0]


EVERY_FIGURE = [
    "anomaly_example_sets.png",
    "anomaly_mistakes.png",
    "anomaly_prediction.png",
    "lr_schedule.png",
    "positional_encoding.png",
    "positional_encoding_dims.png",
    "training_curves.png",
]
# Set sizes no run trains with (train.py wants a whole number of 2 or more), and settings that are
# not a record of them at all.
NOT_SET_SIZES = ["ten", 2.5, 0, 1, -3, True, [5], None]


def with_train_settings(made_up_run, tmp_path, train_settings):
    """A copy of made_up_run whose set model holds train_settings: its checkpoint dir."""
    shutil.copytree(made_up_run, tmp_path / "models")
    save_checkpoint(
        tmp_path / "models" / "synthetic" / "SetAnomalyDetect.ckpt",
        AnomalyPredictor,
        SET_HPARAMS,
        train_settings=train_settings,
    )
    return tmp_path / "models"


def test_only_a_set_size_train_py_could_train_with_is_read():
    assert visualize.recorded_set_size(dict(set_size=5)) == 5
    for size in NOT_SET_SIZES:
        assert visualize.recorded_set_size(dict(set_size=size)) == 10, size
    for settings in ([1], "set_size=5", None, {}):
        assert visualize.recorded_set_size(settings) == 10, settings


def test_a_set_model_with_an_unusable_set_size_draws_sets_of_the_posts_size(
    made_up_run, tmp_path, capsys
):
    checkpoint_dir = with_train_settings(made_up_run, tmp_path, dict(set_size="ten"))
    made = visualize.main(["--synthetic", "--checkpoint-dir", str(checkpoint_dir)])
    assert names(made) == EVERY_FIGURE and "skipped" not in capsys.readouterr().out
    sets = checkpoint_dir / "synthetic" / "figures" / "anomaly_example_sets.png"
    assert png_size(sets) == (1200, 580)  # 4 sets of 10 images, 1.2 in each


def test_a_set_model_whose_settings_are_no_record_is_no_traceback(made_up_run, tmp_path, capsys):
    checkpoint_dir = with_train_settings(made_up_run, tmp_path, [1])
    made = visualize.main(["--synthetic", "--checkpoint-dir", str(checkpoint_dir)])
    # The model may be refused (checkpoints.load_model); what does not need it is made all the same.
    assert {"anomaly_example_sets.png", "training_curves.png"} <= set(names(made))
    sets = checkpoint_dir / "synthetic" / "figures" / "anomaly_example_sets.png"
    assert png_size(sets) == (1200, 580)
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("skipped")]
    assert all(note.startswith("skipped set-task prediction figures: ") for note in notes)


@pytest.mark.parametrize("results", [[1], {"settings": dict(set_size=0)}], ids=json.dumps)
def test_a_run_with_unusable_results_draws_chance_for_the_posts_size(
    made_up_run, tmp_path, capsys, figures, results
):
    shutil.copytree(made_up_run, tmp_path / "models")
    task_folder = tmp_path / "models" / "synthetic" / "SetAnomalyDetect"
    (task_folder / "results.json").write_text(json.dumps(results))
    made = visualize.main(["--synthetic", "--checkpoint-dir", str(tmp_path / "models")])
    assert names(made) == EVERY_FIGURE and "skipped" not in capsys.readouterr().out
    (curves,) = [fig for fig in figures if fig.get_suptitle().startswith("Set task training")]
    chance = [line for line in curves.axes[1].lines if line.get_label().startswith("chance")]
    assert [line.get_label() for line in chance] == ["chance (1 in 10)"]
    assert list(chance[0].get_ydata()) == [10, 10]


def test_a_corrupt_reverse_model_is_one_note_and_the_rest_made(tmp_path, capsys):
    path = tmp_path / "ReverseTask.ckpt"
    save_checkpoint(path, ReversePredictor, REVERSE_HPARAMS)
    spoil_truncate(path)
    visualize.main(["--checkpoint-dir", str(tmp_path), "--data-dir", str(tmp_path)])
    notes = [
        line for line in capsys.readouterr().out.splitlines() if line.startswith("skipped rev")
    ]
    assert len(notes) == 1 and notes[0].startswith(
        f"skipped reverse attention map: {path} cannot be read"
    )
    command = f"python train.py --task reverse --retrain --checkpoint-dir {tmp_path}"
    assert notes[0].endswith(f"({command} makes a new one)")
    assert sorted(glob.glob("*", root_dir=tmp_path / "figures")) == [
        "lr_schedule.png",
        "positional_encoding.png",
        "positional_encoding_dims.png",
    ]


@pytest.mark.parametrize(
    "model_class, hparams, weights_of, note",
    [
        (AnomalyPredictor, SET_HPARAMS, AnomalyPredictor, "is a model of another task"),
        (ReversePredictor, REVERSE_HPARAMS, AnomalyPredictor, "does not load into Reverse"),
    ],
)
def test_a_reverse_model_of_another_kind_is_skipped(
    tmp_path, capsys, model_class, hparams, weights_of, note
):
    checkpoint = {
        "state_dict": weights_of(**SET_HPARAMS).state_dict(),
        "hyper_parameters": hparams,
        "pytorch-lightning_version": "2.0.0",
    }
    torch.save(checkpoint, tmp_path / "ReverseTask.ckpt")
    assert visualize.reverse_figure(str(tmp_path), str(tmp_path / "figures")) == []
    out = capsys.readouterr().out
    assert out.startswith("skipped reverse attention map: ") and out.count("\n") == 1
    assert note in out


def test_a_checkpoint_dir_that_cannot_hold_figures_is_one_line(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    with pytest.raises(SystemExit) as exit_info:
        visualize.main(["--checkpoint-dir", str(a_file)])
    message = str(exit_info.value.code)
    assert message.startswith(f"error: cannot write the figures to {a_file}")
    assert "\n" not in message


def colour_bars(fig):
    return [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]


def test_each_colour_bar_runs_from_0_to_its_maps_largest_weight_with_1_over_n_marked(figures):
    # Layer 1 spreads every query nearly evenly over 10 keys, 0.097 to 0.103; layer 2 picks one.
    flat = np.full((1, 10, 10), 0.1)
    flat[0, :, 0], flat[0, :, 1] = 0.103, 0.097
    peaked = np.eye(10)[None]
    visualize.plot_set_prediction(
        "set.png", np.zeros((10, 8, 8, 3)), np.full(10, 0.1), [flat, peaked]
    )
    figures[0].canvas.draw()
    panels = drawn(figures[0], 2)
    for ax, largest in zip(panels, ["0.103", "1"], strict=True):
        image = ax.get_images()[0]
        assert image.get_clim() == pytest.approx((0, float(largest)))
        bar = image.colorbar
        assert [t.get_text() for t in bar.ax.get_yticklabels()] == ["0", largest]
        # The weight of even attention, 1/10, is a line across the bar, and named.
        assert [line.get_ydata()[0] for line in bar.ax.lines] == pytest.approx([0.1])
        assert "1/10" in bar.ax.get_ylabel()
    assert len(colour_bars(figures[0])) == 2


def test_the_true_anomaly_column_is_labelled(figures):
    probs = np.array([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7]])  # the true anomaly is the last image
    visualize.plot_image_rows("rows.png", np.zeros((2, 3, 8, 8, 3)), "worst", probs, "Test set")
    labels = [[ax.get_xlabel() for ax in row] for row in np.reshape(figures[0].axes, (2, 3))]
    assert all("true anomaly" in row[2] and "true anomaly" not in row[0] for row in labels)
    assert "predicted" in labels[0][0] and "predicted" in labels[1][2]


def test_accuracy_curves_show_chance(figures):
    scalars = {"train_loss": {0: 2.0}, "epoch": {0: 0}, "val_acc": {0: 0.3}}
    visualize.plot_training_curves("curves.png", scalars, "curves", set_size=10)
    accuracy = figures[0].axes[1]
    chance = [line for line in accuracy.lines if line.get_label() == "chance (1 in 10)"]
    assert len(chance) == 1 and list(chance[0].get_ydata()) == [10, 10]


def test_the_curves_say_why_training_accuracy_lies_below_validation(figures):
    scalars = {"epoch": {0: 0}, "train_loss": {0: 2.0}, "val_loss": {0: 1.5}}
    scalars |= {"train_acc": {0: 0.2}, "val_acc": {0: 0.3}}
    visualize.plot_training_curves("curves.png", scalars, "curves", set_size=10)
    for ax in figures[0].axes:
        labels = [text.get_text() for text in ax.get_legend().get_texts()]
        assert labels[0].startswith("training: fresh sets, dropout on")
        assert labels[1] == "validation: fixed sets, no dropout"


def test_the_positional_encoding_colour_bar_spans_minus_one_to_one(figures):
    visualize.plot_positional_encoding("pe.png", "pe_dims.png")
    table = figures[0]
    assert table.axes[0].get_images()[0].get_clim() == (-1, 1)
    ticks = colour_bars(table)[0].get_yticks()
    assert min(ticks) == -1 and max(ticks) == 1


@pytest.mark.parametrize("stand_out", [0.0, 3.0], ids=["all alike", "one stands out"])
def test_the_set_prediction_frames_an_odd_one_only_when_it_is_clear(
    made_up_run, tmp_path, figures, monkeypatch, stand_out
):
    # A model whose logit for an image is its first feature: 0 for every image but image 0, the
    # anomaly of the set drawn, whose is stand_out. With 3 it is e³ ≈ 20 times as likely as each
    # other image (clear, predict.py's rule); with 0 all are alike (not clear).
    monkeypatch.setattr(AnomalyPredictor, "anomaly_logits", lambda self, x: x[..., 0])
    run = shutil.copytree(made_up_run, tmp_path / "run")
    cache = str(run / "synthetic" / "test_set_features.tar")
    feats, labels = caches.load_cache(cache, synthetic_meta("test"), SYNTHETIC["num_classes"])
    feats[:, 0] = 0
    feats[0, 0] = stand_out
    caches.save_cache(cache, feats, labels, synthetic_meta("test"))
    visualize.main(["--synthetic", "--checkpoint-dir", str(run)])
    (prediction,) = [fig for fig in figures if drawn(fig, 2) and fig.subfigs]
    captions = [ax.get_xlabel() for ax in drawn(prediction, 3)]
    title = prediction.subfigs[0].get_suptitle()
    if stand_out:
        assert [i for i, c in enumerate(captions) if "predicted" in c] == [4]  # anomaly last
        assert title == "Predicted anomaly: image 5 (the true one is image 5)"
    else:
        assert not any("predicted" in c for c in captions)
        expected = (
            "No clear odd one out: image 1 is the most likely (20.00%); the true one is image 5"
        )
        assert title == expected


def cjk_font(path, name, characters):
    """A TrueType font named name whose glyph for each of characters is a filled square of 0.8 em
    (from 0.1 to 0.9 em across, 0 to 0.8 em up): a stand-in for Noto Sans CJK."""
    from fontTools.fontBuilder import FontBuilder
    from fontTools.pens.ttGlyphPen import TTGlyphPen

    def glyph(filled):
        pen = TTGlyphPen(None)
        if filled:
            for point in ((100, 0), (100, 800), (900, 800), (900, 0)):
                (pen.lineTo if point != (100, 0) else pen.moveTo)(point)
            pen.closePath()
        return pen.glyph()

    names = {ord(c): f"uni{ord(c):04X}" for c in characters}
    font = FontBuilder(1000, isTTF=True)
    font.setupGlyphOrder([".notdef", *names.values()])
    font.setupCharacterMap(names)
    font.setupGlyf({".notdef": glyph(False), **{n: glyph(True) for n in names.values()}})
    font.setupHorizontalMetrics({n: (1000, 0) for n in [".notdef", *names.values()]})
    font.setupHorizontalHeader(ascent=880, descent=-120)
    font.setupNameTable({"familyName": name, "styleName": "Regular"})
    font.setupOS2(sTypoAscender=880, usWinAscent=880, usWinDescent=120)
    font.setupPost()
    font.save(str(path))
    return path


def test_chinese_names_are_drawn_with_an_installed_cjk_font(tmp_path, figures, monkeypatch):
    # A font named as Noto Sans CJK SC, which draws 猫 and 火 as filled squares, installed here.
    path = cjk_font(tmp_path / "cjk.ttf", "Noto Sans CJK SC", "猫火")
    manager = visualize.font_manager.fontManager
    monkeypatch.setattr(manager, "ttflist", list(manager.ttflist))  # uninstalled afterwards
    manager.addfont(str(path))
    monkeypatch.setitem(
        visualize.plt.rcParams, "font.family", visualize.plt.rcParams["font.family"]
    )
    assert visualize.use_cjk_font() == "Noto Sans CJK SC"
    names = ["猫.jpg", "火.jpg"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "Glyph … missing" warning
        visualize.plot_set_prediction(
            "s.png", np.zeros((2, 8, 8, 3)), np.array([0.7, 0.3]), [np.full((1, 2, 2), 0.5)],
            names=names,
        )  # fmt: skip
        assert [c.split(":")[0] for c in map(Axes.get_xlabel, drawn(figures[0], 3))] == names
        # The glyphs are the font's: 猫火 at 40 pt, 100 dpi, is two black squares of 0.8 em.
        fig = visualize.plt.figure(figsize=(3, 1), dpi=100)
        fig.text(0.05, 0.3, "猫火", fontsize=40)
        fig.canvas.draw()
    ink = (np.asarray(fig.canvas.buffer_rgba())[..., :3].mean(axis=-1) < 128).sum()
    square = (0.8 * 40 / 72 * 100) ** 2
    assert ink == pytest.approx(2 * square, rel=0.1)


def test_without_a_cjk_font_chinese_is_written_as_codes_with_no_warning(figures, monkeypatch):
    monkeypatch.setitem(visualize.plt.rcParams, "font.family", ["DejaVu Sans"])
    assert visualize.drawable("火箭 rocket.jpg") == "\\u706b\\u7bad rocket.jpg"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        visualize.plot_set_prediction(
            "s.png", np.zeros((2, 8, 8, 3)), np.array([0.7, 0.3]), [np.full((1, 2, 2), 0.5)],
            title="Odd one out: 猫.jpg", names=["猫.jpg", "b.jpg"],
        )  # fmt: skip
        figures[0].canvas.draw()
    captions = [ax.get_xlabel().split(":")[0] for ax in drawn(figures[0], 3)]
    assert captions == ["\\u732b.jpg", "b.jpg"]
    assert figures[0].subfigs[0].get_suptitle() == "Odd one out: \\u732b.jpg"


def test_a_set_of_40_pictures_stays_legible(figures):
    # predict.py's figure for 40 pictures and the post's model, 4 layers of 4 heads.
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(40))
    maps = [rng.dirichlet(np.ones(40), size=(4, 40)) for _ in range(4)]
    names = [f"holiday_photo_{i:02d}.jpg" for i in range(40)]
    visualize.plot_set_prediction("s.png", rng.random((40, 8, 8, 3)), probs, maps, names=names)
    fig = figures[0]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    width, height = fig.get_size_inches() * visualize.DPI
    assert width <= 2000 and height <= 2600  # a picture a screen shows, not a 4800 px strip
    pictures = list(drawn(fig, 3))
    assert len({round(ax.get_position().y0, 4) for ax in pictures}) == 4  # 4 rows of 10
    captions = [ax.xaxis.label.get_window_extent(renderer) for ax in pictures]
    assert not any(a.overlaps(b) for a, b in itertools.combinations(captions, 2))
    numbers = ["1"] + [str(n) for n in range(5, 41, 5)]
    for ax in drawn(fig, 2):
        for labels in (ax.get_xticklabels(), ax.get_yticklabels()):
            assert [t.get_text() for t in labels] == numbers
            boxes = [t.get_window_extent(renderer) for t in labels]
            assert not any(a.overlaps(b) for a, b in itertools.combinations(boxes, 2))
        assert ax.get_window_extent(renderer).width >= 2.0 * visualize.DPI  # maps of 2 in or more


def test_the_even_weight_is_named_in_words_on_each_colour_bar(figures):
    visualize.plot_set_prediction(
        "s.png", np.zeros((10, 8, 8, 3)), np.full(10, 0.1), [np.eye(10)[None]]
    )
    (bar,) = colour_bars(figures[0])
    assert bar.get_ylabel() == "attention weight; line: 1/10, all 10 alike"
    (line,) = bar.lines
    assert line.get_xdata()[0] < 0 and line.get_xdata()[1] > 1  # out past both edges of the bar


def test_a_loss_flat_at_chance_looks_flat(made_up_run, tmp_path, figures):
    # A loss that stays at chance, 2.2964 to 2.3023 (ln 10 = 2.3026), as an untrained model gives.
    run = shutil.copytree(made_up_run, tmp_path / "run")
    logs = run / "synthetic" / "SetAnomalyDetect" / "lightning_logs" / "version_0"
    shutil.rmtree(logs)
    events = []
    for step, loss in enumerate([2.3023, 2.3010, 2.2990, 2.2964]):
        events += [("train_loss", step, loss), ("epoch", step, step // 2)]
    write_events(logs, events)
    visualize.training_curves_figure(str(run), str(tmp_path), synthetic=True)
    fig = figures[0]
    loss = fig.axes[0]
    low, high = loss.get_ylim()
    assert low == 0 and high >= np.log(10)  # from 0: the fall of 0.006 is a flat line
    chance = [line for line in loss.lines if line.get_label().startswith("chance")]
    assert list(chance[0].get_ydata()) == pytest.approx([np.log(10)] * 2)
    assert fig.get_suptitle() == "Set task training curves (--synthetic)"  # no version_0


def test_from_another_folder_it_says_where_the_figures_go(tmp_path, monkeypatch, capsys):
    repository, elsewhere = tmp_path / "repository", tmp_path / "elsewhere"
    (repository / "saved_models").mkdir(parents=True)
    elsewhere.mkdir()
    for module in (visualize, folders):  # the scripts' folder, as each names it
        monkeypatch.setattr(module, "ROOT", str(repository))
    monkeypatch.chdir(elsewhere)
    visualize.main(["--synthetic"])
    out = capsys.readouterr().out.splitlines()
    figures_there = elsewhere / "saved_models" / "synthetic" / "figures"
    assert out[0] == f"Figures go to {figures_there} (--checkpoint-dir, relative to this folder)."
    assert out[1] == (
        "To draw the runs beside visualize.py instead, add --checkpoint-dir "
        f"{repository / 'saved_models'}."
    )
    monkeypatch.chdir(repository)  # beside the scripts: nothing to say
    visualize.main(["--synthetic"])
    assert not capsys.readouterr().out.startswith("Figures go to")


def test_a_picture_that_cannot_be_drawn_now_leaves_no_older_one_behind(tmp_path, capsys):
    (tmp_path / "training_curves.png").write_bytes(b"an earlier run's curves")
    assert visualize.training_curves_figure(str(tmp_path / "models"), str(tmp_path)) == []
    assert not (tmp_path / "training_curves.png").exists()
    assert capsys.readouterr().out.endswith("(an earlier training_curves.png removed)\n")


def test_a_training_that_stopped_is_pointed_to_resume(made_up_run, tmp_path, capsys):
    run = shutil.copytree(made_up_run, tmp_path / "run")
    model = run / "synthetic" / "SetAnomalyDetect.ckpt"
    last = run / "synthetic" / "SetAnomalyDetect" / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    os.replace(model, last)  # as a training that stopped before its model was figures leaves it
    visualize.main(["--synthetic", "--checkpoint-dir", str(run)])
    (note,) = [line for line in capsys.readouterr().out.splitlines() if "prediction" in line]
    assert f"(python train.py --synthetic --resume --checkpoint-dir {run} makes it)" in note
