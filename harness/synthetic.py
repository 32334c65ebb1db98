"""The offline stand-in for CIFAR-100 and the ImageNet ResNet34, used by `train.py --synthetic`.

Generated 32×32 images in 10 classes and a randomly initialised ResNet34 run every stage of the
post's pipeline (transform, feature extraction and cache, sets, training, evaluation) with no
download, in seconds. The numbers it gives only show that the pipeline works; they are not the
post's experiment.
"""

import numpy as np
import torch

from features import image_transform, resnet34_backbone
from harness.caches import cache_meta, cached_features
from harness.sources import ImageArray

SYNTHETIC = dict(num_classes=10, per_class={"train": 110, "test": 20}, image_size=64, seed=42)


class GeneratedImages(ImageArray):
    """Offline stand-in for torchvision's CIFAR100: 32×32 RGB uint8 images in classes of equal size,
    with the same interface (data [N, 32, 32, 3], targets, transform applied to a PIL image).

    Each class is a random blocky colour pattern; its images are that pattern plus noise.
    """

    def __init__(self, num_classes, per_class, transform, seed, split):
        patterns = np.random.RandomState(seed).randint(0, 256, size=(num_classes, 4, 4, 3))
        patterns = patterns.repeat(8, axis=1).repeat(8, axis=2)  # [C, 32, 32, 3]
        rng = np.random.RandomState(seed + (1 if split == "train" else 2))
        targets = rng.permutation(np.repeat(np.arange(num_classes), per_class))
        noise = rng.normal(0, 48, size=(len(targets), 32, 32, 3))
        images = np.clip(patterns[targets] + noise, 0, 255).astype(np.uint8)
        super().__init__(images, targets.tolist(), transform)


def synthetic_backbone():
    """The stand-in for features.imagenet_resnet34: ResNet34 with random weights (a fixed seed)."""
    with torch.random.fork_rng():
        torch.manual_seed(SYNTHETIC["seed"])
        return resnet34_backbone()


def synthetic_meta(split):
    """What the --synthetic feature cache of a split is made of."""
    cfg = SYNTHETIC
    num_images = cfg["num_classes"] * cfg["per_class"][split]
    weights = f"random init (seed {cfg['seed']})"
    return cache_meta("generated images", split, num_images, weights, cfg["image_size"])


def open_generated():
    """({"train", "test"}: GeneratedImages with the post's transform, the untrained backbone)."""
    cfg, transform = SYNTHETIC, image_transform(SYNTHETIC["image_size"])
    datasets = {
        split: GeneratedImages(cfg["num_classes"], per_class, transform, cfg["seed"], split)
        for split, per_class in cfg["per_class"].items()
    }
    return datasets, synthetic_backbone()


def synthetic_features(cache_dir, device, num_workers=0, fast_path=False):
    """Features of GeneratedImages through the untrained ResNet34, cached in cache_dir, as
    caches.cifar100_features makes those of CIFAR-100."""
    metas = {split: synthetic_meta(split) for split in SYNTHETIC["per_class"]}
    image_size = SYNTHETIC["image_size"]
    classes = SYNTHETIC["num_classes"]
    return cached_features(
        cache_dir, metas, classes, open_generated, device, fast_path, num_workers, image_size
    )
