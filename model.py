"""The Transformer of the post, in the post's order, and the set-anomaly model built on it.

1. 嵌入表示层 (embedding layer): PositionalEncoding
2. 注意力层 (attention layer): scaled_dot_product, expand_mask, MultiheadAttention
3. 前馈层, 残差连接和层归一化, 编码器结构 (feed-forward, residual + LayerNorm, encoder):
   EncoderBlock, TransformerEncoder
4. The models that the post's 模型训练和推理 (training and inference) trains: it uses
   AnomalyPredictor without defining it; AnomalyPredictor, the TransformerPredictor it builds on
   and CosineWarmupScheduler are the tutorial's, written here after its description.

After them come what the post describes without coding it (the decoder with its masked
self-attention and cross-attention, Seq2SeqPredictor) and the tutorial's ReversePredictor. The fast
path (harness/fast.py) computes the same model faster through two switches left here for it:
MultiheadAttention.fused and TransformerPredictor.fused_adam.
"""

import math

import pytorch_lightning as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim

# --------------------------------------------------------------------------------------------------
# 1. 嵌入表示层 / embedding layer: positional encoding
# --------------------------------------------------------------------------------------------------


class PositionalEncoding(nn.Module):
    """Adds the sine/cosine position table of 嵌入表示层 to its input.

    PE[pos, 2i] = sin(pos / 10000^(2i/d_model)),  PE[pos, 2i+1] = cos(pos / 10000^(2i/d_model)).
    d_model - features of the input;  max_len - longest sequence the table covers.
    """

    def __init__(self, d_model, max_len=5000):
        super().__init__()
        position = torch.arange(max_len, dtype=torch.float).unsqueeze(1)  # [SeqLen, 1]
        div_term = torch.exp(torch.arange(0, d_model, 2).float() * (-math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, d_model)
        pe[:, 0::2] = torch.sin(position * div_term)
        # An odd d_model has one cosine column fewer (the post's line fails there).
        pe[:, 1::2] = torch.cos(position * div_term[: d_model // 2])
        # Not persistent: the table is recomputed, so it stays out of state_dict and checkpoints.
        self.register_buffer("pe", pe.unsqueeze(0), persistent=False)  # [1, SeqLen, d_model]

    def forward(self, x):
        """x [Batch, SeqLen, d_model] -> x plus the table's first SeqLen rows."""
        return x + self.pe[:, : x.size(1)]


# --------------------------------------------------------------------------------------------------
# 2. 注意力层 / attention layer: scaled dot-product and multi-head attention
# --------------------------------------------------------------------------------------------------


def scaled_dot_product(q, k, v, mask=None):
    """Scaled dot-product attention, softmax(q·kᵀ/√d_k)·v (注意力层).

    q, k, v - [..., SeqLen, d_k] (k and v may have another SeqLen than q)
    mask    - broadcastable to [..., SeqLen_q, SeqLen_k]; 1/True = may attend, 0/False = masked
    Returns (values [..., SeqLen_q, d_v], attention [..., SeqLen_q, SeqLen_k]).
    """
    d_k = q.size(-1)
    attn_logits = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(d_k)
    if mask is not None:
        # The post fills with -9e15, which float16 cannot hold (masked_fill raises); the dtype's
        # own minimum fits every dtype and still gives a weight of 0.
        attn_logits = attn_logits.masked_fill(mask == 0, torch.finfo(attn_logits.dtype).min)
    attention = F.softmax(attn_logits, dim=-1)
    values = torch.matmul(attention, v)
    return values, attention


def expand_mask(mask):
    """Brings a mask to the 4-D shape [Batch, Head, SeqLen, SeqLen] that attention broadcasts to.

    The post calls this helper without showing it. A 2-D mask [SeqLen, SeqLen] is shared by every
    batch element and head, a 3-D mask [Batch, SeqLen, SeqLen] by every head; a 4-D one as it is.
    """
    if mask.ndim < 2:
        raise ValueError(
            "mask must have 2, 3 or 4 dimensions ([N, N], [B, N, N] or [B, H, N, N]), "
            f"got shape {tuple(mask.shape)}"
        )
    if mask.ndim == 3:
        mask = mask.unsqueeze(1)
    while mask.ndim < 4:
        mask = mask.unsqueeze(0)
    return mask


class MultiheadAttention(nn.Module):
    """Multi-head attention (多头注意力): num_heads scaled dot-products over learned projections.

    input_dim - features of the input x
    embed_dim - features of q, k, v together (num_heads · head_dim) and of the output
    num_heads - number of attention heads; must divide embed_dim
    """

    def __init__(self, input_dim, embed_dim, num_heads):
        super().__init__()
        if embed_dim % num_heads != 0:  # a ValueError, not the post's assert, which -O would skip
            raise ValueError(
                f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})"
            )
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        # The fast path (harness/fast.py) turns this on: PyTorch's fused kernel computes the same
        # softmax(q·kᵀ/√d)·v wherever no attention maps are asked for.
        self.fused = False

        # One matrix for q, k and v of all heads: one matmul instead of three.
        self.qkv_proj = nn.Linear(input_dim, 3 * embed_dim)
        self.o_proj = nn.Linear(embed_dim, embed_dim)
        self._reset_parameters()

    def _reset_parameters(self):
        nn.init.xavier_uniform_(self.qkv_proj.weight)
        nn.init.zeros_(self.qkv_proj.bias)
        nn.init.xavier_uniform_(self.o_proj.weight)
        nn.init.zeros_(self.o_proj.bias)

    def forward(self, x, mask=None, return_attention=False):
        """Self-attention over x [Batch, SeqLen, input_dim] -> [Batch, SeqLen, embed_dim]
        (and, with return_attention, the attention [Batch, Head, SeqLen, SeqLen])."""
        batch_size, seq_length, _ = x.size()
        qkv = self.qkv_proj(x)
        # Each head owns a contiguous block of 3·head_dim outputs: its q, k and v in that order.
        qkv = qkv.reshape(batch_size, seq_length, self.num_heads, 3 * self.head_dim)
        qkv = qkv.permute(0, 2, 1, 3)  # [Batch, Head, SeqLen, 3·head_dim]
        q, k, v = qkv.chunk(3, dim=-1)
        return self.attend(q, k, v, mask, return_attention)

    def attend(self, q, k, v, mask=None, return_attention=False):
        """The heads' attention, concatenated and projected by o_proj.

        q [Batch, Head, SeqLen, head_dim], k and v [Batch, Head, KeyLen, head_dim]
        -> [Batch, SeqLen, embed_dim] (and the attention [Batch, Head, SeqLen, KeyLen]).
        """
        if mask is not None:
            mask = expand_mask(mask)
        if self.fused and not return_attention:
            # Its mask must be boolean (True = may attend): a float 0/1 mask would be added to the
            # logits and mask nothing.
            values = F.scaled_dot_product_attention(
                q, k, v, attn_mask=None if mask is None else mask.bool()
            )
        else:
            values, attention = scaled_dot_product(q, k, v, mask=mask)
        batch_size, _, seq_length, _ = values.shape
        values = values.permute(0, 2, 1, 3)  # [Batch, SeqLen, Head, head_dim]
        values = values.reshape(batch_size, seq_length, self.embed_dim)
        o = self.o_proj(values)

        if return_attention:
            return o, attention
        return o


# --------------------------------------------------------------------------------------------------
# 3. 前馈层, 残差连接和层归一化, 编码器结构 / feed-forward, residual + LayerNorm, the encoder
# --------------------------------------------------------------------------------------------------


class EncoderBlock(nn.Module):
    """One encoder layer (编码器结构): self-attention, then the two-layer MLP of 前馈层.

    Each sub-layer is followed by dropout, a residual connection and LayerNorm (残差连接和层归一化,
    post-LN as in the post and the original paper).

    input_dim       - features of the input and output
    num_heads       - attention heads
    dim_feedforward - hidden features of the MLP
    dropout         - dropout probability
    """

    def __init__(self, input_dim, num_heads, dim_feedforward, dropout=0.0):
        super().__init__()
        self.self_attn = MultiheadAttention(input_dim, input_dim, num_heads)
        # 前馈层: Linear, Dropout, ReLU, Linear, in the post's order.
        self.linear_net = nn.Sequential(
            nn.Linear(input_dim, dim_feedforward),
            nn.Dropout(dropout),
            nn.ReLU(inplace=True),
            nn.Linear(dim_feedforward, input_dim),
        )
        self.norm1 = nn.LayerNorm(input_dim)
        self.norm2 = nn.LayerNorm(input_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, mask=None):
        """x [Batch, SeqLen, input_dim] -> same shape."""
        attn_out = self.self_attn(x, mask=mask)
        x = self.norm1(x + self.dropout(attn_out))
        linear_out = self.linear_net(x)
        x = self.norm2(x + self.dropout(linear_out))
        return x


class TransformerEncoder(nn.Module):
    """num_layers EncoderBlocks stacked (the N× of the post's figure); block_args go to each."""

    def __init__(self, num_layers, **block_args):
        super().__init__()
        self.layers = nn.ModuleList([EncoderBlock(**block_args) for _ in range(num_layers)])

    def forward(self, x, mask=None):
        for layer in self.layers:
            x = layer(x, mask=mask)
        return x

    def get_attention_maps(self, x, mask=None):
        """The attention of every layer, a list of [Batch, Head, SeqLen, SeqLen]."""
        attention_maps = []
        for layer in self.layers:
            _, attn_map = layer.self_attn(x, mask=mask, return_attention=True)
            attention_maps.append(attn_map)
            # The post drops the mask here, so its later layers' maps would see every position.
            x = layer(x, mask=mask)
        return attention_maps


# --------------------------------------------------------------------------------------------------
# 4. The tutorial's schedule and Lightning models, which the post's 模型训练和推理 (training and
# inference) uses without defining them
# --------------------------------------------------------------------------------------------------


class CosineWarmupScheduler(optim.lr_scheduler.LRScheduler):
    """Learning-rate factor: linear warm-up over `warmup` steps, then half a cosine down to 0 at
    `max_iters`.

    Stepped after every optimizer step, so `epoch` here counts steps.
    """

    def __init__(self, optimizer, warmup, max_iters):
        self.warmup = warmup
        self.max_num_iters = max_iters
        super().__init__(optimizer)

    def get_lr(self):
        lr_factor = self.get_lr_factor(epoch=self.last_epoch)
        return [base_lr * lr_factor for base_lr in self.base_lrs]

    def get_lr_factor(self, epoch):
        lr_factor = 0.5 * (1 + math.cos(math.pi * epoch / self.max_num_iters))
        if epoch <= self.warmup:
            lr_factor *= epoch / self.warmup
        return lr_factor


class TransformerPredictor(pl.LightningModule):
    """Input projection, positional encoding, TransformerEncoder and a small output MLP.

    input_dim     - features of each input element
    model_dim     - features inside the Transformer
    num_classes   - outputs per element
    num_heads     - attention heads per layer
    num_layers    - encoder layers
    lr            - Adam learning rate
    warmup        - warm-up steps of CosineWarmupScheduler
    max_iters     - total optimizer steps (the cosine reaches 0 there)
    dropout       - dropout inside the Transformer and the output MLP
    input_dropout - dropout on the input features
    """

    # Adam's fused: None leaves the choice to PyTorch; the fast path (harness/fast.py) sets True.
    fused_adam = None

    def __init__(
        self,
        input_dim,
        model_dim,
        num_classes,
        num_heads,
        num_layers,
        lr,
        warmup,
        max_iters,
        dropout=0.0,
        input_dropout=0.0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self._create_model()

    def _create_model(self):
        hp = self.hparams
        self.input_net = nn.Sequential(
            nn.Dropout(hp.input_dropout), nn.Linear(hp.input_dim, hp.model_dim)
        )
        self.positional_encoding = PositionalEncoding(d_model=hp.model_dim)
        self.transformer = TransformerEncoder(num_layers=hp.num_layers, **self._block_args())
        self.output_net = nn.Sequential(
            nn.Linear(hp.model_dim, hp.model_dim),
            nn.LayerNorm(hp.model_dim),
            nn.ReLU(inplace=True),
            nn.Dropout(hp.dropout),
            nn.Linear(hp.model_dim, hp.num_classes),
        )

    def _block_args(self):
        """Each block's arguments; its MLP is twice as wide as the model, as in the tutorial."""
        hp = self.hparams
        return dict(
            input_dim=hp.model_dim,
            num_heads=hp.num_heads,
            dim_feedforward=2 * hp.model_dim,
            dropout=hp.dropout,
        )

    def _embed(self, x, add_positional_encoding):
        x = self.input_net(x)
        if add_positional_encoding:
            x = self.positional_encoding(x)
        return x

    def forward(self, x, mask=None, add_positional_encoding=True):
        """x [Batch, SeqLen, input_dim] -> [Batch, SeqLen, num_classes]."""
        x = self._embed(x, add_positional_encoding)
        x = self.transformer(x, mask=mask)
        return self.output_net(x)

    @torch.no_grad()
    def get_attention_maps(self, x, mask=None, add_positional_encoding=True):
        """The attention of every layer for input x, a list of [Batch, Head, SeqLen, SeqLen]."""
        x = self._embed(x, add_positional_encoding)
        return self.transformer.get_attention_maps(x, mask=mask)

    def configure_optimizers(self):
        optimizer = optim.Adam(self.parameters(), lr=self.hparams.lr, fused=self.fused_adam)
        self.lr_scheduler = CosineWarmupScheduler(
            optimizer, warmup=self.hparams.warmup, max_iters=self.hparams.max_iters
        )
        return [optimizer], [{"scheduler": self.lr_scheduler, "interval": "step"}]

    def _calculate_loss(self, batch, mode="train"):
        """(loss, accuracy) of a batch, logged as {mode}_loss and {mode}_acc; one for each task."""
        raise NotImplementedError

    def _log_metrics(self, mode, batch_size, loss, **epoch_metrics):
        """Logs {mode}_loss every step and each {mode}_<metric> as its mean over the epoch."""
        # Evaluation losses are epoch means: over all processes, as the metrics below.
        self.log(f"{mode}_loss", loss, batch_size=batch_size, sync_dist=mode != "train")
        for name, value in epoch_metrics.items():
            # An explicit batch size: the epoch mean is then over items, the smaller last batch
            # included; sync_dist: with several processes, over all of them (ModelCheckpoint
            # chooses by val_acc).
            self.log(
                f"{mode}_{name}",
                value,
                on_step=False,
                on_epoch=True,
                batch_size=batch_size,
                sync_dist=True,
            )

    def training_step(self, batch, batch_idx):
        loss, _ = self._calculate_loss(batch, mode="train")
        return loss

    def validation_step(self, batch, batch_idx):
        self._calculate_loss(batch, mode="val")

    def test_step(self, batch, batch_idx):
        self._calculate_loss(batch, mode="test")


class AnomalyPredictor(TransformerPredictor):
    """Set anomaly detection: one logit per image of a set; the softmax over the set picks the
    odd one out.

    No positional encoding: a set has no order, so the model must be permutation-equivariant.
    """

    def anomaly_logits(self, img_sets):
        """img_sets [Batch, SetSize, input_dim] -> [Batch, SetSize] logits of "this one is the
        anomaly"; their softmax over the set gives each image's probability, their argmax the
        predicted one."""
        return self.forward(img_sets, add_positional_encoding=False).squeeze(dim=-1)

    def _calculate_loss(self, batch, mode="train"):
        img_sets, _, labels = batch
        preds = self.anomaly_logits(img_sets)
        loss = F.cross_entropy(preds, labels)
        acc = (preds.argmax(dim=-1) == labels).float().mean()
        self._log_metrics(mode, labels.shape[0], loss, acc=acc)
        return loss, acc


# --------------------------------------------------------------------------------------------------
# Beyond the post's code. 编码器和解码器结构 describes a decoder, which the post does not code:
# masked self-attention (掩码多头注意力), cross-attention (交叉注意力) over the encoder's output,
# and autoregressive generation. Then the tutorial's sequence task, ReversePredictor.
# --------------------------------------------------------------------------------------------------


def causal_mask(seq_len, device=None):
    """[SeqLen, SeqLen] mask of the decoder's masked self-attention (掩码多头注意力): position i may
    attend to positions 0..i only, so no output depends on tokens after it."""
    return torch.tril(torch.ones(seq_len, seq_len, dtype=torch.bool, device=device))


class CrossAttention(MultiheadAttention):
    """Cross-attention (交叉注意力), the decoder's second sub-layer: queries are projected from the
    decoder's x, keys and values from the encoder's output (memory).

    The same weights and state_dict layout as MultiheadAttention: the q rows of its stacked
    projection are applied to x, the k and v rows to memory.
    """

    def forward(self, x, memory, mask=None, return_attention=False):
        """x [Batch, SeqLen, input_dim], memory [Batch, MemLen, input_dim] -> [Batch, SeqLen,
        embed_dim] (and the attention [Batch, Head, SeqLen, MemLen]). mask: which memory positions
        may be attended to, e.g. [Batch, 1, MemLen] for padding."""
        batch_size, seq_length, _ = x.size()
        # qkv_proj's rows, per head (hd = head_dim): hd rows for q, then hd for k, then hd for v.
        # weight [Head, 3, hd, input_dim], bias [Head, 3, hd]
        weight = self.qkv_proj.weight.view(self.num_heads, 3, self.head_dim, -1)
        bias = self.qkv_proj.bias.view(self.num_heads, 3, self.head_dim)
        # The q rows of every head, [Head·hd, input_dim], applied to x: [Batch, SeqLen, Head·hd]
        q = F.linear(x, weight[:, 0].flatten(0, 1), bias[:, 0].flatten())
        q = q.reshape(batch_size, seq_length, self.num_heads, self.head_dim)
        q = q.permute(0, 2, 1, 3)  # [Batch, Head, SeqLen, hd]
        # The k and v rows, [Head·2·hd, input_dim], each head's k next to its v, applied to memory
        kv = F.linear(memory, weight[:, 1:].flatten(0, 2), bias[:, 1:].flatten())
        kv = kv.reshape(batch_size, memory.size(1), self.num_heads, 2 * self.head_dim)
        k, v = kv.permute(0, 2, 1, 3).chunk(2, dim=-1)  # each [Batch, Head, MemLen, hd]
        return self.attend(q, k, v, mask, return_attention)


class DecoderBlock(EncoderBlock):
    """One decoder layer: masked self-attention, cross-attention over the encoder's output, and
    the feed-forward MLP.

    Each sub-layer has dropout, a residual connection and LayerNorm, as in EncoderBlock; the
    arguments are EncoderBlock's.
    """

    def __init__(self, input_dim, num_heads, dim_feedforward, dropout=0.0):
        super().__init__(input_dim, num_heads, dim_feedforward, dropout)
        self.cross_attn = CrossAttention(input_dim, input_dim, num_heads)
        self.norm3 = nn.LayerNorm(input_dim)

    def forward(self, x, memory, tgt_mask=None, memory_mask=None, return_attention=False):
        """x [Batch, TgtLen, input_dim], memory (encoder output) [Batch, SrcLen, input_dim] -> like
        x (and, with return_attention, the self- and cross-attention maps).

        tgt_mask - mask of the self-attention, usually causal_mask(TgtLen)
        memory_mask - which encoder positions may be attended to, e.g. [Batch, 1, SrcLen]
        """
        attn_out = self.self_attn(x, mask=tgt_mask, return_attention=return_attention)
        if return_attention:
            attn_out, self_map = attn_out
        x = self.norm1(x + self.dropout(attn_out))
        cross_out = self.cross_attn(x, memory, mask=memory_mask, return_attention=return_attention)
        if return_attention:
            cross_out, cross_map = cross_out
        x = self.norm2(x + self.dropout(cross_out))
        x = self.norm3(x + self.dropout(self.linear_net(x)))
        if return_attention:
            return x, self_map, cross_map
        return x


class TransformerDecoder(nn.Module):
    """num_layers DecoderBlocks stacked; block_args go to each block."""

    def __init__(self, num_layers, **block_args):
        super().__init__()
        self.layers = nn.ModuleList([DecoderBlock(**block_args) for _ in range(num_layers)])

    def forward(self, x, memory, tgt_mask=None, memory_mask=None):
        for layer in self.layers:
            x = layer(x, memory, tgt_mask=tgt_mask, memory_mask=memory_mask)
        return x

    def get_attention_maps(self, x, memory, tgt_mask=None, memory_mask=None):
        """(self-attention maps [Batch, Head, TgtLen, TgtLen], cross-attention maps
        [Batch, Head, TgtLen, SrcLen]), one of each per layer."""
        self_maps, cross_maps = [], []
        for layer in self.layers:
            x, self_map, cross_map = layer(
                x, memory, tgt_mask=tgt_mask, memory_mask=memory_mask, return_attention=True
            )
            self_maps.append(self_map)
            cross_maps.append(cross_map)
        return self_maps, cross_maps


class Seq2SeqPredictor(TransformerPredictor):
    """Encoder-decoder Transformer (编码器和解码器结构) that generates its output token by token.

    Same arguments as TransformerPredictor, with input_dim = num_classes = the vocabulary size,
    whose last three tokens are BOS, EOS and PAD (see data.SortDataset). The encoder is
    TransformerPredictor's; the decoder shares its input_net (one-hot -> model_dim) and output_net
    (model_dim -> token logits). Training is teacher-forced; generate() is greedy, autoregressive.
    """

    def _create_model(self):
        super()._create_model()
        hp = self.hparams
        self.decoder = TransformerDecoder(num_layers=hp.num_layers, **self._block_args())
        self.bos, self.eos, self.pad = hp.num_classes - 3, hp.num_classes - 2, hp.num_classes - 1

    def _embed_tokens(self, tokens):
        return self._embed(F.one_hot(tokens, num_classes=self.hparams.num_classes).float(), True)

    def encode(self, src):
        """src tokens [Batch, SrcLen] -> (memory [Batch, SrcLen, model_dim],
        memory_mask [Batch, 1, SrcLen])."""
        memory_mask = (src != self.pad).unsqueeze(1)  # padding is never attended to
        return self.transformer(self._embed_tokens(src), mask=memory_mask), memory_mask

    def decode(self, tgt_in, memory, memory_mask):
        """Logits [Batch, TgtLen, num_classes] of the token after each of tgt_in [Batch, TgtLen]."""
        tgt_mask = causal_mask(tgt_in.size(1), tgt_in.device)
        x = self.decoder(self._embed_tokens(tgt_in), memory, tgt_mask, memory_mask)
        return self.output_net(x)

    def forward(self, src, tgt_in):
        """Teacher forcing: the decoder reads the true previous tokens tgt_in (BOS first)."""
        return self.decode(tgt_in, *self.encode(src))

    @torch.no_grad()
    def generate(self, src, max_len):
        """Greedy decoding: start from BOS, append the most likely next token until EOS or max_len
        tokens. Returns [Batch, max_len] tokens (EOS included, PAD after it)."""
        memory, memory_mask = self.encode(src)
        tokens = torch.full((src.size(0), 1), self.bos, dtype=torch.long, device=src.device)
        finished = torch.zeros(src.size(0), dtype=torch.bool, device=src.device)
        for _ in range(max_len):
            next_token = self.decode(tokens, memory, memory_mask)[:, -1].argmax(dim=-1)
            next_token = next_token.masked_fill(finished, self.pad)
            tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            finished |= next_token == self.eos
            if finished.all():
                break
        out = tokens[:, 1:]
        return F.pad(out, (0, max_len - out.size(1)), value=self.pad)

    @torch.no_grad()
    def get_attention_maps(self, src, tgt_in):
        """(encoder self-attention, decoder self-attention, decoder cross-attention) maps, a list
        per layer each."""
        memory, memory_mask = self.encode(src)
        encoder_maps = self.transformer.get_attention_maps(
            self._embed_tokens(src), mask=memory_mask
        )
        tgt_mask = causal_mask(tgt_in.size(1), src.device)
        decoder_maps = self.decoder.get_attention_maps(
            self._embed_tokens(tgt_in), memory, tgt_mask, memory_mask
        )
        return (encoder_maps, *decoder_maps)

    def _calculate_loss(self, batch, mode="train"):
        src, tgt = batch  # tgt: BOS, the answer, EOS, then PAD
        tgt_in, labels = tgt[:, :-1], tgt[:, 1:]
        logits = self.forward(src, tgt_in)
        loss = F.cross_entropy(
            logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=self.pad
        )
        real = labels != self.pad
        token_acc = (logits.argmax(dim=-1) == labels)[real].float().mean()
        if mode == "train":
            self._log_metrics(mode, labels.shape[0], loss, token_acc=token_acc)
            return loss, token_acc
        # Outside training, accuracy counts whole sequences generated greedily and exactly right.
        acc = (self.generate(src, labels.size(1)) == labels).all(dim=1).float().mean()
        self._log_metrics(mode, labels.shape[0], loss, token_acc=token_acc, acc=acc)
        return loss, acc


class ReversePredictor(TransformerPredictor):
    """The tutorial's sequence task: output the input sequence reversed, one class per position.

    Inputs are one-hot vectors [Batch, SeqLen, num_classes]; positional encoding is on, since here
    the order is the whole point.
    """

    def _calculate_loss(self, batch, mode="train"):
        inp_data, labels = batch  # [Batch, SeqLen] integers each
        inp_data = F.one_hot(inp_data, num_classes=self.hparams.num_classes).float()
        preds = self.forward(inp_data, add_positional_encoding=True)  # [Batch, SeqLen, num_classes]
        loss = F.cross_entropy(preds.reshape(-1, preds.size(-1)), labels.reshape(-1))
        acc = (preds.argmax(dim=-1) == labels).float().mean()
        self._log_metrics(mode, labels.shape[0], loss, acc=acc)
        return loss, acc
