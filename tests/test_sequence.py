"""The sequence tasks: ReverseDataset, SortDataset, cross-attention, the decoder and
Seq2SeqPredictor."""

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from data import ReverseDataset, SortDataset
from helpers import (
    TUTORIAL_KEYS,
    layer_norm,
    quiet_trainer,
    randomise,
    reference_attention,
    reference_multihead,
)
from model import CrossAttention, DecoderBlock, ReversePredictor, Seq2SeqPredictor, causal_mask


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
    input_dim=8,
    model_dim=32,
    num_classes=8,
    num_heads=2,
    num_layers=2,
    lr=2e-3,
    warmup=20,
    max_iters=400,
    dropout=0.0,
    input_dropout=0.0,
)


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
        input_dim=10,
        model_dim=32,
        num_heads=1,
        num_classes=10,
        num_layers=1,
        dropout=0.0,
        lr=5e-4,
        warmup=50,
        max_iters=3900,
        input_dropout=0.0,
    )
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
