"""predict.py on generated images, with a model trained here on generated features; predict.py and
train.py offline."""

import json
import os
import re
import shlex
import shutil
import warnings

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn as nn
import torchvision
from PIL import Image
from torch.utils.data import DataLoader

import features
import predict
import visualize
from data import SetAnomalyDataset
from features import extract_features, image_transform
from harness import caches, synthetic
from harness.caches import extraction_meta
from harness.synthetic import GeneratedImages
from helpers import (
    SMALL_SET_MODEL,
    drawn,
    publish,
    quiet_trainer,
    randomise,
    red_frames,
    run_script,
    save_like_the_tutorial,
)
from model import AnomalyPredictor

IMAGE_SIZE = synthetic.SYNTHETIC["image_size"]


def toy_backbone():
    """A small fixed feature extractor standing in for ResNet34: mean colours of a 2×2 grid,
    projected to 512 dimensions. Generated classes differ in exactly those colours."""
    torch.manual_seed(0)
    return nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(12, 512)).eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint folder as `train.py --synthetic` leaves it, its model trained on toy-backbone
    features."""
    root = tmp_path_factory.mktemp("predict")
    images = GeneratedImages(10, 40, image_transform(IMAGE_SIZE), seed=0, split="train")
    feats = extract_features(
        toy_backbone(), images, torch.device("cpu"), batch_size=100, num_workers=0
    )
    pl.seed_everything(0)
    model = AnomalyPredictor(**SMALL_SET_MODEL, input_dim=512, max_iters=200)
    trainer = quiet_trainer(max_steps=200)
    loader = DataLoader(
        SetAnomalyDataset(feats, torch.tensor(images.targets), set_size=10, train=True),
        batch_size=32,
        shuffle=True,
        drop_last=True,
    )
    trainer.fit(model, loader)
    os.makedirs(root / "synthetic")
    trainer.save_checkpoint(root / "synthetic" / "SetAnomalyDetect.ckpt")
    return root


def write_set(folder, odd_position, size=10, seed=0):
    """size PNG files named a.png, b.png, ...: one generated class, and at odd_position an image of
    another."""
    os.makedirs(folder, exist_ok=True)
    pool = GeneratedImages(10, 20, None, seed=seed, split="test")
    targets = np.array(pool.targets)
    usual, odd = np.where(targets == 2)[0], np.where(targets == 7)[0]
    names = []
    for i in range(size):
        name = f"{chr(ord('a') + i)}.png"
        Image.fromarray(pool.data[odd[0] if i == odd_position else usual[i]]).save(folder / name)
        names.append(name)
    return names


@pytest.fixture
def offline_backbone(monkeypatch):
    monkeypatch.setattr(synthetic, "synthetic_backbone", toy_backbone)


def run(trained, *args):
    return predict.main(["--synthetic", "--checkpoint-dir", str(trained), *map(str, args)])


@pytest.mark.parametrize("odd_position", [0, 6, 9])
def test_the_odd_image_is_found(trained, tmp_path, offline_backbone, capsys, odd_position):
    names = write_set(tmp_path / "set", odd_position)
    result = run(trained, tmp_path / "set")
    assert result["predicted_index"] == odd_position
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("Odd one out: ") and names[odd_position] in out[-1]
    assert len(out) == 12 and names[odd_position] in out[1]  # sorted: the most likely first
    assert result["probabilities"].sum() == pytest.approx(1.0, abs=1e-5)


def test_order_of_the_files_does_not_matter(trained, tmp_path, offline_backbone):
    names = write_set(tmp_path / "set", 4)
    files = [tmp_path / "set" / n for n in names]
    forward = run(trained, *files)
    backward = run(trained, *files[::-1])
    prob = {
        os.path.basename(f): p
        for f, p in zip(forward["files"], forward["probabilities"], strict=True)
    }
    for f, p in zip(backward["files"], backward["probabilities"], strict=True):
        assert p == pytest.approx(prob[os.path.basename(f)], abs=1e-6)


def test_json_matches_the_text(trained, tmp_path, offline_backbone, capsys):
    write_set(tmp_path / "set", 3)
    run(trained, tmp_path / "set")
    text = capsys.readouterr().out.splitlines()
    run(trained, tmp_path / "set", "--json")
    result = json.loads(capsys.readouterr().out)
    assert result["predicted_index"] == 3 and result["predicted_file"] == result["files"][3]
    assert result["clear"] is True
    for line in text[1:-1]:  # the table, between its header and the verdict
        percent, name = line.split()
        assert float(percent.rstrip("%")) == pytest.approx(
            100 * result["probabilities"][result["files"].index(name)], abs=0.006
        )


def test_any_set_size_and_image_kind(trained, tmp_path, offline_backbone):
    names = write_set(tmp_path / "set", 1, size=4)
    # Opaque alpha.
    Image.open(tmp_path / "set" / names[0]).convert("RGBA").save(tmp_path / "set" / names[0])
    Image.open(tmp_path / "set" / names[2]).resize((96, 96), Image.NEAREST).save(
        tmp_path / "set" / names[2]
    )
    result = run(trained, tmp_path / "set")
    assert len(result["files"]) == 4 and result["predicted_index"] == 1


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "I;16"])
def test_every_image_mode_becomes_a_cifar_sized_rgb_image(tmp_path, mode):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    image = image.convert(mode) if mode != "I;16" else image.convert("L").convert("I;16")
    image.save(tmp_path / "image.png")
    loaded = predict.load_image(tmp_path / "image.png")
    assert loaded.mode == "RGB" and loaded.size == (32, 32)


def test_transparent_parts_become_white_and_the_centre_square_is_kept(tmp_path):
    clear = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    clear.save(tmp_path / "clear.png")
    assert np.asarray(predict.load_image(tmp_path / "clear.png")).min() == 255
    wide = np.zeros((30, 90, 3), dtype=np.uint8)
    wide[:, :30, 0] = wide[:, 30:60, 1] = wide[:, 60:, 2] = 255  # red | green | blue
    Image.fromarray(wide).save(tmp_path / "wide.png")
    assert np.asarray(predict.load_image(tmp_path / "wide.png")).mean(
        axis=(0, 1)
    ).round().tolist() == [0, 255, 0]


def test_figure(trained, tmp_path, offline_backbone):
    write_set(tmp_path / "set", 5)
    run(trained, tmp_path / "set", "--figure", tmp_path / "odd.png")
    with Image.open(tmp_path / "odd.png") as image:
        # 10 images over 2 layers of 2 heads: 2 in + 2.6 in per layer.
        assert image.size == (1200, 720)


def exits_with(message, *argv):
    with pytest.raises(SystemExit) as exit_info:
        predict.main(list(map(str, argv)))
    assert message in str(exit_info.value.code)


def test_bad_input_gets_one_clear_line(trained, tmp_path, offline_backbone):
    names = write_set(tmp_path / "set", 0, size=3)
    synthetic = ["--synthetic", "--checkpoint-dir", trained]
    exits_with("at least two images", *synthetic, tmp_path / "set" / names[0])
    (tmp_path / "set" / "broken.png").write_bytes(b"not a picture")
    exits_with("broken.png is not a readable image", *synthetic, tmp_path / "set")
    exits_with("no such file or folder", *synthetic, tmp_path / "nowhere")
    os.makedirs(tmp_path / "empty")
    exits_with("holds no image files", *synthetic, tmp_path / "empty")
    files = [tmp_path / "set" / n for n in names]
    command = f"`python train.py --checkpoint-dir {tmp_path / 'none'}` trains one"
    exits_with(command, "--checkpoint-dir", tmp_path / "none", *files)
    exits_with("is a folder", "--ckpt", tmp_path, *files)
    reverse = tmp_path / "ReverseTask.ckpt"
    hparams = dict(
        input_dim=10, model_dim=16, num_classes=10, num_heads=1, num_layers=1, lr=1e-3, warmup=1,
        max_iters=2,
    )  # fmt: skip
    torch.save({"state_dict": {}, "hyper_parameters": hparams}, reverse)
    exits_with("model of another task", "--ckpt", reverse, *files)
    broken = tmp_path / "broken.ckpt"
    torch.save(
        {"state_dict": {}, "hyper_parameters": dict(hparams, input_dim=512, num_classes=1)}, broken
    )
    exits_with("does not load into AnomalyPredictor", "--ckpt", broken, *files)


def test_offline_runs_fail_fast_and_name_what_is_missing(trained, tmp_path):
    env = dict(os.environ, TORCH_HOME=str(tmp_path / "torch"))
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        env[var] = "http://127.0.0.1:9"  # every download fails at once, whatever the network
    names = write_set(tmp_path / "set", 0, size=3)
    run = lambda script, *args: run_script(script, *args, env=env)
    predicted = run(
        "predict.py",
        "--ckpt",
        trained / "synthetic" / "SetAnomalyDetect.ckpt",
        *[tmp_path / "set" / n for n in names],
    )
    trained_run = run(
        "train.py", "--data-dir", tmp_path / "data", "--checkpoint-dir", tmp_path / "models"
    )
    assert predicted.returncode == 1 and trained_run.returncode == 1
    assert "Traceback" not in predicted.stderr + trained_run.stderr
    assert predicted.stderr.startswith("error: ")
    # train.py names both downloads it could not make, and where each would have gone.
    assert "CIFAR-100" in trained_run.stderr and str(tmp_path / "data") in trained_run.stderr
    assert "resnet34-b627a593.pth" in trained_run.stderr
    # predict.py needs the weights alone, and says so with train.py's very line.
    weights_line = [line for line in predicted.stderr.splitlines() if "ResNet34 weights" in line]
    assert len(weights_line) == 1 and str(tmp_path / "torch") in weights_line[0]
    assert weights_line[0] in trained_run.stderr.splitlines()
    # Nothing of the run that never began is left: no empty folder for its model or its data.
    assert not (tmp_path / "models").exists() and not (tmp_path / "data").exists()


def test_bad_input_to_the_script_is_one_line_and_exit_1(tmp_path):
    proc = run_script("predict.py", "--checkpoint-dir", tmp_path, tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error:")


def test_set_size_accuracy_on_cached_test_features(trained, tmp_path, capsys):
    images = GeneratedImages(10, 20, image_transform(IMAGE_SIZE), seed=0, split="test")
    feats = extract_features(
        toy_backbone(), images, torch.device("cpu"), batch_size=100, num_workers=0
    )
    caches.save_cache(
        str(trained / "synthetic" / "test_set_features.tar"),
        feats,
        torch.tensor(images.targets),
        synthetic.synthetic_meta("test"),
    )
    accuracies = run(trained, "--set-sizes", 2, 10)
    assert set(accuracies) == {2, 10} and accuracies[10] > 0.9
    assert "set size  10: accuracy" in capsys.readouterr().out


def test_a_figure_that_cannot_be_a_png_file_is_refused_first(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for figure, says in [
        (str(tmp_path), "is a folder"),
        ("odd.txt", "ending in .png"),
        ("", "ending in .png"),
        (str(a_file / "odd.png"), "is a file, not a folder"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            predict.main(["a.png", "b.png", "--figure", figure])
        assert exit_info.value.code == 2 and says in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        predict.main(["--set-sizes", "5", "--figure", "odd.png"])
    assert exit_info.value.code == 2 and "--set-sizes" in capsys.readouterr().err


def test_a_figure_never_replaces_or_joins_the_pictures(tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(2):
        Image.new("RGB", (8, 8), (100 * i, 0, 0)).save(photos / f"{i}.png")
    before = (photos / "0.png").read_bytes()
    for argv in (
        [str(photos / "0.png"), str(photos / "1.png"), "--figure", str(photos / "0.png")],
        [str(photos), "--figure", str(photos / "odd.png")],
    ):
        with pytest.raises(SystemExit) as exit_info:
            predict.main(argv)
        assert exit_info.value.code == 2 and "over or among" in capsys.readouterr().err
    assert (photos / "0.png").read_bytes() == before and sorted(os.listdir(photos)) == [
        "0.png",
        "1.png",
    ]


def test_json_keeps_stdout_for_the_json_alone(trained, tmp_path, capsys):
    folder = tmp_path / "synthetic"
    shutil.copytree(trained / "synthetic", folder)
    images = GeneratedImages(10, 20, image_transform(IMAGE_SIZE), seed=0, split="test")
    feats = extract_features(toy_backbone(), images, torch.device("cpu"), num_workers=0)
    meta = synthetic.synthetic_meta("test")
    path, fast_meta = caches.cache_path(str(folder), "test", True), extraction_meta(meta, True)
    caches.save_cache(path, feats, torch.tensor(images.targets), fast_meta)
    (folder / "test_set_features.tar").write_bytes(b"broken")  # its note goes to stderr
    accuracies = run(tmp_path, "--set-sizes", 2, 10, "--json")
    out, err = capsys.readouterr()
    assert {int(n): a for n, a in json.loads(out).items()} == accuracies
    assert "test_set_features.tar cannot be read" in err


def test_an_image_too_large_to_open_safely_is_one_line(tmp_path, monkeypatch):
    write_set(tmp_path / "set", 0, size=3)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # as a 20000×20000 image is to the default
    with pytest.raises(SystemExit) as exit_info:
        predict.main([str(tmp_path / "set")])
    message = str(exit_info.value.code)
    assert message.startswith("error: 3 of the 3 files are not readable images: ")
    assert f"{tmp_path / 'set' / 'a.png'} (DecompressionBombError)" in message
    assert message.count("DecompressionBombError") == 3 and "\n" not in message


def test_a_set_of_like_images_has_no_clear_odd_one(trained, tmp_path, offline_backbone, capsys):
    names = write_set(tmp_path / "set", odd_position=None, size=4)  # four images of one class
    result = run(trained, tmp_path / "set")
    probs = sorted(result["probabilities"], reverse=True)
    assert result["clear"] is False and probs[0] < predict.CLEAR_RATIO * probs[1]
    out = capsys.readouterr().out.splitlines()
    table, verdict = out[1:5], out[5]  # after the header; the verdict after the table
    assert len(out) == 6  # one verdict: no clear odd one, or, as here, none told apart at all
    assert verdict.startswith("The model cannot tell these pictures apart: each gets about 1/4")
    assert verdict.endswith(
        f"not {predict.CLEAR_RATIO:g} times as likely as the least ({table[-1].split()[0]})."
    )
    # Printed with the decimals that rank them: no two of the four read alike.
    assert len({line.split()[0] for line in table}) == 4 and len(names) == 4


def test_without_a_cifar_model_the_synthetic_one_is_named(trained, tmp_path):
    write_set(tmp_path / "set", 0, size=3)
    with pytest.raises(SystemExit) as exit_info:
        predict.main(["--checkpoint-dir", str(trained), str(tmp_path / "set")])
    model = trained / "synthetic" / "SetAnomalyDetect.ckpt"
    assert str(exit_info.value.code).endswith(
        f"The model of `python train.py --synthetic --checkpoint-dir {trained}` is at {model}: add "
        f"--synthetic to use it.{PUBLISHED_HINT}"
    )


def broken_png(path):
    """A PNG whose first data chunk claims 1 byte: PIL then reads a chunk header from the middle of
    the compressed pixels and raises SyntaxError ("broken PNG file"), not OSError."""
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
        path
    )
    data = bytearray(path.read_bytes())
    data[33:37] = (1).to_bytes(4, "big")  # the length of the chunk after the 33 bytes of IHDR
    path.write_bytes(bytes(data))


def test_a_corrupt_png_is_one_line(tmp_path):
    write_set(tmp_path / "set", 0, size=3)
    broken_png(tmp_path / "set" / "d.png")
    with pytest.raises(SyntaxError), Image.open(tmp_path / "set" / "d.png") as image:
        image.load()  # what PIL itself makes of it
    with pytest.raises(SystemExit) as exit_info:
        predict.main([str(tmp_path / "set")])
    assert str(exit_info.value.code) == (
        f"error: {tmp_path / 'set' / 'd.png'} is not a readable image (SyntaxError). "
        "Remove it or give other files."
    )


def test_every_unreadable_picture_is_named_at_once(tmp_path):
    write_set(tmp_path / "set", 0, size=3)
    (tmp_path / "set" / "b.png").write_bytes(b"not a picture")
    broken_png(tmp_path / "set" / "c.png")
    with pytest.raises(SystemExit) as exit_info:
        predict.main([str(tmp_path / "set")])
    message = str(exit_info.value.code)
    assert message.startswith("error: 2 of the 3 files are not readable images: ")
    assert f"{tmp_path / 'set' / 'b.png'} (UnidentifiedImageError)" in message
    assert f"{tmp_path / 'set' / 'c.png'} (SyntaxError)" in message
    assert "a.png" not in message and "\n" not in message


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_a_named_pipe_is_refused_without_waiting_on_it(tmp_path):
    names = write_set(tmp_path / "set", 0, size=2)
    os.mkfifo(tmp_path / "set" / "f.png")  # no one ever writes to it: opening it would wait forever
    files = [tmp_path / "set" / n for n in [*names, "f.png"]]
    proc = run_script("predict.py", "--checkpoint-dir", tmp_path / "none", *files)
    assert proc.returncode == 1 and proc.stderr == (
        f"error: {files[-1]} is not a readable image (not a regular file). "
        "Remove it or give other files.\n"
    )


def gradient(top):
    """A 64×64 grey picture whose columns run from 0 to top in 256 steps, four columns a step."""
    return np.repeat(np.arange(256) * top / 255, 64).reshape(256, 64).T[:, ::4]


@pytest.mark.parametrize(
    "name, pixels",
    [
        ("16-bit.png", gradient(65535).round().astype(np.uint16)),  # PIL mode I;16
        ("float.tif", gradient(1.0).astype(np.float32)),  # PIL mode F
    ],
)
def test_high_bit_depth_and_float_pictures_look_as_in_a_viewer(tmp_path, name, pixels):
    image = Image.fromarray(pixels)
    assert image.mode in ("I;16", "F")
    image.save(tmp_path / name)
    eight_bit = gradient(255).round().astype(np.uint8)  # the same picture in 8 bits
    Image.fromarray(eight_bit).save(tmp_path / "8-bit.png")
    loaded = np.asarray(predict.load_image(tmp_path / name)).astype(int)
    expected = np.asarray(predict.load_image(tmp_path / "8-bit.png")).astype(int)
    assert loaded.max() - loaded.min() > 200  # not all white (16 bits) or all black (floats)
    assert np.abs(loaded - expected).max() <= 1


def overflowing_model(trained, path):
    """trained's model with one input weight of 3e38: finite, so it loads, but every activation it
    touches overflows to inf and the probabilities to NaN."""
    ckpt = torch.load(trained / "synthetic" / "SetAnomalyDetect.ckpt", weights_only=True)
    weights = [k for k in ckpt["state_dict"] if k.startswith("input_net") and k.endswith("weight")]
    ckpt["state_dict"][weights[0]][0, 0] = 3e38
    torch.save(ckpt, path)
    return path


def test_a_model_whose_weights_overflow_is_refused(trained, tmp_path, offline_backbone, capsys):
    write_set(tmp_path / "set", 2, size=4)
    ckpt = overflowing_model(trained, tmp_path / "huge.ckpt")
    probs = predict.predict(
        predict.load_set_model(str(ckpt), torch.device("cpu")),
        toy_backbone(),
        np.stack([np.asarray(Image.open(p)) for p in sorted((tmp_path / "set").iterdir())]),
        torch.device("cpu"),
        IMAGE_SIZE,
    )[0]
    assert not np.isfinite(probs).all()  # what the model gives
    with pytest.raises(SystemExit) as exit_info:
        run(trained, tmp_path / "set", "--ckpt", ckpt, "--json")
    assert str(exit_info.value.code) == (
        "error: the model gives no usable probabilities (its weights overflow to inf or NaN); "
        f"`python train.py --synthetic --retrain --checkpoint-dir {trained}` trains it anew."
    )
    assert capsys.readouterr().out == ""


def test_a_model_whose_weights_overflow_measures_no_accuracy(trained, tmp_path):
    images = GeneratedImages(10, 20, image_transform(IMAGE_SIZE), seed=0, split="test")
    feats = extract_features(toy_backbone(), images, torch.device("cpu"), num_workers=0)
    os.makedirs(tmp_path / "synthetic")
    caches.save_cache(
        str(tmp_path / "synthetic" / "test_set_features.tar"),
        feats,
        torch.tensor(images.targets),
        synthetic.synthetic_meta("test"),
    )
    ckpt = overflowing_model(trained, tmp_path / "huge.ckpt")
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path, "--set-sizes", 5, "--ckpt", ckpt)
    assert "no usable probabilities" in str(exit_info.value.code)


def test_an_existing_figure_is_never_replaced(trained, tmp_path, offline_backbone):
    write_set(tmp_path / "set", 0, size=3)
    (tmp_path / "odd.png").write_bytes(b"kept")
    with pytest.raises(SystemExit) as exit_info:
        run(trained, tmp_path / "set", "--figure", tmp_path / "odd.png")
    assert str(exit_info.value.code) == (
        f"error: --figure {tmp_path / 'odd.png'} already exists; remove it or choose another name."
    )
    assert (tmp_path / "odd.png").read_bytes() == b"kept"


def test_a_figure_where_none_can_be_written_is_refused_first(trained, tmp_path, offline_backbone):
    write_set(tmp_path / "set", 0, size=3)
    cases = [(tmp_path / "missing", "there is no folder")]
    if os.geteuid() != 0:  # root may write anywhere: os.access says yes to every folder
        (tmp_path / "read-only").mkdir(mode=0o555)
        cases.append((tmp_path / "read-only", "no permission to write in"))
    for folder, says in cases:
        figure = folder / "odd.png"
        with pytest.raises(SystemExit) as exit_info:
            run(trained, tmp_path / "set", "--figure", figure)
        message = str(exit_info.value.code)
        assert message.startswith(f"error: --figure {figure}: ") and f"{says} {folder};" in message
        assert ".tmp" not in message and not os.path.exists(figure)
    assert not (tmp_path / "missing").exists()


def test_a_checkpoint_folder_with_a_space_is_quoted_in_the_command(tmp_path):
    names = write_set(tmp_path / "set", 0, size=2)
    folder = tmp_path / "my models"
    with pytest.raises(SystemExit) as exit_info:
        predict.main(["--checkpoint-dir", str(folder), *[str(tmp_path / "set" / n) for n in names]])
    command = str(exit_info.value.code).split("`")[1]
    assert shlex.split(command) == ["python", "train.py", "--checkpoint-dir", str(folder)]


@pytest.fixture
def kept_figures(monkeypatch):
    """The figures that predict.py --figure saves, kept for what they draw."""
    made, save = [], visualize.save_figure
    monkeypatch.setattr(
        visualize, "save_figure", lambda fig, path: made.append(fig) or save(fig, path)
    )
    return made


def captions(fig):
    """The captions under the pictures of a figure, each on one line."""
    return [ax.get_xlabel().replace("\n", " ") for ax in drawn(fig, 3)]


def test_a_figure_frames_the_odd_one_only_when_it_is_clear(
    trained, tmp_path, offline_backbone, kept_figures
):
    write_set(tmp_path / "like", odd_position=None, size=4)  # four images of one class
    assert run(trained, tmp_path / "like", "--figure", tmp_path / "like.png")["clear"] is False
    write_set(tmp_path / "odd", odd_position=2, size=4)
    assert run(trained, tmp_path / "odd", "--figure", tmp_path / "odd.png")["clear"] is True
    assert red_frames(tmp_path / "like.png") == 0 and red_frames(tmp_path / "odd.png") == 1
    like, odd = map(captions, kept_figures)
    assert not any("predicted" in caption for caption in like)
    assert [i for i, caption in enumerate(odd) if "predicted" in caption] == [2]


def test_the_figure_and_the_table_give_the_same_percentages(
    trained, tmp_path, offline_backbone, capsys, kept_figures
):
    names = write_set(tmp_path / "set", odd_position=4, size=9)
    run(trained, tmp_path / "set", "--figure", tmp_path / "odd.png")
    rows = [line.split(maxsplit=1) for line in capsys.readouterr().out.splitlines()[1:10]]
    table = {os.path.basename(path): percent for percent, path in rows}
    shown = [re.search(r"p=(\S+)", caption).group(1) for caption in captions(kept_figures[0])]
    assert shown == [table[name] for name in names]
    assert all(re.fullmatch(r"\d+\.\d{2,6}%", percent) for percent in shown)


def test_the_table_says_what_its_percentages_are(trained, tmp_path, offline_backbone, capsys):
    write_set(tmp_path / "set", odd_position=1, size=3)
    run(trained, tmp_path / "set")
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "Probability of being the odd one out:"
    assert len(out) == 5 and not any("cannot tell" in line for line in out)
    run(trained, tmp_path / "set", "--json")
    assert json.loads(capsys.readouterr().out)["at_chance"] is False


def at_chance_model(trained, path):
    """trained's model with the weights of its last layer zeroed: every image gets the same logit,
    so the same probability, whatever the pictures."""
    ckpt = torch.load(trained / "synthetic" / "SetAnomalyDetect.ckpt", weights_only=True)
    last = [k for k in ckpt["state_dict"] if k.startswith("output_net") and k.endswith("weight")]
    ckpt["state_dict"][last[-1]].zero_()
    torch.save(ckpt, path)
    return path


def test_a_model_at_chance_says_it_cannot_tell_the_pictures_apart(
    trained, tmp_path, offline_backbone, capsys
):
    write_set(tmp_path / "set", odd_position=3, size=9)
    ckpt = at_chance_model(trained, tmp_path / "chance.ckpt")
    result = run(trained, tmp_path / "set", "--ckpt", ckpt)
    assert result["probabilities"] == pytest.approx(np.full(9, 1 / 9))
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "Probability of being the odd one out:"
    assert [line.split()[0] for line in out[1:10]] == ["11.11%"] * 9
    # One verdict: at chance says it all (no "No clear odd one out" line besides).
    assert out[10].startswith("The model cannot tell these pictures apart: ")
    assert "1/9 (11.11%)" in out[10] and len(out) == 11
    run(trained, tmp_path / "set", "--ckpt", ckpt, "--json")
    shown = json.loads(capsys.readouterr().out)
    assert shown["at_chance"] is True and shown["clear"] is False
    assert shown["probabilities"] == pytest.approx([1 / 9] * 9)  # the fields there were, kept
    # Nothing is predicted: no file named as the odd one, only as the most likely.
    assert shown["predicted_index"] is None and shown["predicted_file"] is None
    assert shown["most_likely_file"] == shown["files"][shown["most_likely_index"]]


def test_the_table_stays_aligned_when_percentages_differ_in_width(capsys):
    files = ["a.png", "b.png", "c.png", "d.png"]
    probs = np.array([0.101080, 0.101083, 0.099704, 0.698133])  # 4 decimals tell them apart
    result = predict.verdict(files, probs, predict.is_clear(probs), predict.at_chance(probs))
    predict.print_verdict(result, predict.percent_texts(probs))
    table = capsys.readouterr().out.splitlines()[1:5]
    assert [line.split()[0] for line in table] == ["69.8133%", "10.1083%", "10.1080%", "9.9704%"]
    assert len({line.index(".png") for line in table}) == 1  # the names start in one column


def test_no_clear_odd_one_names_the_most_likely_and_the_next(capsys):
    files, probs = ["a.png", "b.png", "c.png", "d.png"], np.array([0.25, 0.32, 0.25, 0.18])
    clear, chance = predict.is_clear(probs), predict.at_chance(probs)
    assert not clear and not chance  # 0.32 < 1.5 · 0.25, but 0.32 > 1.5 · 0.18
    predict.print_verdict(
        predict.verdict(files, probs, clear, chance), predict.percent_texts(probs)
    )
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == (
        "No clear odd one out: the most likely, b.png (32.00%), is not 1.5 times as likely as the "
        "next (25.00%)."
    )
    assert len(out) == 6 and not any("cannot tell" in line for line in out)


def test_the_figure_is_named_after_the_table(trained, tmp_path, offline_backbone, capsys):
    write_set(tmp_path / "set", odd_position=1, size=3)
    run(trained, tmp_path / "set", "--figure", tmp_path / "a.png")
    out, err = capsys.readouterr()
    assert out.splitlines()[-1] == f"Figure written to {tmp_path / 'a.png'}"
    assert out.splitlines()[-2].startswith("Odd one out: ") and "Figure" not in err
    # With --json stdout holds the JSON alone: the note goes to stderr.
    run(trained, tmp_path / "set", "--figure", tmp_path / "b.png", "--json")
    out, err = capsys.readouterr()
    assert json.loads(out)["predicted_index"] == 1
    assert f"Figure written to {tmp_path / 'b.png'}" in err.splitlines()


@pytest.mark.parametrize("synthetic", [["--synthetic"], []], ids=["synthetic", "cifar"])
def test_from_another_folder_the_model_beside_the_script_is_named(
    trained, tmp_path, offline_backbone, monkeypatch, synthetic
):
    write_set(tmp_path / "set", odd_position=2, size=4)
    # predict.py in tmp_path/project, where `train.py --synthetic` left its model in saved_models/;
    # run from tmp_path/elsewhere with the default --checkpoint-dir, with or without --synthetic.
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    model = project / "saved_models" / "synthetic" / "SetAnomalyDetect.ckpt"
    os.makedirs(model.parent)
    shutil.copy(trained / "synthetic" / "SetAnomalyDetect.ckpt", model)
    monkeypatch.setattr(predict, "ROOT", str(project))
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with pytest.raises(SystemExit) as exit_info:
        predict.main([*synthetic, str(tmp_path / "set")])
    message = str(exit_info.value.code)
    missing = elsewhere / "saved_models" / ("synthetic" if synthetic else "")
    assert message.startswith(f"error: no trained model at {missing / 'SetAnomalyDetect.ckpt'}. ")
    flags = ("" if synthetic else "--synthetic ") + f"--checkpoint-dir {project / 'saved_models'}"
    assert f" There is one beside predict.py, {model}: add {flags} to use it." in message
    assert message.endswith("to use it." + PUBLISHED_HINT * (not synthetic))
    # The flags it names reach that model.
    result = predict.main([*synthetic, *flags.split(), str(tmp_path / "set")])
    assert result["predicted_index"] == 2


PUBLISHED_HINT = (
    " Or add --pretrained: the tutorial author's trained model, downloaded once (about 9 MB)."
)


def test_run_from_the_repository_a_model_is_named_once(trained, tmp_path, monkeypatch):
    # predict.py's own folder as the current one: the model of --synthetic beside it is the one
    # in the default --checkpoint-dir, named once, with one way to use it.
    write_set(tmp_path / "set", odd_position=2, size=3)
    model = tmp_path / "saved_models" / "synthetic" / "SetAnomalyDetect.ckpt"
    os.makedirs(model.parent)
    shutil.copy(trained / "synthetic" / "SetAnomalyDetect.ckpt", model)
    monkeypatch.setattr(predict, "ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        predict.main([str(tmp_path / "set")])
    message = str(exit_info.value.code)
    assert message.count(str(model)) == 1 and "beside predict.py" not in message
    assert "add --synthetic to use it. Or add --pretrained" in message


def test_bare_command_says_what_to_give(capsys):
    with pytest.raises(SystemExit) as exit_info:
        predict.main([])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert "give the pictures to look at" in err and "`python predict.py my_photos/`" in err
    assert "-h` lists every flag" in err


def resnet_weights(torch_home):
    """Random ResNet34 weights where torchvision keeps the ImageNet ones it downloads, as a user
    who placed them by hand has them; their state dict."""
    torch.manual_seed(1)
    state = features.resnet34_backbone().state_dict()
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)
    path = torch_home / "hub" / "checkpoints" / os.path.basename(features.WEIGHTS.url)
    os.makedirs(path.parent)
    torch.save(state, path)
    return state


def test_pretrained_uses_the_published_model_with_the_imagenet_resnet(
    tmp_path, monkeypatch, capsys
):
    # The published file put where the download would put it, registered as published; ResNet34
    # weights placed in torch's cache. No CIFAR-100, no training: the author's model answers.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    state = resnet_weights(tmp_path / "torch")
    torch.manual_seed(2)
    model = randomise(AnomalyPredictor(input_dim=512, max_iters=10, **SMALL_SET_MODEL)).eval()
    placed = save_like_the_tutorial(
        model, str(tmp_path / "m" / "pretrained" / "SetAnomalyTask.ckpt")
    )
    publish(monkeypatch, "anomaly", placed, url="http://127.0.0.1:9/")
    names = write_set(tmp_path / "set", odd_position=1, size=4)

    result = predict.main(
        [str(tmp_path / "set"), "--pretrained", "--checkpoint-dir", str(tmp_path / "m"), "--json"]
    )
    printed = json.loads(capsys.readouterr().out)
    # The same probabilities from torchvision's ResNet34 with those weights and the model itself.
    backbone = torchvision.models.resnet34()
    backbone.load_state_dict(state)
    backbone.fc = nn.Identity()
    pictures = [predict.load_image(tmp_path / "set" / n) for n in names]
    batch = torch.stack([image_transform(features.IMAGE_SIZE)(p) for p in pictures])
    with torch.no_grad():
        expected = model.anomaly_logits(backbone.eval()(batch)[None])[0].softmax(0).numpy()
    assert printed["probabilities"] == pytest.approx(expected.tolist(), abs=1e-6)
    assert result["most_likely_index"] == int(np.argmax(expected))
    assert sorted(os.listdir(tmp_path / "m")) == ["pretrained"]  # no training, no features
    assert os.listdir(tmp_path / "m" / "pretrained") == ["SetAnomalyTask.ckpt"]


def test_pretrained_refuses_another_model(capsys):
    for other in (["--synthetic"], ["--ckpt", "x.ckpt"]):
        with pytest.raises(SystemExit) as exit_info:
            predict.main(["a.png", "b.png", "--pretrained", *other])
        assert exit_info.value.code == 2
        assert "--pretrained uses the tutorial author's model" in capsys.readouterr().err


def test_pretrained_offline_names_each_missing_file_and_leaves_nothing(tmp_path):
    env = dict(os.environ, TORCH_HOME=str(tmp_path / "torch"))
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        env[var] = "http://127.0.0.1:9"  # every download fails at once, whatever the network
    write_set(tmp_path / "set", 0, size=3)
    models = tmp_path / "models"
    proc = run_script(
        "predict.py", tmp_path / "set", "--pretrained", "--checkpoint-dir", models, env=env
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    header, *items = proc.stderr.splitlines()
    assert header == "error: cannot get what predict.py --pretrained needs (no internet?):"
    assert len(items) == 2
    where = models / "pretrained" / "SetAnomalyTask.ckpt"
    assert items[0].startswith("  - the tutorial's SetAnomalyTask.ckpt (")
    assert f"expected at {where}. To place it by hand, download https://" in items[0]
    assert items[1].startswith("  - ResNet34 weights IMAGENET1K_V1 (")
    assert str(tmp_path / "torch") in items[1]
    assert not models.exists()  # nothing made for the files that never came


def test_a_phone_photo_is_read_upright_as_a_viewer_shows_it(
    trained, tmp_path, offline_backbone, capsys
):
    # A portrait photo as a phone stores it: the pixels as taken, 64 wide and 48 high, tagged with
    # EXIF orientation 6, "turn 90° clockwise to show". Beside it the same decoded pixels turned
    # by hand (numpy, not PIL) and saved losslessly: the picture every viewer shows.
    rows, cols = np.mgrid[0:48, 0:64]
    stored = np.stack([rows * 5, cols * 4, (rows + cols) % 256], axis=-1).astype(np.uint8)
    folder = tmp_path / "photos"
    write_set(folder, odd_position=None, size=3)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    Image.fromarray(stored).save(folder / "phone.jpg", exif=exif, quality=95)
    with Image.open(folder / "phone.jpg") as jpeg:
        decoded = np.asarray(jpeg.convert("RGB"))  # as stored: PIL turns nothing by itself
    upright = tmp_path / "upright"
    shutil.copytree(folder, upright)
    os.remove(upright / "phone.jpg")
    Image.fromarray(np.rot90(decoded, k=-1).copy()).save(upright / "phone.png")
    Image.fromarray(decoded).save(tmp_path / "sideways.png")

    read = np.asarray(predict.load_image(folder / "phone.jpg"))
    assert np.array_equal(read, np.asarray(predict.load_image(upright / "phone.png")))
    assert not np.array_equal(read, np.asarray(predict.load_image(tmp_path / "sideways.png")))
    tagged, turned = run(trained, folder), run(trained, upright)
    assert np.array_equal(tagged["probabilities"], turned["probabilities"])  # scores exactly alike


def test_chinese_file_names_draw_no_warning(trained, tmp_path, offline_backbone, capsys):
    folder = tmp_path / "照片"
    names = write_set(folder, odd_position=1, size=3)
    chinese = ["猫.png", "火箭.png", "狗.png"]
    for name, new in zip(names, chinese, strict=True):
        os.rename(folder / name, folder / new)
    figure = tmp_path / "奇怪.png"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's "Glyph … missing from font(s)" fails it
        result = run(trained, folder, "--figure", figure)
    assert os.path.isfile(figure) and [os.path.basename(f) for f in result["files"]] == sorted(
        chinese
    )
    out = capsys.readouterr().out
    assert "火箭.png" in out  # the terminal shows the names as they are
    if visualize.use_cjk_font() is None:  # no CJK font here: the figure writes codes, and says so
        assert "the figure writes them as codes (\\u732b)" in out


def test_pretrained_set_sizes_need_the_cached_test_features(tmp_path, monkeypatch):
    torch.manual_seed(2)
    model = AnomalyPredictor(input_dim=512, max_iters=10, **SMALL_SET_MODEL)
    placed = save_like_the_tutorial(
        model, str(tmp_path / "m" / "pretrained" / "SetAnomalyTask.ckpt")
    )
    publish(monkeypatch, "anomaly", placed, url="http://127.0.0.1:9/")
    with pytest.raises(SystemExit) as exit_info:
        predict.main(["--pretrained", "--set-sizes", "5", "--checkpoint-dir", str(tmp_path / "m")])
    assert str(exit_info.value.code) == (
        f"error: no valid test feature cache in {tmp_path / 'm'}; `python train.py --pretrained "
        f"--checkpoint-dir {tmp_path / 'm'}` makes it."
    )


def test_a_figure_name_too_long_for_the_disk_is_refused_before_any_work(tmp_path, capsys):
    write_set(tmp_path / "set", 0, size=2)
    figure = tmp_path / ("x" * 251 + ".png")  # 255 bytes: the file system's most, no room for .tmp
    with pytest.raises(SystemExit) as exit_info:
        predict.main([str(tmp_path / "set"), "--figure", str(figure)])
    assert str(exit_info.value.code).startswith(f"error: --figure {figure}: its name is too long: ")
    assert "choose a shorter one" in str(exit_info.value.code)
    assert capsys.readouterr().out == ""  # no model loaded, no picture read


def test_a_set_too_large_for_the_memory_here_is_refused_before_the_model_runs(
    trained, tmp_path, offline_backbone, monkeypatch
):
    write_set(tmp_path / "set", 0, size=12)
    monkeypatch.setattr(predict, "free_bytes", lambda device: 3 * 4 * 2 * 10**2)  # 10 fit
    with pytest.raises(SystemExit) as exit_info:
        run(trained, tmp_path / "set")
    assert str(exit_info.value.code) == (
        "error: a set of 12 pictures needs 0.0 GB for its attention, and 0.0 GB are free here: "
        "give at most 10 pictures."
    )


def test_a_figure_of_more_pictures_than_it_shows_legibly_is_refused(tmp_path, capsys):
    folder = tmp_path / "many"
    write_set(folder, 0, size=2)
    for i in range(predict.MOST_IN_A_FIGURE):
        shutil.copy(folder / "a.png", folder / f"copy{i}.png")
    with pytest.raises(SystemExit) as exit_info:
        predict.main([str(folder), "--figure", str(tmp_path / "odd.png")])
    assert exit_info.value.code == 2
    assert "--figure shows at most 100 pictures; 102 given" in capsys.readouterr().err
