"""features.py: the transform, the backbone, the extraction in batches, and load_or_extract's
order of work (the caches it is handed are harness/caches.py's, tested in test_caches.py)."""

import inspect

import torch
import torch.nn as nn
from PIL import Image

from features import (
    DATA_MEANS,
    DATA_STD,
    extract_features,
    image_transform,
    load_or_extract,
    resnet34_backbone,
)
from helpers import ImagesAndLabels


def test_transform_resizes_and_normalises():
    colour = (200, 30, 90)
    image = Image.new("RGB", (32, 32), colour)
    out = image_transform(224)(image)
    assert out.shape == (3, 224, 224)
    for c in range(3):  # a flat image stays flat through the resize
        expected = (colour[c] / 255 - DATA_MEANS[c]) / DATA_STD[c]
        torch.testing.assert_close(out[c], torch.full((224, 224), expected), atol=1e-5, rtol=0)


def test_backbone_gives_512_features_without_classifier():
    torch.manual_seed(0)
    backbone = resnet34_backbone()
    assert isinstance(backbone.fc, nn.Identity) and not backbone.training
    assert not any(p.requires_grad for p in backbone.parameters())
    with torch.no_grad():
        assert backbone(torch.randn(2, 3, 64, 64)).shape == (2, 512)


def test_extraction_in_batches_equals_one_image_at_a_time():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    images = torch.randn(11, 3, 8, 8)
    feats = extract_features(
        model,
        ImagesAndLabels(images, list(range(11))),
        torch.device("cpu"),
        batch_size=4,
        num_workers=0,
    )
    with torch.no_grad():
        expected = torch.cat([model(img[None]) for img in images])
    torch.testing.assert_close(feats, expected)


def test_load_or_extract_extracts_and_saves_only_what_it_cannot_load():
    cached = {"test": (torch.ones(2, 512), torch.tensor([0, 1]))}  # a usable cache of test alone
    work = []

    def load(split, path):
        work.append(("load", split, path))
        return cached.get(split)

    def extract(split):
        work.append(("extract", split))
        return torch.zeros(4, 512), torch.tensor([0, 1, 0, 1])

    def save(split, path, feats, labels):
        work.append(("save", split, path, feats.shape, labels.tolist()))

    files = {"train": "a/train_set_features.tar", "test": "a/test_set_features.tar"}
    result = load_or_extract(files, load, extract, save)
    assert work == [
        ("load", "train", files["train"]),
        ("extract", "train"),
        ("save", "train", files["train"], (4, 512), [0, 1, 0, 1]),
        ("load", "test", files["test"]),
    ]
    assert result["train"][0].shape == (4, 512) and result["test"] is cached["test"]


def test_extraction_batches_and_workers_are_the_posts_unless_told():
    defaults = inspect.signature(extract_features).parameters
    assert (defaults["batch_size"].default, defaults["num_workers"].default) == (128, 4)
