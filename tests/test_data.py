"""data.py: set invariants, the class draw, the post's evaluation sets and split, bad input; the
sequence tasks' datasets."""

import numpy as np
import pytest
import torch

from data import ReverseDataset, SetAnomalyDataset, SortDataset, images_by_class, split_train_val


def make_data(num_classes=6, per_class=15, dim=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat(per_class)[
        torch.randperm(num_classes * per_class, generator=g)
    ]
    return torch.randn(len(labels), dim, generator=g), labels


@pytest.mark.parametrize("train", [True, False])
def test_every_set_holds_one_class_and_the_anomaly_last(train):
    feats, labels = make_data()
    dataset = SetAnomalyDataset(feats, labels, set_size=5, train=train)
    assert len(dataset) == len(labels)
    for idx in range(len(dataset)):
        img_set, indices, label = dataset[idx]
        assert img_set.shape == (5, 4) and indices.shape == (5,) and label == 4
        assert indices[-1] == idx
        torch.testing.assert_close(img_set, feats[indices])
        others = labels[indices[:-1]]
        assert len(set(indices[:-1].tolist())) == 4  # distinct images
        assert (others == others[0]).all() and others[0] != labels[idx]


class EveryValue:
    """A stand-in generator whose randint returns 0, 1, 2, ... in turn: it walks through every
    draw."""

    def __init__(self):
        self.next = 0

    def randint(self, high):
        value, self.next = self.next, self.next + 1
        assert value < high
        return value

    def choice(self, n, size, replace):
        return np.arange(size)


def test_set_class_is_uniform_over_the_other_classes():
    feats, labels = make_data(num_classes=6)
    dataset = SetAnomalyDataset(feats, labels, set_size=3)
    for anomaly_label in range(6):
        rng = EveryValue()
        drawn = [
            labels[dataset.sample_img_set(torch.tensor(anomaly_label), rng)[0]].item()
            for _ in range(5)
        ]
        # Each of the 5 equally likely draws gives another class, and every other class comes up
        # once.
        # (The tempting `==` for `>=` would give the class after the anomaly's twice, the last
        # class never.)
        assert sorted(drawn) == [c for c in range(6) if c != anomaly_label]


def post_eval_sets(labels, set_size):
    """The post's evaluation sets, regenerated as its code does: numpy's global generator seeded
    with 42, one class draw and one image draw per image in index order."""
    num_labels = int(labels.max()) + 1
    by_label = torch.argsort(labels).reshape(num_labels, -1)
    np.random.seed(42)
    sets = []
    for idx in range(len(labels)):
        set_label = np.random.randint(num_labels - 1)
        if set_label >= labels[idx]:
            set_label += 1
        chosen = np.random.choice(by_label.shape[1], size=set_size - 1, replace=False)
        sets.append(by_label[set_label, chosen])
    return torch.stack(sets)


def test_eval_sets_are_the_posts_and_leave_numpys_state_alone():
    feats, labels = make_data(num_classes=10, per_class=20)
    state = np.random.get_state()
    np.random.seed(123)
    before = np.random.get_state()
    dataset = SetAnomalyDataset(feats, labels, set_size=10, train=False)
    after = np.random.get_state()
    assert before[0] == after[0] and np.array_equal(before[1], after[1]) and before[2:] == after[2:]
    expected = post_eval_sets(labels, set_size=10)
    np.random.set_state(state)
    assert torch.equal(dataset.test_sets, expected)
    assert torch.equal(dataset[3][1][:-1], expected[3])
    # Evaluation sets stay fixed; training sets are drawn anew on each access.
    assert torch.equal(dataset[3][1], dataset[3][1])
    train = SetAnomalyDataset(feats, labels, set_size=10, train=True)
    assert any(not torch.equal(train[3][1], train[3][1]) for _ in range(5))


def test_grouping_keeps_the_posts_order_of_ties():
    labels = torch.arange(10).repeat(20)
    grouped = images_by_class(labels)
    assert grouped.shape == (10, 20)
    for c in range(10):
        assert sorted(grouped[c].tolist()) == torch.nonzero(labels == c).flatten().tolist()
    # The post's evaluation sets depend on the order of tied labels, so the grouping follows the
    # post's call, torch.argsort with default arguments (on this input it differs from a stable
    # sort).
    assert torch.equal(grouped.flatten(), torch.argsort(labels))


def test_split_puts_the_first_tenth_of_each_class_in_validation():
    feats, labels = make_data(num_classes=5, per_class=29)
    train_idx, val_idx = split_train_val(labels)
    grouped = torch.argsort(labels).reshape(5, 29)  # the post's grouping
    # 10 % of 29, rounded down: 2 per class.
    assert len(val_idx) == 5 * 2 and len(train_idx) == 5 * 27
    assert torch.bincount(labels[val_idx]).tolist() == [2] * 5
    for c in range(5):
        class_val = [i for i in val_idx.tolist() if labels[i] == c]
        assert class_val == grouped[c, :2].tolist()
    assert sorted(train_idx.tolist() + val_idx.tolist()) == list(range(len(labels)))


@pytest.mark.parametrize(
    "feats, labels, set_size, message",
    [
        (torch.zeros(7, 2), torch.tensor([0, 0, 0, 0, 1, 1, 1]), 2, "same number of images"),
        (torch.zeros(6, 2), torch.tensor([0, 0, 0, 1, 1, 1]), 5, "fewer than"),
        (torch.zeros(6, 2), torch.tensor([0, 0, 0, 1, 1, 1]), 1, "at least 2"),
        (torch.zeros(5, 2), torch.tensor([0, 0, 0, 1, 1, 1]), 2, "differ in length"),
        (
            torch.zeros(4, 2),
            torch.tensor([0, 0, 2, 2]),
            2,
            "same number of images",
        ),  # class 1 is empty
        (torch.zeros(4, 2), torch.tensor([0.0, 0.0, 1.0, 1.0]), 2, "class indices"),
        (torch.zeros(4, 2), torch.tensor([-1, -1, 1, 1]), 2, "class indices"),
    ],
)
def test_bad_input_says_what_is_wrong(feats, labels, set_size, message):
    with pytest.raises(ValueError, match=message):
        SetAnomalyDataset(feats, labels, set_size=set_size)


def test_split_needs_ten_images_per_class():
    with pytest.raises(ValueError, match="at least 10"):
        split_train_val(torch.arange(3).repeat(9))


def test_reverse_dataset_labels_are_the_sequences_reversed():
    torch.manual_seed(0)
    dataset = ReverseDataset(num_categories=10, seq_len=16, size=50)
    assert len(dataset) == 50
    for idx in range(50):
        inp, label = dataset[idx]
        assert inp.shape == (16,) and 0 <= inp.min() and inp.max() < 10
        assert label.tolist() == inp.tolist()[::-1]


def test_sort_dataset_frames_the_sorted_sequence():
    torch.manual_seed(0)
    dataset = SortDataset(num_categories=10, max_len=8, size=200)
    bos, eos, pad = 10, 11, 12
    lengths = set()
    for idx in range(200):
        src, tgt = dataset[idx]
        values = [t for t in src.tolist() if t != pad]
        lengths.add(len(values))
        assert src.tolist() == values + [pad] * (8 - len(values))  # padding only at the end
        assert tgt.tolist() == [bos] + sorted(values) + [eos] + [pad] * (8 - len(values))
    assert lengths == set(range(2, 9))


def test_a_set_is_the_posts_ten_images_unless_told_and_one_class_groups_alone():
    feats, labels = make_data(num_classes=3, per_class=12)
    dataset = SetAnomalyDataset(feats, labels)  # the post's default: sets of 10
    assert dataset.set_size == 9 and dataset[0][0].shape == (10, 4)
    assert images_by_class(torch.zeros(5, dtype=torch.long)).tolist() == [[0, 1, 2, 3, 4]]
