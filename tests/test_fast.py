"""harness/fast.py, the fast path (--fast): each part computes what the post's path computes, the
features (to a cosine above 0.999), the sets (SetBatches draws the datasets' distribution, deals
epochs between processes), the model (fused attention, bit-mask dropout), and a training reaches
the same accuracy; the parts are put into a model once it is made and never saved with it."""

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import train
from data import SetAnomalyDataset
from features import extract_features, image_transform, resnet34_backbone
from harness import fast
from harness.fast import (
    MODEL_PARTS,
    BitMaskDropout,
    SetBatches,
    extract_features_fast,
    fast_backbone,
    use_fast_path,
)
from harness.synthetic import GeneratedImages
from helpers import SMALL_SET_MODEL, clustered_features, quiet_trainer, randomise
from model import AnomalyPredictor, MultiheadAttention, Seq2SeqPredictor, causal_mask


def test_fast_features_agree_with_faithful_ones():
    torch.manual_seed(0)
    backbone = resnet34_backbone()
    images = GeneratedImages(
        num_classes=4, per_class=2, transform=image_transform(224), seed=0, split="test"
    )
    faithful = extract_features(backbone, images, torch.device("cpu"), batch_size=4, num_workers=0)
    cpu = torch.device("cpu")
    faster = extract_features_fast(fast_backbone(backbone, cpu), images.data, cpu, batch_size=4)
    # An untrained ResNet gives every image nearly the same feature direction (raw cosines between
    # different images are above 0.998 here), so compare what sets the images apart: the features
    # minus their mean.
    mean = faithful.mean(dim=0)
    # Different images differ.
    assert F.cosine_similarity(faithful[:4] - mean, faithful[4:] - mean).max() < 0.9
    assert F.cosine_similarity(faster - mean, faithful - mean).min() > 0.999


def sets_of(loader):
    return [batch for batch in loader]


def test_set_batches_evaluation_sets_are_the_datasets():
    feats, labels = clustered_features(10, 30, 8, seed=0)
    dataset = SetAnomalyDataset(feats, labels, set_size=5, train=False)
    sampled = sets_of(SetBatches(dataset, batch_size=64))
    faithful = sets_of(DataLoader(dataset, batch_size=64))
    assert len(sampled) == len(faithful) == len(SetBatches(dataset, batch_size=64))
    for (a_sets, a_idx, a_lab), (b_sets, b_idx, b_lab) in zip(sampled, faithful, strict=True):
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
        monkeypatch.setattr(fast, "process_share", lambda rank=rank: (rank, 2))
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


def train_and_test(fast_path, train_set, test_set, steps):
    pl.seed_everything(0)
    hparams = dict(SMALL_SET_MODEL, input_dim=32, max_iters=steps, dropout=0.1, input_dropout=0.1)
    trainer = quiet_trainer(max_steps=steps)
    model = use_fast_path(AnomalyPredictor(**hparams), MODEL_PARTS if fast_path else (), trainer)
    if fast_path:
        train_loader, test_loader = SetBatches(train_set, 32), SetBatches(test_set, 64)
    else:
        train_loader = DataLoader(train_set, batch_size=32, shuffle=True, drop_last=True)
        test_loader = DataLoader(test_set, batch_size=64)
    trainer.fit(model, train_loader)
    assert trainer.optimizers[0].defaults["fused"] == (
        fast_path and fast.TORCH_VERSION >= (2, 4) or None
    )
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
    faster = train_and_test(True, train_set, test_set, steps=300)
    assert (
        faithful > 0.9 and abs(faster - faithful) <= 0.01 + 1e-6
    )  # 1 point; accuracies are float32


# The post's model: train.py's defaults, 703 steps an epoch (45 000 sets in batches of 64).
POST = train.model_hparams(train.parse_args([]), train.IO_DIMS["anomaly"], epoch_steps=703)


def test_fast_forward_equals_faithful_forward():
    torch.manual_seed(0)
    model = randomise(AnomalyPredictor(**POST)).eval()
    x = torch.randn(8, 10, 512)
    faithful = model(x, add_positional_encoding=False)
    fast_model = use_fast_path(AnomalyPredictor(**POST)).eval()
    fast_model.load_state_dict(model.state_dict())  # same checkpoint layout: the keys must match
    assert any(isinstance(m, BitMaskDropout) for m in fast_model.modules())
    assert all(m.fused for m in fast_model.modules() if isinstance(m, MultiheadAttention))
    faster = fast_model(x, add_positional_encoding=False)
    torch.testing.assert_close(faster, faithful, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mask", ["causal", "padding"])
def test_fused_attention_masks_like_the_manual_one(mask):
    torch.manual_seed(0)
    attn = randomise(MultiheadAttention(16, 16, 4))
    x = torch.randn(3, 6, 16)
    m = (
        causal_mask(6)
        if mask == "causal"
        else torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4])[:, None, :]
    )
    for as_float in (False, True):  # a float 0/1 mask must mask as well, not be added to the logits
        m_in = m.float() if as_float else m
        faithful = attn(x, mask=m_in)
        attn.fused = True
        fused = attn(x, mask=m_in)
        attn.fused = False
        torch.testing.assert_close(fused, faithful, atol=1e-5, rtol=0)


def test_fast_is_chosen_when_loading_and_never_saved(tmp_path):
    torch.manual_seed(0)
    fast_model = randomise(use_fast_path(AnomalyPredictor(**POST)))
    trainer = quiet_trainer()
    trainer.strategy.connect(fast_model)
    trainer.save_checkpoint(tmp_path / "fast.ckpt")
    # The file is what the post's path writes: it loads strictly into the post's model.
    faithful = AnomalyPredictor.load_from_checkpoint(tmp_path / "fast.ckpt", strict=True)
    fast = use_fast_path(AnomalyPredictor.load_from_checkpoint(tmp_path / "fast.ckpt"))
    assert not any(isinstance(m, BitMaskDropout) for m in faithful.modules())
    assert not any(m.fused for m in faithful.modules() if isinstance(m, MultiheadAttention))
    assert sum(isinstance(m, BitMaskDropout) for m in fast.modules()) == sum(
        type(m) is torch.nn.Dropout for m in faithful.modules()
    )
    assert all(m.fused for m in fast.modules() if isinstance(m, MultiheadAttention))
    x = torch.randn(2, 10, 512)
    torch.testing.assert_close(
        fast.eval().anomaly_logits(x), faithful.eval().anomaly_logits(x), atol=1e-5, rtol=0
    )


def test_fast_path_parts_are_checked():
    with pytest.raises(ValueError, match="unknown parts of the fast path"):
        use_fast_path(AnomalyPredictor(**POST), ("dropout", "flash"))
    # One part alone, as bench.py --ablation.
    model = use_fast_path(AnomalyPredictor(**POST), ("attention",))
    assert not any(isinstance(m, BitMaskDropout) for m in model.modules())
    assert all(m.fused for m in model.modules() if isinstance(m, MultiheadAttention))


def test_fast_seq2seq_generation_is_unchanged():
    torch.manual_seed(0)
    hparams = dict(
        input_dim=8, model_dim=16, num_classes=8, num_heads=2, num_layers=2, lr=1e-3, warmup=1,
        max_iters=10,
    )  # fmt: skip
    model = randomise(Seq2SeqPredictor(**hparams)).eval()
    fast_model = use_fast_path(Seq2SeqPredictor(**hparams)).eval()
    fast_model.load_state_dict(model.state_dict())
    src = torch.tensor([[3, 1, 4, 1, 7, 7], [2, 0, 4, 4, 3, 1]])
    assert torch.equal(fast_model.generate(src, 8), model.generate(src, 8))


def test_fast_dropout_drops_with_probability_p_and_rescales():
    torch.manual_seed(0)
    drop = BitMaskDropout(0.1)
    x = torch.ones(1000, 1000)
    y = drop(x)
    kept = y[y != 0]
    p = round(0.1 * 65536) / 65536  # the probability the 16-bit threshold gives
    assert torch.allclose(kept, torch.full_like(kept, 1 / (1 - p)))
    assert abs((y == 0).float().mean().item() - p) < 5 * (p * (1 - p) / x.numel()) ** 0.5
    # Each of the four 16-bit fields of a draw is used: every position in a group of four drops
    # alike.
    per_field = (y.view(-1, 4) == 0).float().mean(dim=0)
    assert (per_field - p).abs().max() < 5 * (p * (1 - p) / (x.numel() / 4)) ** 0.5
    drop.eval()
    assert torch.equal(drop(x), x)
    drop.train()
    grad_x = torch.ones(10, 10, requires_grad=True)
    out = drop(grad_x)
    out.sum().backward()
    torch.testing.assert_close(grad_x.grad, out.detach())  # d(x·noise)/dx = noise


def test_fast_dropout_is_pytorchs_own_off_the_cpu(monkeypatch):
    # The bit masks are drawn by numpy on the CPU; on an accelerator PyTorch's dropout is one
    # fused kernel already, and the fast path must use it. "meta" stands in for an accelerator.
    calls = []
    pytorch_dropout = F.dropout

    def counting_dropout(x, p, training, inplace):
        calls.append((x.device.type, p))
        return pytorch_dropout(x, p, training, inplace)

    monkeypatch.setattr(F, "dropout", counting_dropout)
    BitMaskDropout(0.1)(torch.ones(64, 64, device="meta"))
    assert calls == [("meta", 0.1)]
    BitMaskDropout(0.1)(torch.ones(64, 64))  # on the CPU: the bit masks
    assert calls == [("meta", 0.1)]


@pytest.mark.parametrize(
    "parts, precision, fused",
    [(MODEL_PARTS, "32-true", True), (MODEL_PARTS, "bf16-mixed", None), ((), "32-true", None)],
)
def test_fused_adam_is_asked_for_only_where_it_can_train(parts, precision, fused):
    trainer = pl.Trainer(accelerator="cpu", precision=precision, logger=False)
    model = use_fast_path(AnomalyPredictor(**POST), parts, trainer)
    (optimizer,), _ = model.configure_optimizers()
    expected = fused and fast.TORCH_VERSION >= (2, 4)  # a CPU's fused Adam came with PyTorch 2.4
    assert optimizer.defaults["fused"] == (expected or None)


def test_a_model_put_on_the_fast_path_keeps_its_mode():
    torch.manual_seed(0)
    model = use_fast_path(AnomalyPredictor(**POST).eval())  # as a model loaded for evaluation
    assert not any(m.training for m in model.modules() if isinstance(m, BitMaskDropout))
    x = torch.randn(2, 10, 512)
    torch.testing.assert_close(model.anomaly_logits(x), model.anomaly_logits(x), atol=0, rtol=0)
