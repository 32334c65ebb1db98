"""model.py against formulas written out here, independently of the code under test."""

import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from data import SetAnomalyDataset
from helpers import (
    SMALL_SET_MODEL,
    TUTORIAL_KEYS,
    clustered_features,
    layer_norm,
    quiet_trainer,
    randomise,
    reference_attention,
    reference_multihead,
)
from model import (
    AnomalyPredictor,
    CosineWarmupScheduler,
    EncoderBlock,
    MultiheadAttention,
    PositionalEncoding,
    TransformerEncoder,
    TransformerPredictor,
    expand_mask,
    scaled_dot_product,
)


def test_scaled_dot_product_matches_formula():
    torch.manual_seed(0)
    q, k, v = torch.randn(5, 8), torch.randn(7, 8), torch.randn(7, 3)
    values, attention = scaled_dot_product(q, k, v)
    ref_values, ref_weights = reference_attention(q, k, v)
    np.testing.assert_allclose(values.numpy(), ref_values, atol=1e-5)
    np.testing.assert_allclose(attention.numpy(), ref_weights, atol=1e-6)


@pytest.mark.parametrize("rank", [2, 3, 4])
def test_masks_of_each_rank_mask_the_right_keys(rank):
    torch.manual_seed(0)
    batch, heads, n, d = 2, 3, 5, 4
    q, k, v = (torch.randn(batch, heads, n, d) for _ in range(3))
    base = torch.rand(batch, heads, n, n) > 0.4
    base[..., 0] = True  # every query may see at least one key
    mask = {2: base[0, 0], 3: base[:, 0], 4: base}[rank]
    expanded = expand_mask(mask)
    assert expanded.ndim == 4
    values, attention = scaled_dot_product(q, k, v, mask=expanded)
    for b in range(batch):
        for h in range(heads):
            m = {2: base[0, 0], 3: base[b, 0], 4: base[b, h]}[rank]
            ref_values, ref_weights = reference_attention(q[b, h], k[b, h], v[b, h], m.tolist())
            np.testing.assert_allclose(attention[b, h].numpy(), ref_weights, atol=1e-6)
            np.testing.assert_allclose(values[b, h].numpy(), ref_values, atol=1e-5)
    assert torch.all(attention[~expanded.expand_as(attention)] == 0)
    torch.testing.assert_close(attention.sum(-1), torch.ones(batch, heads, n))


def test_expand_mask_rejects_a_vector():
    with pytest.raises(ValueError, match="2, 3 or 4 dimensions"):
        expand_mask(torch.ones(5))


def test_masking_is_safe_in_float16():
    # The post's fill value is not representable in float16: it becomes -inf, and a row with
    # every key masked turns into NaN. The dtype's minimum keeps every row finite.
    assert torch.tensor(-9e15, dtype=torch.float16).isinf()
    q = k = v = torch.randn(1, 1, 3, 4).half()
    mask = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 0]])
    values, attention = scaled_dot_product(q, k, v, mask=expand_mask(mask))
    assert torch.isfinite(values).all() and torch.isfinite(attention).all()
    assert attention[0, 0, 0].tolist() == [1.0, 0.0, 0.0]
    assert attention[0, 0, 1, 2].item() == 0.0


def test_multihead_attention_matches_per_head_formula():
    torch.manual_seed(0)
    attn = MultiheadAttention(input_dim=6, embed_dim=8, num_heads=2)
    with torch.no_grad():  # non-zero biases, so the test also checks where they go
        attn.qkv_proj.bias.normal_()
        attn.o_proj.bias.normal_()
    x = torch.randn(3, 5, 6)
    mask = torch.tril(torch.ones(5, 5))
    out, attention = attn(x, mask=mask, return_attention=True)
    assert out.shape == (3, 5, 8) and attention.shape == (3, 2, 5, 5)
    params = [
        p.detach().numpy().astype(np.float64)
        for p in (attn.qkv_proj.weight, attn.qkv_proj.bias, attn.o_proj.weight, attn.o_proj.bias)
    ]
    for b in range(3):
        ref_out, ref_maps = reference_multihead(
            x[b].numpy(), *params, num_heads=2, mask=mask.tolist()
        )
        np.testing.assert_allclose(out[b].detach().numpy(), ref_out, atol=1e-5)
        np.testing.assert_allclose(attention[b].detach().numpy(), ref_maps, atol=1e-6)


def test_multihead_attention_initialisation():
    torch.manual_seed(0)
    attn = MultiheadAttention(input_dim=64, embed_dim=128, num_heads=4)
    for linear in (attn.qkv_proj, attn.o_proj):
        fan_out, fan_in = linear.weight.shape
        bound = math.sqrt(6 / (fan_in + fan_out))  # Xavier-uniform: U(-bound, bound)
        assert linear.weight.abs().max() <= bound
        assert linear.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
        assert torch.all(linear.bias == 0)


def test_multihead_attention_rejects_indivisible_heads():
    with pytest.raises(ValueError, match="divisible"):
        MultiheadAttention(input_dim=8, embed_dim=10, num_heads=4)


def reference_encoder_block(x, block, mask=None):
    """Post-LN encoder block in eval mode: LN(x + MHA(x)), then LN(x + W2·relu(W1·x + b1) + b2)."""
    p = lambda t: t.detach().numpy().astype(np.float64)
    a = block.self_attn
    attn_out, attn_map = reference_multihead(
        x,
        p(a.qkv_proj.weight),
        p(a.qkv_proj.bias),
        p(a.o_proj.weight),
        p(a.o_proj.bias),
        a.num_heads,
        mask,
    )
    x = layer_norm(x + attn_out, block.norm1)
    l1, l2 = block.linear_net[0], block.linear_net[3]
    hidden = np.maximum(x @ p(l1.weight).T + p(l1.bias), 0)
    return layer_norm(x + hidden @ p(l2.weight).T + p(l2.bias), block.norm2), attn_map


def test_encoder_block_matches_formula():
    torch.manual_seed(0)
    block = randomise(
        EncoderBlock(input_dim=8, num_heads=2, dim_feedforward=16, dropout=0.3)
    ).eval()
    x = torch.randn(2, 4, 8)
    out = block(x)
    for b in range(2):
        ref, _ = reference_encoder_block(x[b].numpy().astype(np.float64), block)
        np.testing.assert_allclose(out[b].detach().numpy(), ref, atol=1e-5)


def test_attention_maps_use_the_mask_in_every_layer():
    torch.manual_seed(0)
    encoder = randomise(
        TransformerEncoder(num_layers=3, input_dim=8, num_heads=2, dim_feedforward=16)
    ).eval()
    x = torch.randn(1, 5, 8)
    mask = torch.tril(torch.ones(5, 5))
    maps = encoder.get_attention_maps(x, mask=mask)
    h = x[0].numpy().astype(np.float64)
    for layer, attention in zip(encoder.layers, maps, strict=True):
        h, ref_map = reference_encoder_block(h, layer, mask=mask.tolist())
        np.testing.assert_allclose(attention[0].detach().numpy(), ref_map, atol=1e-5)
        assert torch.all(attention[0][:, mask == 0] == 0)
    np.testing.assert_allclose(encoder(x, mask=mask)[0].detach().numpy(), h, atol=1e-5)


@pytest.mark.parametrize("d_model", [16, 7])
def test_positional_encoding_table(d_model):
    pe = PositionalEncoding(d_model=d_model, max_len=50)
    x = torch.zeros(2, 30, d_model)
    out = pe(x)
    assert out.shape == x.shape
    for pos in (0, 1, 17, 29):
        for dim in range(d_model):
            i = dim // 2
            angle = pos / 10000 ** (2 * i / d_model)
            expected = math.sin(angle) if dim % 2 == 0 else math.cos(angle)
            assert out[1, pos, dim].item() == pytest.approx(expected, abs=1e-5)
    assert len(pe.state_dict()) == 0  # the table is not saved


def test_cosine_warmup_scheduler_follows_formula():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.1)
    scheduler = CosineWarmupScheduler(optimizer, warmup=10, max_iters=100)

    def factor(t):
        f = 0.5 * (1 + math.cos(math.pi * t / 100))
        return f * t / 10 if t <= 10 else f

    for t in range(101):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * factor(t), abs=1e-12)
        assert scheduler.get_lr_factor(t) == pytest.approx(factor(t))
        optimizer.step()
        scheduler.step()
    assert scheduler.get_lr_factor(10) == pytest.approx(0.5 * (1 + math.cos(math.pi / 10)))
    assert scheduler.get_lr_factor(100) == pytest.approx(0.0, abs=1e-12)


HPARAMS = dict(
    input_dim=12,
    model_dim=8,
    num_classes=3,
    num_heads=2,
    num_layers=2,
    lr=1e-3,
    warmup=5,
    max_iters=50,
    dropout=0.1,
    input_dropout=0.1,
)


def reference_predictor(x, state, hp, add_positional_encoding):
    """TransformerPredictor's forward in eval mode, from a state_dict and the formulas alone."""
    s = {k: v.detach().numpy().astype(np.float64) for k, v in state.items()}
    lin = lambda h, name: h @ s[name + ".weight"].T + s[name + ".bias"]

    def ln(h, name):
        mean = h.mean(-1, keepdims=True)
        var = ((h - mean) ** 2).mean(-1, keepdims=True)
        return (h - mean) / np.sqrt(var + 1e-5) * s[name + ".weight"] + s[name + ".bias"]

    h = lin(x.astype(np.float64), "input_net.1")
    if add_positional_encoding:
        d = hp["model_dim"]
        pos = np.arange(len(h))[:, None]
        angle = pos / 10000 ** (2 * (np.arange(d) // 2) / d)
        h = h + np.where(np.arange(d) % 2 == 0, np.sin(angle), np.cos(angle))
    for i in range(hp["num_layers"]):
        p = f"transformer.layers.{i}."
        attn_out, _ = reference_multihead(
            h,
            s[p + "self_attn.qkv_proj.weight"],
            s[p + "self_attn.qkv_proj.bias"],
            s[p + "self_attn.o_proj.weight"],
            s[p + "self_attn.o_proj.bias"],
            hp["num_heads"],
        )
        h = ln(h + attn_out, p + "norm1")
        h = ln(h + lin(np.maximum(lin(h, p + "linear_net.0"), 0), p + "linear_net.3"), p + "norm2")
    h = np.maximum(ln(lin(h, "output_net.0"), "output_net.1"), 0)
    return lin(h, "output_net.4")


def test_state_dict_has_the_tutorial_layout():
    model = TransformerPredictor(**HPARAMS)
    assert list(model.state_dict().keys()) == TUTORIAL_KEYS


@pytest.mark.parametrize("add_positional_encoding", [True, False])
def test_full_forward_matches_formula(add_positional_encoding):
    torch.manual_seed(0)
    model = randomise(TransformerPredictor(**HPARAMS)).eval()
    x = torch.randn(2, 6, 12)
    out = model(x, add_positional_encoding=add_positional_encoding)
    assert out.shape == (2, 6, 3)
    for b in range(2):
        ref = reference_predictor(
            x[b].numpy(), model.state_dict(), HPARAMS, add_positional_encoding
        )
        np.testing.assert_allclose(out[b].detach().numpy(), ref, atol=1e-4)


def test_tutorial_checkpoint_loads_strictly(tmp_path):
    # A checkpoint as the original tutorial code writes it: its hyper-parameters and its key layout.
    g = torch.Generator().manual_seed(1)
    shapes = {k: v.shape for k, v in TransformerPredictor(**HPARAMS).state_dict().items()}
    state = {k: torch.randn(shapes[k], generator=g) * 0.3 for k in TUTORIAL_KEYS}
    path = tmp_path / "tutorial.ckpt"
    torch.save(
        {
            "state_dict": state,
            "hyper_parameters": dict(HPARAMS),
            "pytorch-lightning_version": "2.0.0",
            "epoch": 0,
            "global_step": 0,
        },
        path,
    )
    model = AnomalyPredictor.load_from_checkpoint(path, strict=True).eval()
    x = torch.randn(1, 7, 12)
    ref = reference_predictor(x[0].numpy(), state, HPARAMS, add_positional_encoding=False)
    np.testing.assert_allclose(
        model(x, add_positional_encoding=False)[0].detach().numpy(), ref, atol=1e-4
    )


def test_anomaly_predictor_is_permutation_equivariant():
    torch.manual_seed(0)
    model = AnomalyPredictor(**dict(HPARAMS, num_classes=1)).eval()
    x = torch.randn(3, 10, 12)
    perm = torch.randperm(10)
    out = model(x, add_positional_encoding=False)
    out_perm = model(x[:, perm], add_positional_encoding=False)
    torch.testing.assert_close(out_perm, out[:, perm], atol=1e-5, rtol=1e-5)
    # With positional encoding the order would matter: the check above is not vacuous.
    assert not torch.allclose(model(x[:, perm])[:, :, 0], model(x)[:, perm, 0], atol=1e-3)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # no Trainer here
def test_anomaly_loss_and_accuracy():
    torch.manual_seed(0)
    model = AnomalyPredictor(**dict(HPARAMS, num_classes=1)).eval()
    x, labels = torch.randn(4, 10, 12), torch.tensor([9, 9, 0, 3])
    with torch.no_grad():
        logits = model(x, add_positional_encoding=False)[..., 0]
        loss, acc = model._calculate_loss((x, None, labels), mode="test")
    log_probs = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    assert loss.item() == pytest.approx(-log_probs[torch.arange(4), labels].mean().item(), rel=1e-5)
    assert acc.item() == pytest.approx(
        sum(int(logit.argmax() == y) for logit, y in zip(logits, labels, strict=True)) / 4
    )


def test_anomaly_predictor_learns_clustered_features():
    pl.seed_everything(0)
    train_feats, train_labels = clustered_features(20, 40, 32, seed=0)
    # Same centres, fresh noise below.
    test_feats, test_labels = clustered_features(20, 20, 32, seed=0)
    test_feats = test_feats + 0.3 * torch.randn_like(test_feats)
    train_loader = DataLoader(
        SetAnomalyDataset(train_feats, train_labels, set_size=10, train=True),
        batch_size=32,
        shuffle=True,
        drop_last=True,
    )
    test_loader = DataLoader(
        SetAnomalyDataset(test_feats, test_labels, set_size=10, train=False), batch_size=64
    )
    model = AnomalyPredictor(**SMALL_SET_MODEL, input_dim=32, max_iters=150)
    trainer = quiet_trainer(max_steps=150, num_sanity_val_steps=0)
    untrained = trainer.test(model, test_loader, verbose=False)[0]["test_acc"]
    trainer.fit(model, train_loader)
    trained = trainer.test(model, test_loader, verbose=False)[0]["test_acc"]
    # Chance is 0.1, but on such clean clusters an outlier stands out a little even through random
    # weights (0.3-0.4 here); only training finds it nearly always.
    assert untrained < 0.5
    assert trained >= 0.9


def test_checkpoint_round_trip_gives_the_same_model(tmp_path):
    torch.manual_seed(0)
    model = randomise(AnomalyPredictor(**dict(HPARAMS, num_classes=1)))
    trainer = quiet_trainer()
    trainer.strategy.connect(model)
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    loaded = AnomalyPredictor.load_from_checkpoint(tmp_path / "model.ckpt").eval()
    assert dict(loaded.hparams) == dict(model.hparams)
    x = torch.randn(2, 10, 12)
    torch.testing.assert_close(
        loaded(x, add_positional_encoding=False), model.eval()(x, add_positional_encoding=False)
    )
