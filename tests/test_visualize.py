"""visualize.py: every figure made from generated data, with its expected pixel size; the skip
notes."""

import numpy as np
import pytest
import torch
from PIL import Image

import visualize
from model import ReversePredictor


def png_size(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_positional_encoding_figures(tmp_path):
    table, curves = visualize.plot_positional_encoding(
        tmp_path / "pe.png", tmp_path / "pe_dims.png"
    )
    assert png_size(table) == (800, 400) and png_size(curves) == (800, 600)


def test_lr_schedule_figure(tmp_path):
    assert png_size(visualize.plot_lr_schedule(tmp_path / "lr.png")) == (600, 400)


@pytest.mark.parametrize("with_probs", [False, True])
def test_image_rows_figure(tmp_path, with_probs):
    rng = np.random.default_rng(0)
    images = rng.random((4, 10, 32, 32, 3))
    probs = rng.dirichlet(np.ones(10), size=4) if with_probs else None
    path = visualize.plot_image_rows(tmp_path / "rows.png", images, "sets", probs=probs)
    assert png_size(path) == (1200, 580)  # 1.2 in per image, 1.3 in per row + 0.6 in for the title


def test_set_prediction_figure(tmp_path):
    rng = np.random.default_rng(0)
    # 4 layers of [Head, Query, Key]
    maps = [rng.dirichlet(np.ones(10), size=(4, 10)) for _ in range(4)]
    path = visualize.plot_set_prediction(
        tmp_path / "set.png", rng.random((10, 32, 32, 3)), rng.dirichlet(np.ones(10)), maps
    )
    assert png_size(path) == (1200, 1240)  # 10 images wide; 2 in for them + 2.6 in per layer


def test_reverse_attention_figure(tmp_path):
    rng = np.random.default_rng(0)
    path = visualize.plot_reverse_attention(
        tmp_path / "rev.png", rng.integers(0, 10, 16), [rng.dirichlet(np.ones(16), size=(1, 16))]
    )
    assert png_size(path) == (500, 560)


def test_denormalise_inverts_the_transform():
    from PIL import Image as PILImage

    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    normalised = visualize.image_transform(32)(PILImage.fromarray(pixels))
    np.testing.assert_allclose(visualize.denormalise(normalised[None])[0], pixels / 255, atol=1e-5)


def test_main_makes_what_it_can_and_says_what_it_skips(tmp_path, capsys):
    checkpoint_dir = tmp_path / "models"
    hparams = dict(
        input_dim=10,
        model_dim=16,
        num_classes=10,
        num_heads=2,
        num_layers=2,
        lr=5e-4,
        warmup=5,
        max_iters=10,
    )
    model = ReversePredictor(**hparams)
    checkpoint_dir.mkdir()
    torch.save(
        {
            "state_dict": model.state_dict(),
            "hyper_parameters": hparams,
            "pytorch-lightning_version": "2.0.0",
        },
        checkpoint_dir / "ReverseTask.ckpt",
    )
    made = visualize.main(
        ["--checkpoint-dir", str(checkpoint_dir), "--data-dir", str(tmp_path / "no_data")]
    )
    names = sorted(p.rsplit("/", 1)[-1] for p in map(str, made))
    assert names == [
        "lr_schedule.png",
        "positional_encoding.png",
        "positional_encoding_dims.png",
        "reverse_attention.png",
    ]
    # 2 heads, 2 layers.
    assert png_size(checkpoint_dir / "figures" / "reverse_attention.png") == (1000, 1060)
    out = capsys.readouterr().out
    assert "skipped set-task figures: no CIFAR-100" in out


def test_set_task_figures_from_generated_cifar(tmp_path, monkeypatch, capsys):
    # CIFAR-100 replaced by 100 generated images in 10 classes, with a feature cache and a model to
    # match.
    import features
    from model import AnomalyPredictor
    from synthetic import GeneratedImages

    monkeypatch.setattr(
        visualize,
        "CIFAR100",
        lambda root, train, download, transform: GeneratedImages(
            num_classes=10, per_class=10, transform=transform, seed=0, split="test"
        ),
    )
    monkeypatch.setitem(features.CIFAR100_SIZES, "test", 100)
    images = GeneratedImages(num_classes=10, per_class=10, transform=None, seed=0, split="test")
    features.save_cache(
        str(tmp_path / "test_set_features.tar"),
        torch.randn(100, 512),
        torch.tensor(images.targets),
        features.cifar100_meta("test"),
    )
    hparams = dict(
        input_dim=512,
        model_dim=16,
        num_classes=1,
        num_heads=2,
        num_layers=3,
        lr=5e-4,
        warmup=5,
        max_iters=10,
    )
    torch.save(
        {
            "state_dict": AnomalyPredictor(**hparams).state_dict(),
            "hyper_parameters": hparams,
            "pytorch-lightning_version": "2.0.0",
        },
        tmp_path / "SetAnomalyDetect.ckpt",
    )
    made = visualize.anomaly_figures(
        str(tmp_path), str(tmp_path / "data"), str(tmp_path / "figures"), num_mistakes=3
    )
    sizes = {str(p).rsplit("/", 1)[-1]: png_size(p) for p in made}
    assert sizes == {
        "anomaly_example_sets.png": (1200, 580),  # 4 sets of 10
        "anomaly_prediction.png": (1200, 980),  # 10 images over 3 layers
        "anomaly_mistakes.png": (1200, 450),
    }  # 3 sets of 10
    assert "skipped" not in capsys.readouterr().out
