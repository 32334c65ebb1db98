"""512-d image features from an ImageNet-trained ResNet34, computed once and cached (the post's
获取 cifar100 数据集 and 使用 resnet 模型提取图片特征).

The post's flow, once per split: load the cached features, or extract them and save the cache. The
caches hold the features, the labels and a note of what produced them, so a cache made by another
backbone, transform or data set, or a cut-off file, is noticed and rebuilt.
"""

import copy
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.fx.experimental.optimization import fuse
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from torchvision.datasets import CIFAR100
from torchvision.models import ResNet34_Weights, resnet34
from tqdm.auto import tqdm

from harness.files import download_timeout, free_mb, save_atomically
from harness.stops import ignore_stops

# ImageNet statistics: the backbone was trained on images normalised with them.
DATA_MEANS = (0.485, 0.456, 0.406)
DATA_STD = (0.229, 0.224, 0.225)
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_SIZES = {"train": 50000, "test": 10000}
CIFAR100_CLASSES = 100
WEIGHTS = ResNet34_Weights.IMAGENET1K_V1
CACHE_FILES = {"train": "train_set_features.tar", "test": "test_set_features.tar"}  # the post's
IMAGE_SIZE = 224  # the backbone's input: the post resizes CIFAR-100's 32×32 images to 224×224
FEATURE_DIM = 512


# --------------------------------------------------------------------------------------------------
# 获取 cifar100 数据集: the images, and the transform the backbone expects
# --------------------------------------------------------------------------------------------------


class MissingResources(RuntimeError):
    """CIFAR-100 or the ResNet34 weights are neither on disk nor downloadable; the message names
    each missing item (a list of lines) and says where to put it. needs: whose they are."""

    def __init__(self, items, needs="the feature extraction"):
        self.items = items
        super().__init__(
            f"cannot get what {needs} needs (no internet?):\n"
            + "\n".join(f"  - {item}" for item in items)
        )


def image_transform(image_size=IMAGE_SIZE):
    """The post's transform: resize to the backbone's input size, to a [0, 1] tensor, normalise."""
    return transforms.Compose(
        [
            transforms.Resize((image_size, image_size)),
            transforms.ToTensor(),
            transforms.Normalize(DATA_MEANS, DATA_STD),
        ]
    )


def open_cifar100(data_dir):
    """({"train", "test"}: torchvision's CIFAR100 with the post's transform, the ImageNet ResNet34),
    downloaded where missing. Raises MissingResources naming everything that could not be had."""
    missing, datasets, backbone = [], {}, None
    made_here = not os.path.exists(data_dir)
    try:
        with download_timeout():
            for split in CIFAR100_SIZES:
                datasets[split] = CIFAR100(
                    root=data_dir,
                    train=split == "train",
                    transform=image_transform(IMAGE_SIZE),
                    download=True,
                )
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


class ImageArray(Dataset):
    """uint8 images [N, H, W, 3] served as torchvision's CIFAR100 serves its .data: each through
    transform as a PIL image, with its target."""

    def __init__(self, images, targets, transform):
        self.data, self.targets, self.transform = images, targets, transform

    def __len__(self):
        return len(self.data)

    def __getitem__(self, idx):
        return self.transform(Image.fromarray(self.data[idx])), self.targets[idx]


# --------------------------------------------------------------------------------------------------
# 使用 resnet 模型提取图片特征: the backbone and the extraction
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
    """The post's backbone: ResNet34 with torchvision's IMAGENET1K_V1 weights (downloaded once into
    torch's cache), classifier removed. Raises MissingResources if the weights can't be had."""
    try:
        with download_timeout():
            state_dict = WEIGHTS.get_state_dict(progress=True, check_hash=True)
    except Exception as error:
        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(WEIGHTS.url))
        raise MissingResources(
            [
                f"ResNet34 weights {WEIGHTS.name} ({type(error).__name__}: {error}): expected at "
                f"{path}. To place them by hand, download {WEIGHTS.url} (83 MB) to that path "
                "(TORCH_HOME sets the folder)."
            ]
        ) from None
    return resnet34_backbone(state_dict)


@torch.no_grad()
def extract_features(model, dataset, device, batch_size=128, num_workers=4, desc="features"):
    """Runs every image of dataset through model in batches; returns the features [N, D] on the CPU.

    Only one batch of resized images exists at a time, never the whole resized data set. dataset may
    also be a DataLoader over one, in order (bench.py keeps its workers alive that way).
    """
    loader = dataset
    if not isinstance(loader, DataLoader):
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=False,
            drop_last=False,
            num_workers=num_workers,
            worker_init_fn=ignore_stops,  # Ctrl-C and SIGTERM stop the main process alone
        )
    model = model.to(device)
    # No bar unless the output is a terminal (disable=None), and gone once done.
    batches = tqdm(loader, desc=desc, leave=False, disable=None)
    feats = [model(imgs.to(device)).cpu() for imgs, _ in batches]
    return torch.cat(feats, dim=0)


def fast_backbone(model, device):
    """The fast path's copy of a backbone on device: BatchNorm folded into the convolutions, and
    channels-last, which oneDNN and cuDNN run faster; on CUDA, cuDNN picks its fastest kernels."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # every batch has the same shape
    return fuse(copy.deepcopy(model).eval()).to(device, memory_format=torch.channels_last)


def fast_batch_size(device):
    """Small batches keep a CPU's caches warm (faster there than 128); a GPU wants large ones."""
    return 16 if device.type == "cpu" else 256


@torch.inference_mode()
def extract_features_fast(
    model, images, device, image_size=IMAGE_SIZE, batch_size=None, desc="features"
):
    """The fast path's extract_features: images [N, H, W, 3] uint8 (a CIFAR100's .data) go to the
    device as they are, and are resized, normalised and run through model (made by fast_backbone)
    there in batches, with no PIL and no workers.

    The resize is bilinear like torchvision's Resize of a PIL image (antialiased when it shrinks),
    but in float instead of 8-bit pixels. Features agree with extract_features to a cosine
    similarity above 0.999 (tests/test_features.py, bench.py).
    """
    batch_size = batch_size or fast_batch_size(device)
    mean = torch.tensor(DATA_MEANS, device=device).view(1, 3, 1, 1)
    std = torch.tensor(DATA_STD, device=device).view(1, 3, 1, 1)
    feats = []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, leave=False, disable=None):
        x = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).to(device)
        x = x.permute(0, 3, 1, 2).float().div_(255)  # [B, 3, H, W] in [0, 1], as ToTensor gives
        # Only shrinking needs antialiasing, and it costs time.
        antialias = image_size < max(x.shape[-2:])
        x = F.interpolate(
            x, (image_size, image_size), mode="bilinear", align_corners=False, antialias=antialias
        )
        x = ((x - mean) / std).contiguous(memory_format=torch.channels_last)
        feats.append(model(x).float().cpu())
    return torch.cat(feats, dim=0)


# --------------------------------------------------------------------------------------------------
# The cache: load it, or extract and save
# --------------------------------------------------------------------------------------------------


def cache_meta(dataset_name, split, num_images, weights_name, image_size):
    """What produced a feature cache; a cache is trusted only if this matches exactly."""
    return {
        "dataset": f"{dataset_name} {split}",
        "num_images": num_images,
        "backbone": "resnet34 without fc",
        "weights": weights_name,
        "transform": f"Resize(({image_size}, {image_size})), ToTensor, "
        f"Normalize({DATA_MEANS}, {DATA_STD})",
        "feature_dim": FEATURE_DIM,
    }


def cifar100_meta(split):
    """What the feature cache of a CIFAR-100 split is made of."""
    return cache_meta("CIFAR-100", split, CIFAR100_SIZES[split], WEIGHTS.name, IMAGE_SIZE)


def cache_path(cache_dir, split, fast=False):
    """Where a split's feature cache is: the post's file name, or with --fast, whose features are
    computed differently, a file of its own, so the two never replace each other."""
    name = CACHE_FILES[split]
    return os.path.join(cache_dir, name.replace(".tar", "_fast.tar") if fast else name)


def extraction_meta(meta, fast=False):
    """meta as the cache of one path of extraction notes it: --fast's features are computed
    differently (extract_features_fast), so its caches say so."""
    if not fast:
        return meta
    return dict(meta, transform=meta["transform"] + " on float tensors (--fast)")


def save_cache(path, feats, labels, meta):
    cache = {"features": feats, "labels": labels, "meta": meta}
    save_atomically(path, lambda tmp: torch.save(cache, tmp))


def load_cache(path, meta, num_classes, then="rebuilding it"):
    """(features, labels) from the cache at path if it is complete, matches meta and its labels are
    num_classes classes of equal size; None otherwise, after printing one line that says why,
    ending with `then`."""
    if not os.path.isfile(path):
        return None
    try:
        cache = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a cut-off or corrupt file fails in many ways, all mean "rebuild"
        print(f"Feature cache {path} cannot be read ({type(error).__name__}); {then}.")
        return None
    if torch.is_tensor(cache):
        print(f"Feature cache {path} is a bare tensor (the post's format), no labels; {then}.")
        return None
    if not isinstance(cache, dict) or cache.get("meta") != meta:
        found = cache.get("meta") if isinstance(cache, dict) else type(cache).__name__
        print(f"Feature cache {path} was made differently from this run ({found}); {then}.")
        return None
    feats, labels = cache.get("features"), cache.get("labels")
    why = cache_fault(feats, labels, meta["num_images"], num_classes)
    if why:
        print(f"Feature cache {path} {why}; {then}.")
        return None
    return feats, labels.long()


def cache_fault(feats, labels, n, num_classes):
    """What is wrong with a cache's features and labels, or None: n float32 features of
    FEATURE_DIM finite numbers, n integer labels, each of the classes 0 .. num_classes-1 with
    n / num_classes images (as CIFAR-100's and the generated images' are, which the post's split
    needs). Checked against the classes, not only the images: a cache relabelled into other
    classes of equal size would train a model on another task."""
    if not (torch.is_tensor(feats) and torch.is_tensor(labels)):
        return f"does not hold {n} features of {FEATURE_DIM} dims with their labels"
    if feats.shape != (n, FEATURE_DIM) or labels.shape != (n,):
        return f"does not hold {n} features of {FEATURE_DIM} dims with their labels"
    if feats.dtype != torch.float32:
        return f"holds features of {feats.dtype}, not torch.float32"
    if not torch.isfinite(feats).all():
        return f"holds {int((~torch.isfinite(feats)).sum())} features that are NaN or infinite"
    if labels.is_floating_point() or labels.dtype == torch.bool:
        return f"holds labels that are not whole numbers ({labels.dtype})"
    # Labels past the last class are counted in one more bin, which must stay empty.
    per_class = torch.bincount(labels.clamp(0, num_classes), minlength=num_classes + 1)
    if labels.min() < 0 or per_class[-1] > 0 or (per_class[:-1] != n // num_classes).any():
        return (
            f"holds labels that are not its {num_classes} classes of {n // num_classes} images each"
        )
    return None


def check_free_space(cache_dir, num_images, split):
    """Raises ValueError, before any extraction, if cache_dir's disk cannot hold the cache of
    num_images features (with a tenth to spare)."""
    need = num_images * (FEATURE_DIM * 4 + 8) * 1.1 / 2**20
    os.makedirs(cache_dir, exist_ok=True)
    free = free_mb(cache_dir)
    if free < need:
        raise ValueError(
            f"the {split} feature cache needs {need:.0f} MB and {cache_dir} has {free:.0f} MB "
            "free: free some space, or use another --checkpoint-dir"
        )


def cached_features(
    cache_dir,
    metas,
    num_classes,
    open_sources,
    device,
    fast=False,
    num_workers=4,
    image_size=IMAGE_SIZE,
):
    """The post's extract_features: {split: (features [N, 512], labels [N])} for each of metas.

    Each split's cache in cache_dir is loaded if it is valid, its labels num_classes classes of
    equal size; otherwise the split is extracted and cached. open_sources() -> ({split: images},
    backbone) is called only then, once: that is when the images and weights are needed (and
    downloaded). --fast extracts with extract_features_fast.
    """
    result, sources = {}, None
    for split, meta in metas.items():
        path, meta = cache_path(cache_dir, split, fast), extraction_meta(meta, fast)
        cached = load_cache(path, meta, num_classes)
        if cached is None:
            check_free_space(cache_dir, meta["num_images"], split)
            sources = sources or open_sources()
            datasets, backbone = sources
            dataset, desc = datasets[split], f"{split} features"
            print(f"Extracting the {split} features of {len(dataset)} images on {device} to {path}")
            if fast:
                model = fast_backbone(backbone, device)
                feats = extract_features_fast(model, dataset.data, device, image_size, desc=desc)
            else:
                feats = extract_features(
                    backbone, dataset, device, num_workers=num_workers, desc=desc
                )
            cached = feats, torch.as_tensor(dataset.targets, dtype=torch.long)
            save_cache(path, *cached, meta)
        else:
            print(f"Loaded the {split} features from {path}")
        result[split] = cached
    # The other path's run left its features: say why numbers differ.
    others = [cache_path(cache_dir, split, not fast) for split in metas]
    others = [path for path in others if os.path.isfile(path)]
    if others:
        mine, theirs = ("--fast's", "the post's") if fast else ("the post's", "--fast's")
        where = " and ".join(others)
        print(
            f"These are {mine} features; {theirs}, in {where}, differ slightly, as may accuracies."
        )
    return result


def cifar100_features(data_dir, cache_dir, device, num_workers=4, fast=False):
    """CIFAR-100 train and test features from the ImageNet-trained ResNet34, cached in cache_dir.

    Valid caches are enough: CIFAR-100 and the weights are needed (and downloaded) only to build
    one. Raises MissingResources naming everything that could not be had.
    """
    metas = {split: cifar100_meta(split) for split in CIFAR100_SIZES}
    open_sources = lambda: open_cifar100(data_dir)
    return cached_features(
        cache_dir, metas, CIFAR100_CLASSES, open_sources, device, fast, num_workers
    )


def cached_test_features(cache_dir, meta, num_classes, then):
    """(features, labels) of the test split from a cache that train.py left in cache_dir (the post's
    file first, then --fast's), or None; a cache that is there but unusable is reported, ending with
    `then`. meta: what it must be made of, cifar100_meta("test") or synthetic_meta("test");
    num_classes: its classes, CIFAR100_CLASSES or SYNTHETIC["num_classes"]."""
    for fast in (False, True):
        path = cache_path(cache_dir, "test", fast)
        cache = load_cache(path, extraction_meta(meta, fast), num_classes, then)
        if cache is not None:
            return cache
    return None
