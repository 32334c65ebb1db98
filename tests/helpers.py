"""What the tests share, each defined once: the scripts run as a user runs them or in the test's
own process, spoiling a file, a small set model with data it learns quickly, and the model's maths
written out in numpy. The runs that the whole suite shares are conftest.py's fixtures."""

import contextlib
import io
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image

import train
from data import SetAnomalyDataset, anomaly_datasets
from harness import lock, pretrained
from model import AnomalyPredictor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HANG_GUARD_S = 900  # only stops a hung run: a slow, busy machine must never fail a test

# train.py's flags for a small set model: for the runs whose assertions do not depend on its size.
SMALL_RUN = ["--model-dim", "32", "--num-heads", "1", "--num-layers", "1"]
# A small set model that learns clustered features in a few hundred steps.
SMALL_SET_MODEL = dict(model_dim=32, num_classes=1, num_heads=2, num_layers=2, lr=1e-3, warmup=10)


def run_script(script, *args, env=None):
    """`python <script> args` in the repository, as a user runs it: its exit code and output."""
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, script), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        env=env,
        cwd=ROOT,
    )


def run_code(code, *args, env=None):
    """`python -c code args` in the repository: its exit code and output."""
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        cwd=ROOT,
        env=env,
    )


def start_python(*args, **popen):
    """`python args` started in the repository, its output in text pipes; popen: more of
    subprocess.Popen's settings (start_new_session, env)."""
    return subprocess.Popen(
        [sys.executable, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        **popen,
    )


def assert_ran(proc):
    """A finished command exited 0; otherwise the end of what it said is the failure's message."""
    assert proc.returncode == 0, proc.stderr[-3000:]


def run_train(*args, env=None):
    return run_script("train.py", "--num-workers", "0", *args, env=env)


SMALL = [*SMALL_RUN, "--batch-size", "8"]  # epochs of a second or more: time to act during one


def train_in_process(*args):
    """train.main(args) in the test's own process: what `python train.py args` prints and exits
    with, as a CompletedProcess, without the seconds a new process spends loading torch and
    Lightning. Its stderr holds what the script's would: warnings shown, Lightning's log lines, and
    a message that stops the run (exit code 1, as Python makes it). The folder locks the run took
    are let go and torch's threads put back, as a process's end would. Where the process itself
    matters (signals, imports, DDP, the one-line exit) the tests run the script."""
    threads, out, err = torch.get_num_threads(), io.StringIO(), io.StringIO()
    log = logging.StreamHandler(err)
    lightning = [logging.getLogger(name) for name in ("pytorch_lightning", "lightning_fabric")]
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        with warnings.catch_warnings(record=True) as shown:
            for logger in lightning:
                logger.addHandler(log)
            try:
                train.main(["--num-workers", "0", *map(str, args)])
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
                if stop.code is not None and not isinstance(stop.code, int):
                    print(stop.code, file=sys.stderr)
            finally:
                for logger in lightning:
                    logger.removeHandler(log)
                torch.set_num_threads(threads)
                lock.release_locks()
    for w in shown:
        err.write(warnings.formatwarning(w.message, w.category, w.filename, w.lineno))
    return subprocess.CompletedProcess(["train.py", *args], code, out.getvalue(), err.getvalue())


def wait_for(condition, process):
    """Returns once condition() holds, with process still running; fails if the process ends
    first or the hang guard passes."""
    deadline = time.time() + HANG_GUARD_S
    while not condition() and process.poll() is None:
        assert time.time() < deadline, "the run never got there"
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it got there"


RESUMED = ["--synthetic", "--epochs", "3", "--batch-size", "16"]  # 61 steps an epoch


def last_of(folder):
    """The checkpoint that --resume continues from, in the set task's --synthetic run folder."""
    return os.path.join(folder, "synthetic", "SetAnomalyDetect", "checkpoints", "last.ckpt")


def read_results(checkpoint_dir):
    """results.json of the set task's --synthetic run in checkpoint_dir."""
    with open(os.path.join(checkpoint_dir, "synthetic", "SetAnomalyDetect", "results.json")) as f:
        return json.load(f)


class ImagesAndLabels(torch.utils.data.Dataset):
    """Images (tensors already, no transform) with their targets, as a data set serves them."""

    def __init__(self, images, targets):
        self.images, self.targets = images, targets

    def __len__(self):
        return len(self.images)

    def __getitem__(self, idx):
        return self.images[idx], self.targets[idx]


@torch.no_grad()
def recomputed_accuracies(checkpoint_dir):
    """The accuracies of the --synthetic run's saved set model in checkpoint_dir, computed here
    apart from train.py's Lightning tester: its own cached features, the post's fixed sets of each
    split (train's too), and the share of sets whose largest logit is the anomaly's, in float32."""
    settings = read_results(checkpoint_dir)["settings"]
    run = os.path.join(checkpoint_dir, "synthetic")
    suffix = "_fast" if settings["fast"] else ""
    train_feats, train_labels = load_features(os.path.join(run, f"train_set_features{suffix}.tar"))
    test_feats, test_labels = load_features(os.path.join(run, f"test_set_features{suffix}.tar"))
    size = settings["set_size"]
    datasets = anomaly_datasets(train_feats, train_labels, test_feats, test_labels, size)
    train = datasets["train"]
    datasets["train"] = SetAnomalyDataset(train.img_feats, train.labels, size, train=False)
    ckpt = os.path.join(run, "SetAnomalyDetect.ckpt")
    model = AnomalyPredictor.load_from_checkpoint(ckpt, map_location="cpu").float().eval()
    accuracies = {}
    for split, dataset in datasets.items():
        sets = torch.stack([dataset[i][0] for i in range(len(dataset))])
        picked = model.anomaly_logits(sets).argmax(dim=-1)
        accuracies[f"{split}_acc"] = (picked == size - 1).float().mean().item()
    return accuracies


def load_features(path):
    cache = torch.load(path, weights_only=True)
    return cache["features"], cache["labels"]


def spoil_truncate(path):
    """Cuts the file at path to half its size, as an interrupted copy would."""
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def copy_caches(synthetic_run, tmp_path, fast_run=None):
    """A fresh checkpoint folder holding only the feature caches of the shared run, and with
    fast_run (the fixture fast_synthetic_run) its --fast ones too."""
    os.makedirs(os.path.join(tmp_path, "synthetic"))
    for name in ("train_set_features.tar", "test_set_features.tar"):
        shutil.copy(
            os.path.join(synthetic_run[0], "synthetic", name),
            os.path.join(tmp_path, "synthetic", name),
        )
        if fast_run is not None:
            name = name.replace(".tar", "_fast.tar")
            shutil.copy(
                os.path.join(fast_run[0], "synthetic", name),
                os.path.join(tmp_path, "synthetic", name),
            )
    return str(tmp_path)


class RunsCode:
    """An object whose unpickling runs code: here, it creates the file named, by a function of the
    standard library (open) or a shell command (os.system)."""

    def __init__(self, path, shell=False):
        self.path, self.shell = path, shell

    def __reduce__(self):
        return (os.system, (f"touch '{self.path}'",)) if self.shell else (open, (self.path, "w"))


def randomise(module):
    """Random values for every parameter, LayerNorm ones included, so nothing passes by being 0 or
    1."""
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(0, 0.3)
    return module


def clustered_features(num_classes, per_class, dim, seed):
    """Features scattered tightly around one random centre per class: an easy anomaly task."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=g)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    return centres[labels] + 0.3 * torch.randn(len(labels), dim, generator=g), labels


def quiet_trainer(**settings):
    """A CPU Trainer for tests: no logs, no checkpoints, no progress bar or model summary."""
    quiet = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return pl.Trainer(**quiet, **settings)


# Reference computations of the model's maths, written out in numpy (test_model)


def reference_attention(q, k, v, mask=None):
    """softmax(q·kᵀ/√d)·v for one head, in float64 numpy, masked keys left out of the softmax
    entirely."""
    q, k, v = (np.asarray(t, dtype=np.float64) for t in (q, k, v))
    out, weights = np.zeros((len(q), v.shape[1])), np.zeros((len(q), len(k)))
    for i in range(len(q)):
        allowed = [j for j in range(len(k)) if mask is None or mask[i][j]]
        scores = np.array([q[i] @ k[j] / math.sqrt(q.shape[1]) for j in allowed])
        w = np.exp(scores - scores.max())
        w /= w.sum()
        weights[i, allowed] = w
        out[i] = w @ v[allowed]
    return out, weights


def reference_multihead(x, w_qkv, b_qkv, w_o, b_o, num_heads, mask=None):
    """Multi-head attention with the post's per-head layout: head h owns rows [3dh, 3dh+d) of the
    stacked projection for q, the next d rows for k, the next d for v."""
    embed_dim = w_o.shape[0]
    d = embed_dim // num_heads
    outs, maps = [], []
    for h in range(num_heads):
        block = slice(3 * d * h, 3 * d * (h + 1))
        qkv = x @ w_qkv[block].T + b_qkv[block]
        q, k, v = qkv[:, :d], qkv[:, d : 2 * d], qkv[:, 2 * d :]
        o, w = reference_attention(q, k, v, mask)
        outs.append(o)
        maps.append(w)
    return np.concatenate(outs, axis=1) @ w_o.T + b_o, np.stack(maps)


def layer_norm(x, norm=None, weight=None, bias=None, eps=1e-5):
    """LayerNorm over the last axis in numpy, with norm's weight, bias and eps, or those given."""
    if norm is not None:
        weight, bias, eps = norm.weight.detach().numpy(), norm.bias.detach().numpy(), norm.eps
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


# The tutorial's state_dict layout, written out: a checkpoint of the original code has exactly these
# keys.
TUTORIAL_KEYS = (
    ["input_net.1.weight", "input_net.1.bias"]
    + [
        f"transformer.layers.{i}.{name}"
        for i in range(2)
        for name in (
            "self_attn.qkv_proj.weight",
            "self_attn.qkv_proj.bias",
            "self_attn.o_proj.weight",
            "self_attn.o_proj.bias",
            "linear_net.0.weight",
            "linear_net.0.bias",
            "linear_net.3.weight",
            "linear_net.3.bias",
            "norm1.weight",
            "norm1.bias",
            "norm2.weight",
            "norm2.bias",
        )
    ]
    + [
        "output_net.0.weight",
        "output_net.0.bias",
        "output_net.1.weight",
        "output_net.1.bias",
        "output_net.4.weight",
        "output_net.4.bias",
    ]
)


# Reading back what a figure shows (test_visualize, test_predict)


def drawn(fig, ndim):
    """{axes: the array it shows} of fig's axes that show an image of ndim dimensions (3: a picture,
    2: an attention map), in the figure's order."""
    arrays = {ax: ax.get_images()[0].get_array() for ax in fig.axes if ax.get_images()}
    return {ax: array for ax, array in arrays.items() if array.ndim == ndim}


def true_runs(mask):
    """(first, last) index of each run of True in a 1-D mask."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
    return list(zip(edges[::2], edges[1::2] - 1, strict=True))


def red_and_grey(path):
    """Masks of a PNG's pure red pixels and of its mid-grey ones."""
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)
    red = (pixels[..., 0] > 200) & (pixels[..., 1] < 60) & (pixels[..., 2] < 60)
    return red, (np.abs(pixels - 128) <= 1).all(axis=-1)


def red_frames(path):
    """How many red frames a PNG holds: each is two horizontal red edges, its top and bottom, of
    50 pixels or more (an image is 80 or more wide; the red in pictures and labels runs shorter)."""
    red, _ = red_and_grey(path)
    longest = [max((b - a + 1 for a, b in true_runs(row)), default=0) for row in red]
    return len(true_runs(np.array(longest) >= 50)) / 2


def save_like_the_tutorial(model, path):
    """A checkpoint as the tutorial's files hold one: weights and hyper-parameters, no optimizer."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    ckpt = {
        "epoch": 0,
        "global_step": 0,
        "state_dict": model.state_dict(),
        "hyper_parameters": dict(model.hparams),
        "pytorch-lightning_version": "1.0.2",
    }
    torch.save(ckpt, path)
    return path


def publish(monkeypatch, task, path, url=None):
    """Makes path's file the published model of task (its own id), served from url if given."""
    blob_id = pretrained.git_blob_id(Path(path).read_bytes())
    monkeypatch.setitem(pretrained.PUBLISHED_IDS, task, blob_id)
    if url:
        monkeypatch.setattr(pretrained, "PUBLISHED_URL", url)
