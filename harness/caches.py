"""The feature caches that features.load_or_extract keeps: where each is, what it must hold, how it
is checked as it is read, written whole, and what a run says of it. A cache holds the features, the
labels and a note of what produced them, so a cache made by another backbone, transform or data
set, or a cut-off file, is noticed and rebuilt.
"""

import os

import torch

import features
from features import CACHE_FILES, DATA_MEANS, DATA_STD, FEATURE_DIM
from harness import fast, sources
from harness.files import free_mb, save_atomically
from harness.stops import ignore_stops


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
    size = features.CIFAR100_SIZES[split]
    return cache_meta("CIFAR-100", split, size, features.WEIGHTS.name, features.IMAGE_SIZE)


def cache_path(cache_dir, split, fast=False):
    """Where a split's feature cache is: the post's file name, or with --fast, whose features are
    computed differently, a file of its own, so the two never replace each other."""
    name = CACHE_FILES[split]
    return os.path.join(cache_dir, name.replace(".tar", "_fast.tar") if fast else name)


def extraction_meta(meta, fast=False):
    """meta as the cache of one path of extraction notes it: --fast's features are computed
    differently (fast.extract_features_fast), so its caches say so."""
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
    num_images features: 4 bytes a number and 8 a label, with a tenth to spare."""
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
    fast_path=False,
    num_workers=4,
    image_size=features.IMAGE_SIZE,
):
    """{split: (features [N, 512], labels [N])} for each of metas, by features.load_or_extract
    with this module's checked caches in cache_dir (labels: num_classes classes of equal size).

    open_sources() -> ({split: images}, backbone) is called only when a split must be extracted,
    and once: that is when the images and weights are needed (and downloaded). fast_path: extract
    with fast.extract_features_fast, into caches of its own.
    """
    opened = {}  # the images and the backbone, once the first split to extract opens them
    noted = {split: extraction_meta(meta, fast_path) for split, meta in metas.items()}
    paths = {split: cache_path(cache_dir, split, fast_path) for split in metas}

    def load(split, path):
        cached = load_cache(path, noted[split], num_classes)
        if cached is not None:
            print(f"Loaded the {split} features from {path}")
        return cached

    def extract(split):
        check_free_space(cache_dir, metas[split]["num_images"], split)
        if not opened:
            opened["datasets"], opened["backbone"] = open_sources()
        dataset, backbone = opened["datasets"][split], opened["backbone"]
        path, desc = paths[split], f"{split} features"
        print(f"Extracting the {split} features of {len(dataset)} images on {device} to {path}")
        if fast_path:
            model = fast.fast_backbone(backbone, device)
            feats = fast.extract_features_fast(model, dataset.data, device, image_size, desc=desc)
        else:
            feats = features.extract_features(
                backbone, dataset, device, num_workers=num_workers, desc=desc,
                worker_init_fn=ignore_stops,  # Ctrl-C and SIGTERM stop the main process alone
            )  # fmt: skip
        return feats, torch.as_tensor(dataset.targets, dtype=torch.long)

    def save(split, path, feats, labels):
        save_cache(path, feats, labels, noted[split])

    result = features.load_or_extract(paths, load, extract, save)
    say_other_path(cache_dir, list(metas), fast_path)
    return result


def say_other_path(cache_dir, splits, fast_path):
    """Where the other path of extraction left caches too, says why numbers may differ."""
    others = [cache_path(cache_dir, split, not fast_path) for split in splits]
    others = [path for path in others if os.path.isfile(path)]
    if others:
        mine, theirs = ("--fast's", "the post's") if fast_path else ("the post's", "--fast's")
        where = " and ".join(others)
        print(
            f"These are {mine} features; {theirs}, in {where}, differ slightly, as may accuracies."
        )


def cifar100_features(data_dir, cache_dir, device, num_workers=4, fast_path=False):
    """CIFAR-100 train and test features from the ImageNet-trained ResNet34, cached in cache_dir.

    Valid caches are enough: CIFAR-100 and the weights are needed (and downloaded) only to build
    one. Raises sources.MissingResources naming everything that could not be had.
    """
    metas = {split: cifar100_meta(split) for split in features.CIFAR100_SIZES}
    open_sources = lambda: sources.open_cifar100(data_dir)
    return cached_features(
        cache_dir, metas, features.CIFAR100_CLASSES, open_sources, device, fast_path, num_workers
    )


def cached_test_features(cache_dir, meta, num_classes, then):
    """(features, labels) of the test split from a cache that train.py left in cache_dir (the post's
    file first, then --fast's), or None; a cache that is there but unusable is reported, ending with
    `then`. meta: what it must be made of, cifar100_meta("test") or synthetic_meta("test");
    num_classes: its classes, features.CIFAR100_CLASSES or SYNTHETIC["num_classes"]."""
    for fast_path in (False, True):
        path = cache_path(cache_dir, "test", fast_path)
        cache = load_cache(path, extraction_meta(meta, fast_path), num_classes, then)
        if cache is not None:
            return cache
    return None
