"""What the features are made from: CIFAR-100 and the ResNet34's ImageNet weights (features.py),
downloaded where missing, within a timeout; where either cannot be had, one error that names each
missing item and where to put it by hand. And ImageArray, any uint8 images served as CIFAR-100's.
"""

import os

import torch
from PIL import Image
from torch.utils.data import Dataset

import features
from harness.files import download_timeout

CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
# What runs without CIFAR-100 and the ResNet34 weights, for a run that could not download them.
OFFLINE = (
    "Offline? `python train.py --synthetic` runs every stage on generated images, in seconds; "
    "`python train.py --pretrained` tests the tutorial author's model instead of training one "
    "(with the same features, so these files too)."
)


class MissingResources(RuntimeError):
    """What a command needs is neither on disk nor downloadable; the message names each missing
    item (a list of lines) and says where to put it. needs: whose they are."""

    def __init__(self, items, needs="the feature extraction"):
        self.items = items
        super().__init__(
            f"cannot get what {needs} needs (no internet?):\n"
            + "\n".join(f"  - {item}" for item in items)
        )


def open_cifar100(data_dir):
    """({"train", "test"}: features.cifar100's data sets, the ImageNet ResNet34), downloaded where
    missing. Raises MissingResources naming everything that could not be had."""
    missing, datasets, backbone = [], {}, None
    made_here = not os.path.exists(data_dir)
    try:
        with download_timeout():
            datasets = features.cifar100(data_dir)
    except Exception as error:
        folder = os.path.abspath(data_dir)
        if made_here and os.path.isdir(folder) and not os.listdir(folder):
            os.rmdir(folder)  # torchvision made it for a download that never came
        missing.append(
            f"CIFAR-100 ({type(error).__name__}: {error}): expected at "
            f"{os.path.join(folder, 'cifar-100-python')}/. To place it by hand, download "
            f"{CIFAR100_URL} (about 170 MB) into {folder}/; the next run unpacks it."
        )
    try:
        backbone = imagenet_resnet34()
    except MissingResources as error:
        missing += error.items
    if missing:
        raise MissingResources(missing)
    return datasets, backbone


def imagenet_resnet34():
    """features.imagenet_resnet34, its weights downloaded within a timeout. Raises
    MissingResources if they cannot be had."""
    weights = features.WEIGHTS
    try:
        with download_timeout():
            return features.imagenet_resnet34()
    except Exception as error:
        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
        raise MissingResources(
            [
                f"ResNet34 weights {weights.name} ({type(error).__name__}: {error}): expected at "
                f"{path}. To place them by hand, download {weights.url} (83 MB) to that path "
                "(TORCH_HOME sets the folder)."
            ]
        ) from None


class ImageArray(Dataset):
    """uint8 images [N, H, W, 3] served as torchvision's CIFAR100 serves its .data: each through
    transform as a PIL image, with its target."""

    def __init__(self, images, targets, transform):
        self.data, self.targets, self.transform = images, targets, transform

    def __len__(self):
        return len(self.data)

    def __getitem__(self, idx):
        return self.transform(Image.fromarray(self.data[idx])), self.targets[idx]
