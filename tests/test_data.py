"""data.py: set invariants, the class draw, the post's evaluation sets and split, bad input; the
sequence tasks' datasets; and SetBatches, the fast path's loader, which must draw the sets the
datasets draw."""

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from data import (
    ReverseDataset,
    SetAnomalyDataset,
    SetBatches,
    SortDataset,
    images_by_class,
    split_train_val,
)
from helpers import SMALL_SET_MODEL, clustered_features, quiet_trainer
from model import FAST_PARTS, AnomalyPredictor


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
        assert sorted(drawn) == [c for c in range(6) if c != anomaly_label]
        # The tempting `==` instead of `>=` skips the anomaly's class only when hit exactly: the
        # class after it would come up twice and the last class never, so its draws are not uniform.
        with_eq = [r + 1 if r == anomaly_label else r for r in range(5)]
        if anomaly_label < 4:
            assert with_eq.count(anomaly_label + 1) == 2 and 5 not in with_eq
            assert sorted(drawn) != sorted(with_eq)


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


def sets_of(loader):
    return [batch for batch in loader]


def test_set_batches_evaluation_sets_are_the_datasets():
    feats, labels = clustered_features(10, 30, 8, seed=0)
    dataset = SetAnomalyDataset(feats, labels, set_size=5, train=False)
    fast = sets_of(SetBatches(dataset, batch_size=64))
    faithful = sets_of(DataLoader(dataset, batch_size=64))
    assert len(fast) == len(faithful) == len(SetBatches(dataset, batch_size=64))
    for (a_sets, a_idx, a_lab), (b_sets, b_idx, b_lab) in zip(fast, faithful, strict=True):
        assert (
            torch.equal(a_sets, b_sets) and torch.equal(a_idx, b_idx) and torch.equal(a_lab, b_lab)
        )


def test_set_batches_training_sets_follow_the_datasets_distribution():
    torch.manual_seed(0)
    num_classes, per_class = 6, 20
    feats, labels = clustered_features(num_classes, per_class, 4, seed=0)
    batches = SetBatches(SetAnomalyDataset(feats, labels, set_size=5, train=True), batch_size=16)
    assert len(batches) == num_classes * per_class // 16
    counts = torch.zeros(num_classes, num_classes)
    for _ in range(50):
        seen = []
        for img_sets, indices, label in batches:
            assert img_sets.shape == (16, 5, 4) and torch.all(label == 4)
            torch.testing.assert_close(img_sets, feats[indices])
            seen += indices[:, -1].tolist()
            for row in indices:
                set_labels = labels[row[:-1]]
                assert len(set(row[:-1].tolist())) == 4 and torch.all(set_labels == set_labels[0])
                assert set_labels[0] != labels[row[-1]]
                counts[labels[row[-1]], set_labels[0]] += 1
        # Every anomaly at most once an epoch.
        assert len(set(seen)) == len(seen) == len(batches) * 16
    # The set's class is uniform over the other classes: each cell of the table near its expected
    # count.
    expected = counts.sum(dim=1, keepdim=True) / (num_classes - 1)
    off_diagonal = ~torch.eye(num_classes, dtype=torch.bool)
    assert torch.all(counts.diagonal() == 0)
    assert torch.all(
        (counts - expected)[off_diagonal].abs()
        < 5 * expected.expand_as(counts)[off_diagonal].sqrt()
    )


def test_set_batches_deal_each_epoch_between_processes(monkeypatch):
    feats, labels = clustered_features(6, 21, 4, seed=0)  # 126 anomalies
    dataset = SetAnomalyDataset(feats, labels, set_size=5, train=True)
    shares = []
    for rank in (0, 1):
        batches = SetBatches(dataset, batch_size=8, seed=3)
        monkeypatch.setattr(batches, "share", lambda rank=rank: (rank, 2))
        assert len(batches) == 63 // 8
        shares.append([[b[1][:, -1].tolist() for b in batches] for _epoch in range(2)])
    for epoch in range(2):
        first, second = (sum(share[epoch], []) for share in shares)
        assert len(first) == len(second) == 7 * 8
        assert not set(first) & set(second)  # one order, dealt: no anomaly in both processes
    assert shares[0][0] != shares[0][1]  # a new order every epoch


def test_set_batches_move_to_the_device_only_when_drawn():
    # With several GPUs, "cuda" means each process's own GPU only once Lightning has set it up, so
    # the features must not be moved when the loaders are made. "meta" stands in for a GPU.
    feats, labels = clustered_features(6, 21, 4, seed=0)
    batches = SetBatches(SetAnomalyDataset(feats, labels, set_size=5), batch_size=8, device="meta")
    assert batches.img_feats.device.type == "cpu"
    batches.place()
    assert batches.img_feats.device.type == batches.img_idx_by_label.device.type == "meta"


def train_and_test(fast, train_set, test_set, steps):
    pl.seed_everything(0)
    hparams = dict(SMALL_SET_MODEL, input_dim=32, max_iters=steps, dropout=0.1, input_dropout=0.1)
    model = AnomalyPredictor(**hparams, fast_parts=FAST_PARTS if fast else ())
    if fast:
        train_loader, test_loader = SetBatches(train_set, 32), SetBatches(test_set, 64)
    else:
        train_loader = DataLoader(train_set, batch_size=32, shuffle=True, drop_last=True)
        test_loader = DataLoader(test_set, batch_size=64)
    trainer = quiet_trainer(max_steps=steps)
    trainer.fit(model, train_loader)
    return trainer.test(model, test_loader, verbose=False)[0]["test_acc"]


def test_fast_and_faithful_training_reach_the_same_accuracy():
    train_feats, train_labels = clustered_features(20, 40, 32, seed=0)
    test_feats, test_labels = clustered_features(20, 20, 32, seed=0)
    test_feats = test_feats + 0.3 * torch.randn(
        test_feats.shape, generator=torch.Generator().manual_seed(1)
    )
    train_set = SetAnomalyDataset(train_feats, train_labels, set_size=10, train=True)
    test_set = SetAnomalyDataset(test_feats, test_labels, set_size=10, train=False)
    faithful = train_and_test(False, train_set, test_set, steps=300)
    fast = train_and_test(True, train_set, test_set, steps=300)
    assert faithful > 0.9 and abs(fast - faithful) <= 0.01 + 1e-6  # 1 point; accuracies are float32
