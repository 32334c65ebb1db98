"""train.py --pretrained: the tutorial author's models, fetched (put in place by hand, or from a
local HTTP server), verified by their git blob id, loaded strictly and tested; and every way it
fails. The published ids are replaced by those of checkpoints made here: no test needs the network.
"""

import functools
import http.server
import json
import os
import shutil
import subprocess
import threading

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import train
from data import SEQ_SIZES, ReverseDataset, split_train_val
from harness import folders, lock, pretrained
from helpers import (
    SMALL_SET_MODEL,
    RunsCode,
    clustered_features,
    publish,
    quiet_trainer,
    randomise,
    save_like_the_tutorial,
)
from model import AnomalyPredictor, ReversePredictor
from predict import set_size_accuracy

# The hyper-parameters of the tutorial's ReverseTask.ckpt.
TUTORIAL_REVERSE = dict(
    input_dim=10, model_dim=32, num_heads=1, num_classes=10, num_layers=1, dropout=0.0,
    lr=5e-4, warmup=50, max_iters=3900, input_dropout=0.0,
)  # fmt: skip


@pytest.fixture(scope="module")
def reverse_checkpoint(tmp_path_factory):
    """A reverse model trained here for a few steps, saved as the tutorial's ReverseTask.ckpt is."""
    pl.seed_everything(0, verbose=False)
    # Briefly, with a faster schedule than the tutorial's: about 30 % of the digits right.
    model = ReversePredictor(**dict(TUTORIAL_REVERSE, lr=5e-3, warmup=10, max_iters=100))
    batches = DataLoader(ReverseDataset(10, 16, 3200), batch_size=128)
    quiet_trainer(max_epochs=4, limit_val_batches=0).fit(model, batches)
    return save_like_the_tutorial(model, str(tmp_path_factory.mktemp("made") / "ReverseTask.ckpt"))


def run(*argv):
    """train.main's exit message, or its results."""
    try:
        return train.main(["--num-workers", "0", *argv])
    except SystemExit as exit_info:
        return str(exit_info.code)


def test_git_blob_id_is_the_id_git_gives(tmp_path):
    path = tmp_path / "hello"
    path.write_bytes(b"hello\n")  # git hash-object of this is a well-known id
    assert pretrained.git_blob_id(path.read_bytes()) == "ce013625030ba8dba906f756967f9e9ca394464a"
    if shutil.which("git"):
        path.write_bytes(os.urandom(10000))
        git = subprocess.run(["git", "hash-object", str(path)], capture_output=True, text=True)
        assert pretrained.git_blob_id(path.read_bytes()) == git.stdout.strip()


def reverse_accuracy(model, split):
    """The model's per-digit accuracy on the seeded sequences of split, computed here directly."""
    pl.seed_everything(42, verbose=False)  # train.py's default seed, then its order of drawing
    data = {s: ReverseDataset(10, 16, n) for s, n in SEQ_SIZES.items()}[split].data
    with torch.no_grad():
        logits = model.eval()(F.one_hot(data, 10).float(), add_positional_encoding=True)
    return (logits.argmax(dim=-1) == data.flip(dims=(1,))).float().mean().item()


def test_reverse_model_put_in_place_is_tested_and_nothing_else_touched(
    reverse_checkpoint, tmp_path, monkeypatch, capsys
):
    (tmp_path / "pretrained").mkdir()
    placed = shutil.copy(reverse_checkpoint, tmp_path / "pretrained" / "ReverseTask.ckpt")
    publish(monkeypatch, "reverse", placed, url="http://127.0.0.1:9/")  # would fail if used
    own = (tmp_path / "ReverseTask.ckpt", tmp_path / "ReverseTask" / "results.json")
    for path in own:  # a run of the user's own: never written over
        os.makedirs(path.parent, exist_ok=True)
        path.write_bytes(b"the user's own")

    results = run("--task", "reverse", "--pretrained", "--checkpoint-dir", str(tmp_path))
    model = ReversePredictor.load_from_checkpoint(reverse_checkpoint)
    for split in ("val", "test"):
        assert results[f"{split}_acc"] == pytest.approx(reverse_accuracy(model, split), abs=1e-6)
    assert 0.2 < results["test_acc"] < 0.9  # a model that learned something, not everything
    out = capsys.readouterr().out
    assert f"Test accuracy:  {100 * results['test_acc']:.2f}%" in out
    with open(tmp_path / "pretrained" / "ReverseTask" / "results.json") as f:
        saved = json.load(f)
    assert saved["test_acc"] == results["test_acc"] and saved["trained"] is False
    assert (saved["pretrained"], saved["git_blob_id"]) == (
        folders.PUBLISHED_FILES["reverse"],
        pretrained.PUBLISHED_IDS["reverse"],
    )
    assert all(path.read_bytes() == b"the user's own" for path in own)


def test_a_file_put_in_place_after_the_check_is_never_loaded(
    reverse_checkpoint, tmp_path, monkeypatch
):
    (tmp_path / "pretrained").mkdir()
    placed = shutil.copy(reverse_checkpoint, tmp_path / "pretrained" / "ReverseTask.ckpt")
    publish(monkeypatch, "reverse", placed, url="http://127.0.0.1:9/")
    marker = tmp_path / "code ran"
    set_up = train.sequence_setup

    def swap_then_set_up(args):  # between the check of the file and the loading of the model
        crafted = {"state_dict": {}, "hyper_parameters": {}, "run": RunsCode(str(marker))}
        torch.save(crafted, placed)
        return set_up(args)

    monkeypatch.setattr(train, "sequence_setup", swap_then_set_up)
    results = run("--task", "reverse", "--pretrained", "--checkpoint-dir", str(tmp_path))
    assert not marker.exists()  # nothing of the new file was unpickled
    model = ReversePredictor.load_from_checkpoint(reverse_checkpoint)
    assert results["test_acc"] == pytest.approx(reverse_accuracy(model, "test"), abs=1e-6)


class Files(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass


@pytest.fixture
def server(tmp_path):
    """(folder, URL) of an HTTP server on this machine serving the folder."""
    folder = tmp_path / "served"
    folder.mkdir()
    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Files, directory=str(folder))
    )
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield folder, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


def test_a_missing_model_is_downloaded_verified_and_kept(
    reverse_checkpoint, tmp_path, monkeypatch, server
):
    folder, url = server
    publish(
        monkeypatch, "reverse", shutil.copy(reverse_checkpoint, folder / "ReverseTask.ckpt"), url
    )
    results = run("--task", "reverse", "--pretrained", "--checkpoint-dir", str(tmp_path / "models"))
    kept = tmp_path / "models" / "pretrained" / "ReverseTask.ckpt"
    assert kept.read_bytes() == (folder / "ReverseTask.ckpt").read_bytes()
    assert results["checkpoint"] == str(kept) and 0 <= results["test_acc"] <= 1
    assert sorted(os.listdir(kept.parent)) == ["ReverseTask", "ReverseTask.ckpt"]  # no temp file


def test_a_download_that_is_not_the_published_file_is_not_kept(
    reverse_checkpoint, tmp_path, monkeypatch, server
):
    folder, url = server
    publish(monkeypatch, "reverse", reverse_checkpoint, url)
    (folder / "ReverseTask.ckpt").write_bytes(b"<html>a proxy's error page</html>")
    message = run("--task", "reverse", "--pretrained", "--checkpoint-dir", str(tmp_path / "m"))
    assert message.startswith("error: cannot get " + url) and "\n" not in message
    assert pretrained.PUBLISHED_IDS["reverse"] in message  # names the id it expected
    kept = [f for _, _, files in os.walk(tmp_path / "m") for f in files if f != ".lock"]
    assert kept == []  # nothing of the download, only the lock of the folder it was meant for


def test_no_network_names_where_to_put_the_file(reverse_checkpoint, tmp_path, monkeypatch):
    publish(monkeypatch, "reverse", reverse_checkpoint, url="http://127.0.0.1:9/")
    message = run("--task", "reverse", "--pretrained", "--checkpoint-dir", str(tmp_path))
    lock.release_locks()  # as the process's end does
    where = tmp_path / "pretrained" / "ReverseTask.ckpt"
    header, item = message.splitlines()  # what is missing, then a line for the file
    assert header == "error: cannot get what --pretrained needs (no internet?):"
    assert item.startswith("  - the tutorial's ReverseTask.ckpt (") and f"at {where}." in item
    assert item.endswith("download http://127.0.0.1:9/ReverseTask.ckpt to that path.")
    assert not (tmp_path / "pretrained").exists()  # no empty folder left for the file


def test_a_changed_byte_is_refused_and_the_file_left_in_place(
    reverse_checkpoint, tmp_path, monkeypatch
):
    publish(monkeypatch, "reverse", reverse_checkpoint)
    contents = bytearray(open(reverse_checkpoint, "rb").read())
    contents[len(contents) // 2] ^= 1
    placed = tmp_path / "pretrained" / "ReverseTask.ckpt"
    placed.parent.mkdir()
    placed.write_bytes(contents)
    message = run("--task", "reverse", "--pretrained", "--checkpoint-dir", str(tmp_path))
    expected = pretrained.PUBLISHED_IDS["reverse"]
    found = pretrained.git_blob_id(placed.read_bytes())
    assert found != expected and found in message and expected in message
    assert "Delete it" in message and "\n" not in message
    assert placed.read_bytes() == contents
    assert not (tmp_path / "pretrained" / "ReverseTask" / "results.json").exists()  # no results


def test_a_file_that_is_no_checkpoint_or_of_another_task_is_refused(tmp_path, monkeypatch):
    placed = tmp_path / "pretrained" / "ReverseTask.ckpt"
    placed.parent.mkdir()
    placed.write_bytes(b"not a checkpoint")
    publish(monkeypatch, "reverse", placed)
    message = run("--task", "reverse", "--pretrained", "--checkpoint-dir", str(tmp_path))
    assert "cannot be read" in message and "\n" not in message and placed.exists()

    set_model = AnomalyPredictor(input_dim=512, max_iters=10, **SMALL_SET_MODEL)
    publish(monkeypatch, "reverse", save_like_the_tutorial(set_model, str(placed)))
    message = run("--task", "reverse", "--pretrained", "--checkpoint-dir", str(tmp_path))
    assert message == (
        f"error: {placed} is a model of another task: input_dim 512 (needs 10), "
        "num_classes 1 (needs 10). Delete it and run again to download the published model."
    )
    state = set_model.state_dict()
    hparams = dict(TUTORIAL_REVERSE, model_dim=16)  # the task's sizes, weights of another shape
    torch.save({"state_dict": state, "hyper_parameters": hparams}, placed)
    publish(monkeypatch, "reverse", placed)
    message = run("--task", "reverse", "--pretrained", "--checkpoint-dir", str(tmp_path))
    assert message.startswith(f"error: {placed} does not load into ReversePredictor (")
    assert "\n" not in message and placed.exists()


def test_set_task_is_the_same_path_with_its_own_file(tmp_path, monkeypatch):
    # Features in the --synthetic shapes (10 classes of 110 training and 20 test images) stand in
    # for CIFAR-100's, which the real run extracts.
    train_feats, train_labels = clustered_features(10, 110, 512, seed=1)
    test_feats, test_labels = clustered_features(10, 20, 512, seed=2)
    features = {"train": (train_feats, train_labels), "test": (test_feats, test_labels)}
    monkeypatch.setattr(train, "cifar100_features", lambda *args: features)
    model = randomise(AnomalyPredictor(input_dim=512, max_iters=10, **SMALL_SET_MODEL)).eval()
    placed = save_like_the_tutorial(model, str(tmp_path / "pretrained" / "SetAnomalyTask.ckpt"))
    publish(monkeypatch, "anomaly", placed, url="http://127.0.0.1:9/")

    results = run("--pretrained", "--checkpoint-dir", str(tmp_path))
    train_idx, val_idx = split_train_val(train_labels)
    expected = {
        "train_acc": (train_feats[train_idx], train_labels[train_idx]),
        "val_acc": (train_feats[val_idx], train_labels[val_idx]),
        "test_acc": (test_feats, test_labels),
    }
    for key, (feats, labels) in expected.items():
        accuracy = set_size_accuracy(model, feats, labels, 10, torch.device("cpu"))
        assert results[key] == pytest.approx(accuracy, abs=1e-6), key
    assert os.path.isfile(tmp_path / "pretrained" / "SetAnomalyDetect" / "results.json")
    assert not os.path.exists(tmp_path / "SetAnomalyDetect.ckpt")
