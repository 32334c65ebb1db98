"""model.py against formulas written out here, independently of the code under test: attention,
the encoder and decoder, the predictors and their checkpoints."""

import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from data import SetAnomalyDataset, SortDataset
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
    CrossAttention,
    DecoderBlock,
    EncoderBlock,
    MultiheadAttention,
    PositionalEncoding,
    ReversePredictor,
    Seq2SeqPredictor,
    TransformerEncoder,
    TransformerPredictor,
    causal_mask,
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
    input_dim=12, model_dim=8, num_classes=3, num_heads=2, num_layers=2, lr=1e-3, warmup=5,
    max_iters=50, dropout=0.1, input_dropout=0.1,
)  # fmt: skip


def reference_predictor(x, state, hp, add_positional_encoding):
    """TransformerPredictor's forward in eval mode, from a state_dict and the formulas alone."""
    s = {k: v.detach().numpy().astype(np.float64) for k, v in state.items()}
    lin = lambda h, name: h @ s[name + ".weight"].T + s[name + ".bias"]

    ln = lambda h, name: layer_norm(h, weight=s[name + ".weight"], bias=s[name + ".bias"])

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


def reference_cross_attention(x, memory, attn, mask=None):
    """Cross-attention written out: head h's q rows of the stacked projection applied to x, its k
    and v rows applied to memory."""
    w, b = (
        attn.qkv_proj.weight.detach().double().numpy(),
        attn.qkv_proj.bias.detach().double().numpy(),
    )
    d, outs, maps = attn.head_dim, [], []
    for h in range(attn.num_heads):
        rows = lambda part, h=h: slice(3 * d * h + part * d, 3 * d * h + (part + 1) * d)
        q = x @ w[rows(0)].T + b[rows(0)]
        k = memory @ w[rows(1)].T + b[rows(1)]
        v = memory @ w[rows(2)].T + b[rows(2)]
        o, weights = reference_attention(q, k, v, mask)
        outs.append(o)
        maps.append(weights)
    o_w, o_b = (
        attn.o_proj.weight.detach().double().numpy(),
        attn.o_proj.bias.detach().double().numpy(),
    )
    return np.concatenate(outs, axis=1) @ o_w.T + o_b, np.stack(maps)


def test_cross_attention_matches_formula_and_rows_sum_to_one():
    torch.manual_seed(0)
    attn = randomise(CrossAttention(input_dim=8, embed_dim=8, num_heads=2))
    x, memory = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    # [Batch, 1, SrcLen]
    memory_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]).bool()[:, None, :]
    out, attention = attn(x, memory, mask=memory_mask, return_attention=True)
    assert out.shape == (2, 3, 8) and attention.shape == (2, 2, 3, 5)
    torch.testing.assert_close(attention.sum(-1), torch.ones(2, 2, 3))
    assert torch.all(attention[1, :, :, 3:] == 0)
    for b in range(2):
        mask = memory_mask[b].expand(3, 5).tolist()
        ref_out, ref_maps = reference_cross_attention(
            x[b].double().numpy(), memory[b].double().numpy(), attn, mask
        )
        np.testing.assert_allclose(out[b].detach().numpy(), ref_out, atol=1e-5)
        np.testing.assert_allclose(attention[b].detach().numpy(), ref_maps, atol=1e-6)
    assert list(attn.state_dict()) == [
        "qkv_proj.weight",
        "qkv_proj.bias",
        "o_proj.weight",
        "o_proj.bias",
    ]


def test_decoder_block_matches_formula():
    torch.manual_seed(0)
    block = randomise(
        DecoderBlock(input_dim=8, num_heads=2, dim_feedforward=16, dropout=0.2)
    ).eval()
    x, memory = torch.randn(1, 4, 8), torch.randn(1, 6, 8)
    out = block(x, memory, tgt_mask=causal_mask(4))
    p = lambda t: t.detach().double().numpy()
    h = x[0].double().numpy()
    sa = block.self_attn
    attn_out, _ = reference_multihead(
        h,
        p(sa.qkv_proj.weight),
        p(sa.qkv_proj.bias),
        p(sa.o_proj.weight),
        p(sa.o_proj.bias),
        2,
        mask=np.tril(np.ones((4, 4))).tolist(),
    )
    h = layer_norm(h + attn_out, block.norm1)
    cross_out, _ = reference_cross_attention(h, memory[0].double().numpy(), block.cross_attn)
    h = layer_norm(h + cross_out, block.norm2)
    l1, l2 = block.linear_net[0], block.linear_net[3]
    h = layer_norm(
        h + np.maximum(h @ p(l1.weight).T + p(l1.bias), 0) @ p(l2.weight).T + p(l2.bias),
        block.norm3,
    )
    np.testing.assert_allclose(out[0].detach().numpy(), h, atol=1e-5)


def test_causal_mask():
    assert causal_mask(3).tolist() == [
        [True, False, False],
        [True, True, False],
        [True, True, True],
    ]


# 5 digits, then BOS=5, EOS=6, PAD=7.
S2S = dict(
    input_dim=8, model_dim=32, num_classes=8, num_heads=2, num_layers=2, lr=2e-3, warmup=20,
    max_iters=400, dropout=0.0, input_dropout=0.0,
)  # fmt: skip


def test_decoder_output_does_not_see_later_tokens():
    torch.manual_seed(0)
    model = randomise(Seq2SeqPredictor(**S2S)).eval()
    src = torch.tensor([[3, 1, 4, 1, 7, 7]])
    tgt = torch.tensor([[5, 1, 1, 3, 4, 6, 7]])
    out = model(src, tgt)
    for t in range(tgt.size(1) - 1):
        changed = tgt.clone()
        changed[0, t + 1 :] = torch.randint(0, 8, (tgt.size(1) - t - 1,))
        changed[0, t + 1] = (tgt[0, t + 1] + 1) % 8  # surely different
        out_changed = model(src, changed)
        torch.testing.assert_close(out_changed[0, : t + 1], out[0, : t + 1], atol=1e-5, rtol=1e-5)
        assert not torch.allclose(out_changed[0, t + 1 :], out[0, t + 1 :], atol=1e-4)


def test_source_padding_is_never_attended():
    torch.manual_seed(0)
    model = randomise(Seq2SeqPredictor(**S2S)).eval()
    src = torch.tensor([[3, 1, 4, 7, 7]])
    tgt = torch.tensor([[5, 1, 3, 4, 6]])
    encoder_maps, _, cross_maps = model.get_attention_maps(src, tgt)
    for maps in (encoder_maps, cross_maps):
        for attention in maps:
            assert torch.all(attention[..., 3:] == 0)
            torch.testing.assert_close(attention.sum(-1), torch.ones_like(attention.sum(-1)))


def test_greedy_generation_equals_teacher_forcing_where_it_is_right():
    pl.seed_everything(0)
    train = SortDataset(num_categories=5, max_len=6, size=6400)
    test = SortDataset(num_categories=5, max_len=6, size=256)
    model = Seq2SeqPredictor(**S2S)
    trainer = quiet_trainer(max_steps=S2S["max_iters"], num_sanity_val_steps=0, gradient_clip_val=5)
    trainer.fit(model, DataLoader(train, batch_size=64, shuffle=True))
    model.eval()
    src, tgt = test.src, test.tgt
    labels = tgt[:, 1:]
    generated = model.generate(src, max_len=labels.size(1))
    teacher = model(src, tgt[:, :-1]).argmax(dim=-1)
    right = (generated == labels).all(dim=1)
    assert right.float().mean() > 0.5  # trained enough for the check to cover many sequences
    assert torch.equal(generated[right], teacher[right].masked_fill(labels[right] == 7, 7))
    # The accuracy the model logs agrees with this count.
    acc = trainer.test(model, DataLoader(test, batch_size=64), verbose=False)[0]["test_acc"]
    assert acc == pytest.approx(right.float().mean().item())


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # no Trainer here
def test_reverse_predictor_loss_is_cross_entropy_over_positions():
    torch.manual_seed(0)
    model = ReversePredictor(
        input_dim=10,
        model_dim=16,
        num_classes=10,
        num_heads=1,
        num_layers=1,
        lr=5e-4,
        warmup=50,
        max_iters=100,
    ).eval()
    inp = torch.randint(10, (3, 16))
    labels = inp.flip(1)
    with torch.no_grad():
        loss, acc = model._calculate_loss((inp, labels), mode="test")
        logits = model(F.one_hot(inp, 10).float())
    log_probs = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    expected = -log_probs.gather(-1, labels[..., None]).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert acc.item() == pytest.approx((logits.argmax(-1) == labels).float().mean().item())


def test_tutorial_reverse_checkpoint_loads(tmp_path):
    # The tutorial's ReversePredictor: the same hyper-parameters and key layout as the set model.
    hparams = dict(
        input_dim=10, model_dim=32, num_heads=1, num_classes=10, num_layers=1, dropout=0.0,
        lr=5e-4, warmup=50, max_iters=3900, input_dropout=0.0,
    )  # fmt: skip
    keys = [k.replace("transformer.layers.1.", "") for k in TUTORIAL_KEYS if "layers.1." not in k]
    shapes = {k: v.shape for k, v in ReversePredictor(**hparams).state_dict().items()}
    state = {k: torch.randn(shapes[k]) for k in keys}
    torch.save(
        {"state_dict": state, "hyper_parameters": hparams, "pytorch-lightning_version": "2.0.0"},
        tmp_path / "ReverseTask.ckpt",
    )
    model = ReversePredictor.load_from_checkpoint(tmp_path / "ReverseTask.ckpt", strict=True)
    torch.testing.assert_close(
        model.state_dict()["output_net.4.weight"], state["output_net.4.weight"]
    )
