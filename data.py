"""Sets of image features for anomaly detection (the post's 自定义数据类,并构建dataloader).

A set holds set_size-1 images of one class and, last, one image of another class: the anomaly.
"""

import numpy as np
import torch
from torch.utils.data import Dataset


def images_by_class(labels):
    """Image indices grouped by class, [num_classes, images_per_class].

    Uses torch.argsort with its default arguments, as the post does: the order of images inside a
    class decides the evaluation sets, and a stable sort would order them differently.
    Raises ValueError unless every class 0..max(labels) has the same number of images.
    """
    labels = torch.as_tensor(labels)
    if (
        labels.is_floating_point()
        or labels.is_complex()
        or labels.dtype == torch.bool
        or labels.ndim != 1
        or (len(labels) and labels.min() < 0)
    ):
        raise ValueError(
            "labels must be a 1-D sequence of class indices 0, 1, 2, ...; "
            f"got dtype {labels.dtype}, shape {tuple(labels.shape)}"
        )
    counts = torch.bincount(labels)
    if len(counts) == 0 or (counts != counts[0]).any():
        raise ValueError(
            f"every class must have the same number of images; images per class: {counts.tolist()}"
        )
    return torch.argsort(labels).reshape(len(counts), -1)


class SetAnomalyDataset(Dataset):
    """One set per image: that image is the anomaly, set_size-1 images of another class surround it.

    img_feats - image features, [num_imgs, img_dim]
    labels    - class of each image, [num_imgs], classes 0..C-1 of equal size
    set_size  - images per set (set_size-1 of one class, 1 of another)
    train     - True: draw a fresh set on every access; False: fixed sets, the same as the post's

    An item is (img_set [set_size, img_dim], indices [set_size], label) with label = set_size-1,
    the position of the anomaly.
    """

    def __init__(self, img_feats, labels, set_size=10, train=True):
        super().__init__()
        labels = torch.as_tensor(labels)
        if set_size < 2:
            raise ValueError(
                "set_size must be at least 2 (one anomaly and at least one other image), "
                f"got {set_size}"
            )
        if len(img_feats) != len(labels):
            raise ValueError(
                f"img_feats and labels differ in length: {len(img_feats)} features, "
                f"{len(labels)} labels"
            )
        self.img_feats = img_feats
        self.labels = labels
        # As in the post, set_size - 1: the images drawn from the set's class (the anomaly comes on
        # top of them).
        self.set_size = set_size - 1
        self.train = train

        self.img_idx_by_label = images_by_class(labels)
        self.num_labels = self.img_idx_by_label.shape[0]
        if self.num_labels < 2:
            raise ValueError(
                "at least two classes are needed: the anomaly comes from another class than the set"
            )
        if self.img_idx_by_label.shape[1] < self.set_size:
            raise ValueError(
                f"each class has {self.img_idx_by_label.shape[1]} images, fewer than the "
                f"{self.set_size} a set of size {set_size} draws from one class; "
                "use a smaller set size"
            )

        if not train:
            self.test_sets = self._create_test_sets()

    def _create_test_sets(self):
        # The post seeds numpy's global generator with 42; a local legacy generator with the same
        # seed draws the same numbers without resetting anybody else's random state.
        rng = np.random.RandomState(42)
        test_sets = [self.sample_img_set(self.labels[idx], rng) for idx in range(len(self.labels))]
        return torch.stack(test_sets, dim=0)  # [num_imgs, set_size-1]

    def sample_img_set(self, anomaly_label, rng=np.random):
        """Indices of set_size-1 distinct images of one class other than anomaly_label, the class
        uniform over the other num_labels-1 classes."""
        set_label = rng.randint(self.num_labels - 1)
        # Draw from num_labels-1 values and skip the anomaly's class: values at or above it move up
        # one, so every other class is hit by exactly one value.
        if set_label >= anomaly_label:
            set_label += 1
        img_indices = rng.choice(self.img_idx_by_label.shape[1], size=self.set_size, replace=False)
        return self.img_idx_by_label[set_label, img_indices]

    def __len__(self):
        return self.img_feats.shape[0]

    def __getitem__(self, idx):
        anomaly = self.img_feats[idx]
        if self.train:
            img_indices = self.sample_img_set(self.labels[idx])
        else:
            img_indices = self.test_sets[idx]
        # The anomaly goes last, so the label is the same for every set.
        img_set = torch.cat([self.img_feats[img_indices], anomaly[None]], dim=0)
        indices = torch.cat([img_indices, torch.tensor([idx])], dim=0)
        label = img_set.shape[0] - 1
        return img_set, indices, label


def split_train_val(labels):
    """The post's split of the training images: per class, the first 10 % (in images_by_class order,
    rounded down) go to validation, the rest to training. Returns (train_indices, val_indices)."""
    sorted_indices = images_by_class(labels)
    num_val = sorted_indices.shape[1] // 10
    if num_val == 0:
        raise ValueError(
            f"each class has {sorted_indices.shape[1]} images; the validation split takes 10 % of "
            "each class, so a class needs at least 10"
        )
    val_indices = sorted_indices[:, :num_val].reshape(-1)
    train_indices = sorted_indices[:, num_val:].reshape(-1)
    return train_indices, val_indices


def anomaly_datasets(train_feats, train_labels, test_feats, test_labels, set_size):
    """The post's three set datasets: its per-class split of the training images into "train" (sets
    drawn afresh) and "val" (fixed sets), and "test" (fixed sets) over the test images."""
    train_indices, val_indices = split_train_val(train_labels)
    return {
        "train": SetAnomalyDataset(
            train_feats[train_indices], train_labels[train_indices], set_size, train=True
        ),
        "val": SetAnomalyDataset(
            train_feats[val_indices], train_labels[val_indices], set_size, train=False
        ),
        "test": SetAnomalyDataset(test_feats, test_labels, set_size, train=False),
    }


# The sequence tasks' data, as in the tutorial: 10 categories, length 16, 50 000 / 1 000 / 10 000.
NUM_CATEGORIES, SEQ_LEN, SEQ_SIZES = 10, 16, {"train": 50000, "val": 1000, "test": 10000}


class ReverseDataset(Dataset):
    """The tutorial's sequence task: size random sequences of seq_len integers in
    [0, num_categories); the label of each is the same sequence reversed.
    An item is (sequence [seq_len], label [seq_len])."""

    def __init__(self, num_categories, seq_len, size):
        super().__init__()
        self.num_categories = num_categories
        self.seq_len = seq_len
        self.size = size
        self.data = torch.randint(num_categories, size=(size, seq_len))

    def __len__(self):
        return self.size

    def __getitem__(self, idx):
        inp_data = self.data[idx]
        return inp_data, torch.flip(inp_data, dims=(0,))


class SortDataset(Dataset):
    """A task whose answer must be generated token by token: sort a sequence of integers.

    Each of the size sequences has a random length in [2, max_len] and integers in
    [0, num_categories). Three more tokens frame them: BOS = num_categories,
    EOS = num_categories+1, PAD = num_categories+2, so a model needs num_categories+3 token classes.
    An item is (source [max_len]: the sequence, then PAD; target [max_len+2]: BOS, the sorted
    sequence, EOS, then PAD).
    """

    def __init__(self, num_categories, max_len, size):
        super().__init__()
        if max_len < 2:
            raise ValueError(f"max_len must be at least 2, got {max_len}")
        self.bos, self.eos, self.pad = num_categories, num_categories + 1, num_categories + 2
        lengths = torch.randint(2, max_len + 1, size=(size,))
        values = torch.randint(num_categories, size=(size, max_len))
        positions = torch.arange(max_len)
        self.src = values.masked_fill(positions >= lengths[:, None], self.pad)
        # PAD is the largest token, so sorting the padded source leaves the padding at the end.
        sorted_src = self.src.sort(dim=1).values
        self.tgt = torch.full((size, max_len + 2), self.pad)
        self.tgt[:, 0] = self.bos
        self.tgt[:, 1:-1] = sorted_src
        self.tgt[torch.arange(size), lengths + 1] = self.eos

    def __len__(self):
        return len(self.src)

    def __getitem__(self, idx):
        return self.src[idx], self.tgt[idx]
