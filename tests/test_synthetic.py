"""synthetic.py, the offline stand-in for CIFAR-100 and the ResNet34: generated classes of equal
size, an untrained backbone that is the same on every call, and feature caches described as made."""

import numpy as np
import torch

from features import image_transform, resnet34_backbone
from harness.synthetic import (
    SYNTHETIC,
    GeneratedImages,
    open_generated,
    synthetic_backbone,
    synthetic_meta,
)


def test_generated_images_have_balanced_classes():
    images = GeneratedImages(
        num_classes=4, per_class=7, transform=image_transform(32), seed=0, split="train"
    )
    assert images.data.shape == (28, 32, 32, 3) and images.data.dtype == np.uint8
    assert np.bincount(images.targets).tolist() == [7] * 4
    img, label = images[0]
    assert img.shape == (3, 32, 32) and label == images.targets[0]


def test_the_backbone_is_the_same_on_every_call_and_leaves_torchs_random_state_alone():
    made = []
    for seed in (123, 7):  # whatever the global state is before the call
        torch.manual_seed(seed)
        state = torch.random.get_rng_state()
        made.append(synthetic_backbone().state_dict())
        assert torch.equal(torch.random.get_rng_state(), state)
    a, b = made
    assert list(a) == list(b) and all(torch.equal(a[key], b[key]) for key in a)
    # Seeded, not constant: a backbone made from another seed differs.
    torch.manual_seed(SYNTHETIC["seed"] + 1)
    other = resnet34_backbone().state_dict()
    assert not torch.equal(other["conv1.weight"], a["conv1.weight"])


def test_the_cache_description_counts_the_images_generated():
    datasets, _ = open_generated()
    for split in ("train", "test"):
        expected = SYNTHETIC["num_classes"] * SYNTHETIC["per_class"][split]
        assert synthetic_meta(split)["num_images"] == expected == len(datasets[split])
