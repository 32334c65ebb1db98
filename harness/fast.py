"""The fast path (train.py --fast, and --compile): the post's features, sets and model, computed
faster, never changed. Batched feature extraction on the device, whole batches of sets sampled with
tensor operations, and inside the model fused attention, cheaper dropout masks and fused Adam; what
each is worth is measured by bench.py (BENCHMARKS.md). Weights and checkpoints are the same either
way. It builds on the post's files and they know nothing of it: model.py leaves two switches for it,
MultiheadAttention.fused and TransformerPredictor.fused_adam.
"""

import copy

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.experimental.optimization import fuse
from tqdm.auto import tqdm

from features import DATA_MEANS, DATA_STD, IMAGE_SIZE
from model import MultiheadAttention

# --------------------------------------------------------------------------------------------------
# Features: the images resized and normalised on the device, in batches
# --------------------------------------------------------------------------------------------------


def fast_backbone(model, device):
    """A copy of a backbone on device with BatchNorm folded into the convolutions, channels-last,
    which oneDNN and cuDNN run faster; on CUDA, cuDNN picks its fastest kernels."""
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
    """features.extract_features, faster: images [N, H, W, 3] uint8 (a CIFAR100's .data) go to the
    device as they are, and are resized, normalised and run through model (made by fast_backbone)
    there in batches, with no PIL and no workers.

    The resize is bilinear like torchvision's Resize of a PIL image (antialiased when it shrinks),
    but in float instead of 8-bit pixels. Features agree with extract_features to a cosine
    similarity above 0.999 (tests/test_fast.py, bench.py).
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
# Sets: whole batches drawn with tensor operations on the device
# --------------------------------------------------------------------------------------------------


def process_share():
    """(this process's rank, number of processes): (0, 1) unless torch.distributed runs."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class SetBatches:
    """Whole batches of sets made with tensor operations on the features' device: the stand-in for
    DataLoader(dataset, batch_size, shuffle=dataset.train, drop_last=dataset.train) over a
    data.SetAnomalyDataset.

    Training batches follow SetAnomalyDataset's distribution (a random order of anomalies; per set a
    class uniform over the other classes and set_size-1 distinct images of it); evaluation batches
    are the dataset's own pre-generated sets. Batches are
    (img_sets [B, set_size, D], indices [B, set_size], labels [B]).

    With several processes (torch.distributed), each trains on its share of every epoch's anomalies,
    as DistributedSampler would deal them: one order, the same in every process (from seed and the
    epoch), padded to a multiple of the processes, every processes-th anomaly to each. Each process
    evaluates on all sets, so the accuracy averaged over processes is that of the whole set.
    """

    def __init__(self, dataset, batch_size, device=None, seed=0):
        self.img_feats, self.labels = dataset.img_feats, dataset.labels
        self.img_idx_by_label = dataset.img_idx_by_label
        self.set_size = dataset.set_size  # as the dataset's: the images of the set's class
        self.train = dataset.train
        self.test_sets = None if self.train else dataset.test_sets
        self.batch_size, self.device = batch_size, device
        self.seed, self.epoch = seed, 0

    def place(self):
        """Moves the tensors to the device when batches are first drawn (then it is a no-op): by
        then, with several GPUs, Lightning has made this process's own GPU the current "cuda"."""
        for name in ("img_feats", "labels", "img_idx_by_label", "test_sets"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).to(self.device))

    def __len__(self):
        n = len(self.labels)
        if not self.train:
            return -(-n // self.batch_size)
        return -(-n // process_share()[1]) // self.batch_size

    def sample_img_sets(self, anomaly_labels):
        """[B, set_size-1] image indices: per anomaly label, distinct images of one other class."""
        device = anomaly_labels.device
        num_labels, per_class = self.img_idx_by_label.shape
        set_labels = torch.randint(num_labels - 1, anomaly_labels.shape, device=device)
        # The same shift as sample_img_set: uniform over the other classes.
        set_labels += set_labels >= anomaly_labels
        # The positions of the set_size-1 largest of per_class uniform numbers: a uniformly random
        # subset of distinct images, in random order.
        uniform = torch.rand(len(anomaly_labels), per_class, device=device)
        chosen = uniform.topk(self.set_size, dim=1).indices
        return self.img_idx_by_label[set_labels[:, None], chosen]

    def anomaly_order(self):
        """This process's anomalies for one training epoch, in random order."""
        device, n = self.img_feats.device, len(self.labels)
        rank, processes = process_share()
        if processes == 1:
            return torch.randperm(n, device=device)
        self.epoch += 1
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        order = torch.cat([order, order[: -n % processes]])  # padded, as DistributedSampler pads
        return order[rank::processes].to(device)

    def __iter__(self):
        self.place()
        if self.train:
            batches = self.anomaly_order()[: len(self) * self.batch_size].view(len(self), -1)
        else:
            batches = torch.arange(len(self.labels), device=self.img_feats.device)
            batches = batches.split(self.batch_size)
        for idx in batches:
            if self.train:
                img_indices = self.sample_img_sets(self.labels[idx])
            else:
                img_indices = self.test_sets[idx]
            indices = torch.cat([img_indices, idx[:, None]], dim=1)
            yield self.img_feats[indices], indices, torch.full_like(idx, self.set_size)


# --------------------------------------------------------------------------------------------------
# The model: fused attention, cheaper dropout masks, fused Adam; and torch.compile (--compile)
# --------------------------------------------------------------------------------------------------

MODEL_PARTS = ("dropout", "attention", "adam")  # the parts inside the model
TORCH_VERSION = tuple(int(part) for part in torch.__version__.split(".")[:2])


def model_parts(fast, compiled=False):
    """The parts inside the model for train.py's flags --fast and --compile: all with --fast,
    except that --compile keeps PyTorch's dropout, since the CPU's bit masks are drawn by numpy,
    outside any compiled graph."""
    if not fast:
        return ()
    return tuple(part for part in MODEL_PARTS if not (compiled and part == "dropout"))


class BitMaskDropout(nn.Dropout):
    """nn.Dropout whose random mask is cheaper to draw on a CPU than bernoulli_.

    Each element compares 16 random bits with a threshold, four elements per 64-bit draw; the bits
    come from numpy's PCG64, seeded from torch's generator, which draws them faster than torch's
    mt19937. p is rounded to a multiple of 1/65536 (0.1 becomes 0.100006), and kept values are
    scaled by 1/(1-p) for that rounded p. On any other device this is nn.Dropout: there PyTorch's
    dropout is one fused kernel already.
    """

    bit_generator = None  # numpy's PCG64, made on first use

    def random_bits(self, count):
        """count 64-bit words of random bits, as int64, on the CPU."""
        if self.bit_generator is None:  # seeded from torch: seed_everything makes runs repeatable
            self.bit_generator = np.random.PCG64(torch.randint(2**62, ()).item())
        return torch.from_numpy(self.bit_generator.random_raw(count).view(np.int64))

    def forward(self, x):
        if not (self.training and self.p > 0) or x.device.type != "cpu":
            return super().forward(x)
        drop_below = min(round(self.p * 65536), 65535) - 32768  # an int16 below this is dropped
        fields = self.random_bits(-(-x.numel() // 4)).view(torch.int16)
        noise = torch.empty(fields.shape, dtype=x.dtype)
        torch.ge(fields, drop_below, out=noise)  # 1.0 where kept, 0.0 where dropped
        noise = noise[: x.numel()].view(x.shape).mul_(65536 / (32768 - drop_below))
        # One float noise tensor, as nn.Dropout makes on a CPU: the backward is one multiplication.
        return x * noise


def fused_adam_runs(device, precision):
    """Whether fused Adam can train here: on CUDA, or on a CPU from PyTorch 2.4 on; not under mixed
    precision, where Lightning refuses to clip a fused optimizer's gradients."""
    device = torch.device(device).type
    fits = device == "cuda" or (device == "cpu" and TORCH_VERSION >= (2, 4))
    return fits and "mixed" not in str(precision)


def use_fast_path(model, parts=MODEL_PARTS, trainer=None):
    """Puts the fast path's parts into model, in place, and returns it. parts: some of MODEL_PARTS
    by name.

    "dropout" replaces every nn.Dropout by a BitMaskDropout of the same p, in the same mode;
    "attention" lets every MultiheadAttention use PyTorch's fused kernel; "adam" makes the optimizer
    fused Adam where it can run with trainer, the Trainer that will fit model (fused_adam_runs): a
    model only evaluated, without a trainer, has no optimizer, and "adam" changes nothing there.
    """
    unknown = set(parts) - set(MODEL_PARTS)
    if unknown:
        raise ValueError(f"unknown parts of the fast path: {sorted(unknown)}; known: {MODEL_PARTS}")
    if "adam" in parts and trainer is not None:
        runs = fused_adam_runs(trainer.strategy.root_device, trainer.precision)
        model.fused_adam = runs or None
    for module in list(model.modules()):
        if isinstance(module, MultiheadAttention):
            module.fused = "attention" in parts
        for name, child in module.named_children():
            if "dropout" in parts and type(child) is nn.Dropout:
                setattr(module, name, BitMaskDropout(child.p).train(child.training))
    return model


def compile_training_forward(model, device, backend="inductor"):
    """Compiles model's forward for training with torch.compile (train.py --compile): the forward as
    one graph (fullgraph: a graph break is an error), whose backward AOT autograd derives as a
    second; on CUDA with CUDA graphs (mode reduce-overhead), which launch a step's many small
    kernels at once. Evaluation keeps the eager forward: it runs once an epoch, with batches of
    other sizes, each of which would cost a compilation."""
    mode = "reduce-overhead" if device.type == "cuda" and backend == "inductor" else None
    compiled = torch.compile(model.forward, fullgraph=True, mode=mode, backend=backend)
    eager = model.forward
    model.forward = lambda *args, **kwargs: (compiled if model.training else eager)(*args, **kwargs)
    return model
