"""512-d image features from an ImageNet-trained ResNet34, computed once and cached (the post's
获取 cifar100 数据集 and 使用 resnet 模型提取图片特征).

The post's flow: CIFAR-100 with the transform the backbone expects, the ResNet34 without its
classifier, extract_features over a data set, and load_or_extract, which keeps each split's features
in its cache file. The program around this file (harness/caches.py) hands load_or_extract how a
cache is checked and written safely, since a cache also holds the labels and a note of what made it.
"""

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.datasets import CIFAR100
from torchvision.models import ResNet34_Weights, resnet34
from tqdm.auto import tqdm

# ImageNet statistics: the backbone was trained on images normalised with them.
DATA_MEANS = (0.485, 0.456, 0.406)
DATA_STD = (0.229, 0.224, 0.225)
IMAGE_SIZE = 224  # the backbone's input: the post resizes CIFAR-100's 32×32 images to 224×224
CIFAR100_SIZES = {"train": 50000, "test": 10000}
CIFAR100_CLASSES = 100
WEIGHTS = ResNet34_Weights.IMAGENET1K_V1
FEATURE_DIM = 512
CACHE_FILES = {"train": "train_set_features.tar", "test": "test_set_features.tar"}  # the post's

# --------------------------------------------------------------------------------------------------
# 获取 cifar100 数据集: the images, and the transform the backbone expects
# --------------------------------------------------------------------------------------------------


def image_transform(image_size=IMAGE_SIZE):
    """The post's transform: resize to the backbone's input size, to a [0, 1] tensor, normalise."""
    return transforms.Compose(
        [
            transforms.Resize((image_size, image_size)),
            transforms.ToTensor(),
            transforms.Normalize(DATA_MEANS, DATA_STD),
        ]
    )


def cifar100(data_dir):
    """The post's train_set and test_set, {"train", "test"}: torchvision's CIFAR100 with the post's
    transform, downloaded into data_dir where missing."""
    return {
        split: CIFAR100(
            root=data_dir, train=split == "train", transform=image_transform(), download=True
        )
        for split in CIFAR100_SIZES
    }


# --------------------------------------------------------------------------------------------------
# 使用 resnet 模型提取图片特征: the backbone, the extraction and its cache
# --------------------------------------------------------------------------------------------------


def resnet34_backbone(state_dict=None):
    """ResNet34 without its classification layer: images [B, 3, H, W] -> features [B, 512], eval."""
    model = resnet34()
    if state_dict is not None:
        model.load_state_dict(state_dict)
    model.fc = nn.Identity()
    model.eval()
    model.requires_grad_(False)
    return model


def imagenet_resnet34():
    """The post's pretrained_model: ResNet34 with torchvision's IMAGENET1K_V1 weights (downloaded
    once into torch's cache), its classifier removed."""
    return resnet34_backbone(WEIGHTS.get_state_dict(progress=True, check_hash=True))


@torch.no_grad()
def extract_features(
    model, dataset, device, batch_size=128, num_workers=4, worker_init_fn=None, desc="features"
):
    """The post's extraction loop: every image of dataset through model, in batches of the post's
    128 with its 4 loader workers (worker_init_fn: run in each); the features [N, D], on the CPU.

    Only one batch of resized images exists at a time, never the whole resized data set.
    """
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        drop_last=False,
        num_workers=num_workers,
        worker_init_fn=worker_init_fn,
    )
    model = model.to(device)
    # No bar unless the output is a terminal (disable=None), and gone once done.
    batches = tqdm(loader, desc=desc, leave=False, disable=None)
    feats = [model(imgs.to(device)).cpu() for imgs, _ in batches]
    return torch.cat(feats, dim=0)


def load_or_extract(save_files, load, extract, save):
    """The post's use of its extract_features, for each split of save_files ({split: its cache
    file}): the split's (features, labels) from its file where load(split, save_file) finds them
    there and usable, otherwise extract(split) and save(split, save_file, features, labels).
    Returns {split: (features [N, 512], labels [N])}."""
    result = {}
    for split, save_file in save_files.items():
        cached = load(split, save_file)
        if cached is None:
            cached = extract(split)
            save(split, save_file, *cached)
        result[split] = cached
    return result
