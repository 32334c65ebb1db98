"""512-d image features from an ImageNet-trained ResNet34, computed once and cached
(the post's 获取 cifar100 数据集 and 使用 resnet 模型提取图片特征).

The caches hold the features, the labels and a note of what produced them, so a cache made by
another backbone, transform or data set, or a cut-off file, is noticed and rebuilt.
"""

import contextlib
import copy
import os
import socket

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.data as data
from PIL import Image
from torch.fx.experimental.optimization import fuse
from torchvision import transforms
from torchvision.datasets import CIFAR100
from torchvision.models import ResNet34_Weights, resnet34
from tqdm.auto import tqdm

# ImageNet statistics: the backbone was trained on images normalised with them.
DATA_MEANS = (0.485, 0.456, 0.406)
DATA_STD = (0.229, 0.224, 0.225)
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_SIZES = {"train": 50000, "test": 10000}
WEIGHTS = ResNet34_Weights.IMAGENET1K_V1
CACHE_FILES = {"train": "train_set_features.tar", "test": "test_set_features.tar"}  # the post's names
FEATURE_DIM = 512
DOWNLOAD_TIMEOUT_S = 20  # seconds without an answer before a download counts as failed

# The offline stand-in for CIFAR-100 used by `train.py --synthetic`: small, but every stage runs.
SYNTHETIC = dict(num_classes=10, per_class={"train": 110, "test": 20}, image_size=64, seed=42)


class MissingResources(RuntimeError):
    """CIFAR-100 or the ResNet34 weights are neither on disk nor downloadable; the message names each
    missing item (a list of lines) and says where to put it."""

    def __init__(self, items):
        self.items = items
        super().__init__("cannot get what the feature extraction needs (no internet?):\n"
                         + "\n".join(f"  - {item}" for item in items))


@contextlib.contextmanager
def download_timeout():
    """Without a timeout a network that silently drops packets would hang a download for minutes."""
    default = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        yield
    finally:
        socket.setdefaulttimeout(default)


def imagenet_resnet34():
    """The post's backbone: ResNet34 with torchvision's IMAGENET1K_V1 weights (downloaded once into
    torch's cache), classifier removed. Raises MissingResources if the weights can't be had."""
    try:
        with download_timeout():
            state_dict = WEIGHTS.get_state_dict(progress=True, check_hash=True)
    except Exception as error:
        weights_path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(WEIGHTS.url))
        raise MissingResources([f"ResNet34 weights {WEIGHTS.name} ({type(error).__name__}: {error}): expected at "
                                f"{weights_path}. To place them by hand, download {WEIGHTS.url} (83 MB) to that "
                                f"path (TORCH_HOME sets the folder)."]) from None
    return resnet34_backbone(state_dict)


def image_transform(image_size=224):
    """The post's transform: resize to the backbone's input size, to a [0, 1] tensor, ImageNet-normalise."""
    return transforms.Compose([
        transforms.Resize((image_size, image_size)),
        transforms.ToTensor(),
        transforms.Normalize(DATA_MEANS, DATA_STD),
    ])


def resnet34_backbone(state_dict=None):
    """ResNet34 without its classification layer: images [B, 3, H, W] -> features [B, 512], eval mode."""
    model = resnet34()
    if state_dict is not None:
        model.load_state_dict(state_dict)
    model.fc = nn.Identity()
    model.eval()
    model.requires_grad_(False)
    return model


@torch.no_grad()
def extract_features(model, dataset, device, batch_size=128, num_workers=4, desc="features"):
    """Runs every image of dataset through model in batches; returns the features [N, D] on the CPU.

    Only one batch of resized images exists at a time, never the whole resized data set.
    """
    loader = data.DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=False,
                             num_workers=num_workers)
    model = model.to(device)
    feats = [model(imgs.to(device)).cpu() for imgs, _ in tqdm(loader, desc=desc)]
    return torch.cat(feats, dim=0)


@torch.inference_mode()
def extract_features_fast(model, images, device, image_size=224, batch_size=None, desc="features"):
    """The fast path of extract_features: images [N, H, W, 3] uint8 (a CIFAR100's .data) go to the device as
    they are, and are resized, normalised and run through model there in batches, with no PIL and no workers.

    The resize is bilinear like torchvision's Resize of a PIL image (antialiased when it shrinks), but in
    float instead of 8-bit pixels. Features agree with extract_features to a cosine similarity above 0.999
    (tests/test_fast.py, bench.py).
    """
    # Small batches keep a CPU's caches warm (faster here than 128); a GPU wants large ones.
    batch_size = batch_size or (256 if device.type == "cuda" else 16)
    # BatchNorm folded into the convolutions, and channels-last layout, which oneDNN and cuDNN run faster.
    model = fuse(copy.deepcopy(model).eval()).to(device, memory_format=torch.channels_last)
    mean = torch.tensor(DATA_MEANS, device=device).view(1, 3, 1, 1)
    std = torch.tensor(DATA_STD, device=device).view(1, 3, 1, 1)
    feats = []
    for start in tqdm(range(0, len(images), batch_size), desc=desc):
        x = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])).to(device)
        x = x.permute(0, 3, 1, 2).float().div_(255)  # [B, 3, H, W] in [0, 1], as ToTensor gives
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False,
                          antialias=image_size < max(x.shape[-2:]))  # only shrinking needs it; it costs time
        x = ((x - mean) / std).contiguous(memory_format=torch.channels_last)
        feats.append(model(x).float().cpu())
    return torch.cat(feats, dim=0)


def cache_meta(dataset_name, split, num_images, weights_name, image_size, fast=False):
    """What produced a feature cache; a cache is trusted only if this matches exactly."""
    return {
        "dataset": f"{dataset_name} {split}",
        "num_images": num_images,
        "backbone": "resnet34 without fc",
        "weights": weights_name,
        "transform": f"Resize(({image_size}, {image_size})), ToTensor, Normalize({DATA_MEANS}, {DATA_STD})"
                     + (" on float tensors (--fast)" if fast else ""),
        "feature_dim": FEATURE_DIM,
    }


def cifar100_meta(split, fast=False):
    """What the feature cache of a CIFAR-100 split is made of (by the post's path, or by --fast's)."""
    return cache_meta("CIFAR-100", split, CIFAR100_SIZES[split], WEIGHTS.name, 224, fast)


def save_atomically(path, write):
    """Calls write(tmp_path), then renames tmp_path to path: an interrupted run leaves no half-written path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp_path = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp_path)
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def load_cache(path, meta, then="rebuilding it"):
    """(features, labels) from a cache at path if it is complete and matches meta (or one of a list of
    metas); None otherwise, after printing one line that says why, ending with `then`."""
    if not os.path.isfile(path):
        return None
    try:
        cache = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a cut-off or corrupt file fails in many ways, all meaning "rebuild"
        print(f"Feature cache {path} cannot be read ({type(error).__name__}); {then}.")
        return None
    if torch.is_tensor(cache):
        print(f"Feature cache {path} is a bare tensor (the post's format) without labels or origin; {then}.")
        return None
    metas = meta if isinstance(meta, list) else [meta]
    if not isinstance(cache, dict) or cache.get("meta") not in metas:
        print(f"Feature cache {path} was made differently from this run "
              f"({cache.get('meta') if isinstance(cache, dict) else type(cache).__name__}); {then}.")
        return None
    feats, labels = cache.get("features"), cache.get("labels")
    n = cache["meta"]["num_images"]
    if not (torch.is_tensor(feats) and feats.shape == (n, FEATURE_DIM) and feats.is_floating_point()
            and torch.is_tensor(labels) and labels.shape == (n,)):
        print(f"Feature cache {path} does not hold {n} features of {FEATURE_DIM} dims with their labels; {then}.")
        return None
    return feats, labels.long()


def cache_path(cache_dir, split, fast=False):
    """Where a split's features are cached: the post's file name, or with --fast a file of its own, so
    that the two paths never replace each other's caches."""
    name = CACHE_FILES[split]
    return os.path.join(cache_dir, name.replace(".tar", "_fast.tar") if fast else name)


def cached_test_features(cache_dir, synthetic=False):
    """(features, labels) of the test split from a cache that train.py left in cache_dir (the post's path
    first, then --fast's), or None."""
    meta = synthetic_meta if synthetic else cifar100_meta
    for fast in (False, True):
        cache = load_cache(cache_path(cache_dir, "test", fast), meta("test", fast), then="`python train.py` rebuilds it")
        if cache is not None:
            return cache
    return None


def save_cache(path, feats, labels, meta):
    save_atomically(path, lambda tmp: torch.save({"features": feats, "labels": labels, "meta": meta}, tmp))


def cached_features(cache_dir, metas, open_sources, device, num_workers, fast=False, image_size=224):
    """{split: (features [N, 512], labels [N])} for each split in metas, from the caches in cache_dir
    where they are valid, otherwise extracted with open_sources(splits) -> (datasets, backbone) and cached
    (by extract_features, or with fast by extract_features_fast at image_size)."""
    result = {split: load_cache(cache_path(cache_dir, split, fast), meta) for split, meta in metas.items()}
    todo = [split for split, cached in result.items() if cached is None]
    if todo:
        datasets, backbone = open_sources(todo)
        for split in todo:
            if fast:
                feats = extract_features_fast(backbone, datasets[split].data, device, image_size,
                                              desc=f"{split} features")
            else:
                feats = extract_features(backbone, datasets[split], device, num_workers=num_workers,
                                         desc=f"{split} features")
            labels = torch.as_tensor(datasets[split].targets, dtype=torch.long)
            save_cache(cache_path(cache_dir, split, fast), feats, labels, metas[split])
            result[split] = (feats, labels)
    return result


def cifar100_features(data_dir, cache_dir, device, num_workers=4, fast=False):
    """CIFAR-100 train and test features from the ImageNet-trained ResNet34, cached in cache_dir.

    Valid caches are enough: CIFAR-100 and the weights are needed (and downloaded) only to build a cache.
    Raises MissingResources naming everything that could not be had.
    """
    metas = {split: cifar100_meta(split, fast) for split in CIFAR100_SIZES}

    def open_sources(splits):
        missing, datasets, backbone = [], {}, None
        try:
            with download_timeout():
                for split in splits:
                    datasets[split] = CIFAR100(root=data_dir, train=split == "train",
                                               transform=image_transform(224), download=True)
        except Exception as error:
            missing.append(f"CIFAR-100 ({type(error).__name__}: {error}): expected at "
                           f"{os.path.join(os.path.abspath(data_dir), 'cifar-100-python')}/. To place it by hand, "
                           f"download {CIFAR100_URL} (about 170 MB) into {os.path.abspath(data_dir)}/; "
                           f"the next run unpacks it.")
        try:
            backbone = imagenet_resnet34()
        except MissingResources as error:
            missing += error.items
        if missing:
            raise MissingResources(missing)
        return datasets, backbone

    return cached_features(cache_dir, metas, open_sources, device, num_workers, fast)


class ImageArray(data.Dataset):
    """uint8 images [N, H, W, 3] served as torchvision's CIFAR100 serves its .data: each through transform
    as a PIL image, with its target."""

    def __init__(self, images, targets, transform):
        self.data, self.targets, self.transform = images, targets, transform

    def __len__(self):
        return len(self.data)

    def __getitem__(self, idx):
        return self.transform(Image.fromarray(self.data[idx])), self.targets[idx]


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
        super().__init__(np.clip(patterns[targets] + noise, 0, 255).astype(np.uint8), targets.tolist(), transform)


def synthetic_backbone():
    """The --synthetic stand-in for imagenet_resnet34: ResNet34 with random weights (seed SYNTHETIC["seed"])."""
    with torch.random.fork_rng():
        torch.manual_seed(SYNTHETIC["seed"])
        return resnet34_backbone()


def synthetic_meta(split, fast=False):
    """What the --synthetic feature cache of a split is made of."""
    cfg = SYNTHETIC
    return cache_meta("generated images", split, cfg["num_classes"] * cfg["per_class"][split],
                      f"random init (seed {cfg['seed']})", cfg["image_size"], fast)


def synthetic_features(cache_dir, device, num_workers=0, fast=False):
    """Features of GeneratedImages through a randomly initialised ResNet34: the whole pipeline, offline."""
    cfg = SYNTHETIC
    metas = {split: synthetic_meta(split, fast) for split in cfg["per_class"]}

    def open_sources(splits):
        transform = image_transform(cfg["image_size"])
        datasets = {split: GeneratedImages(cfg["num_classes"], cfg["per_class"][split], transform, cfg["seed"], split)
                    for split in splits}
        return datasets, synthetic_backbone()

    return cached_features(cache_dir, metas, open_sources, device, num_workers, fast, cfg["image_size"])

