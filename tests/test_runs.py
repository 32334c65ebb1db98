"""What a run folder promises (runs.py, cli.check_before_work): one run at a time, whatever runs
beside it; every input checked before anything is computed or deleted; checkpoints read as data,
never as code."""

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import predict
from harness import runs
from helpers import (
    HANG_GUARD_S,
    ROOT,
    SMALL_RUN,
    SMALL_SET_MODEL,
    copy_caches,
    last_of,
    read_results,
    train_in_process,
    wait_for,
)
from model import AnomalyPredictor

SMALL = [*SMALL_RUN, "--batch-size", "8"]  # epochs of a second or more: time to act during one


def start_train(checkpoint_dir, *args, log):
    """train.py --synthetic started in the background, its output going to the file log."""
    command = [sys.executable, "train.py", "--synthetic", "--num-workers", "0"]
    with open(log, "w") as out:
        return subprocess.Popen(
            [*command, "--checkpoint-dir", checkpoint_dir, *SMALL, *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )


def test_a_second_run_in_the_same_folder_is_refused_and_a_killed_one_blocks_nothing(
    synthetic_run, tmp_path
):
    folder = copy_caches(synthetic_run, tmp_path)
    task = os.path.join(folder, "synthetic", "SetAnomalyDetect")
    last, log = last_of(folder), tmp_path / "first.log"
    first = start_train(folder, "--epochs", "50", "--seed", "1", log=log)
    try:
        wait_for(lambda: "Epoch 1/50:" in log.read_text() and os.path.isfile(last), first)
        second = train_in_process("--synthetic", "--checkpoint-dir", folder, *SMALL,
                                  "--retrain", "--seed", "2")  # fmt: skip
        assert first.poll() is None  # the refusal came while the first run trained
    finally:
        first.send_signal(signal.SIGKILL)  # as a crash or `kill -9` would end it
        first.wait(timeout=HANG_GUARD_S)
    assert second.returncode == 1 and second.stderr.count("\n") == 1, second.stderr
    assert f"{task} is in use by process {first.pid} (python train.py --synthetic" in second.stderr
    assert "Loaded" not in second.stdout  # refused before any work
    # Only the first run's last.ckpt and best epoch: no last-v1.ckpt of a second.
    assert sorted(os.listdir(os.path.join(task, "checkpoints")))[-1] == "last.ckpt"
    assert len(os.listdir(os.path.join(task, "checkpoints"))) <= 2

    # The killed run's lock went with it: the next run goes ahead and trains with its own seed.
    proc = train_in_process("--synthetic", "--checkpoint-dir", folder, *SMALL,
                            "--epochs", "1", "--retrain", "--seed", "2")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_results(folder)["settings"]["seed"] == 2


def test_more_devices_than_the_machine_has_is_refused_before_anything_is_deleted(
    synthetic_run, tmp_path
):
    folder = copy_caches(synthetic_run, tmp_path)
    kept = tmp_path / "synthetic" / "SetAnomalyDetect" / "checkpoints" / "last.ckpt"
    kept.parent.mkdir(parents=True)
    kept.write_bytes(b"an interrupted run's")
    proc = train_in_process("--synthetic", "--checkpoint-dir", folder, "--retrain",
                            "--devices", "99999", "--accelerator", "cpu")  # fmt: skip
    cores = len(os.sched_getaffinity(0))
    assert proc.returncode == 1 and proc.stderr == (
        f"error: --devices 99999: this machine has {cores} CPU cores to train on, a process each. "
        "Use fewer.\n"
    )
    assert kept.read_bytes() == b"an interrupted run's"


@pytest.mark.parametrize(
    "path, kind",
    [
        ("synthetic/SetAnomalyDetect.ckpt", "folder"),
        ("synthetic/SetAnomalyDetect/results.json", "folder"),
        ("synthetic/train_set_features.tar", "folder"),
        ("synthetic/SetAnomalyDetect", "file"),
        ("synthetic/SetAnomalyDetect/checkpoints", "file"),
    ],
)
def test_an_output_of_the_wrong_kind_is_one_line_before_any_work(tmp_path, path, kind):
    spoiled = tmp_path / path
    spoiled.parent.mkdir(parents=True, exist_ok=True)
    spoiled.mkdir() if kind == "folder" else spoiled.write_text("")
    proc = train_in_process("--synthetic", "--checkpoint-dir", tmp_path)
    found, wanted = kind, "file" if kind == "folder" else "folder"
    assert proc.returncode == 1 and proc.stderr == (
        f"error: {spoiled} is a {found}, where the run keeps a {wanted}. Move it away, or use "
        "another --checkpoint-dir.\n"
    )
    assert proc.stdout == ""  # no features extracted, nothing else done


class RunsCode:
    """An object whose unpickling runs code: here, it creates the file named, by a function of the
    standard library (open) or a shell command (os.system)."""

    def __init__(self, path, shell=False):
        self.path, self.shell = path, shell

    def __reduce__(self):
        return (os.system, (f"touch '{self.path}'",)) if self.shell else (open, (self.path, "w"))


def small_checkpoint(path, **extra):
    model = AnomalyPredictor(**SMALL_SET_MODEL, input_dim=512, max_iters=10)
    ckpt = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams), **extra}
    torch.save(ckpt, path)
    return ckpt


@pytest.mark.parametrize("shell, name", [(False, "io.open"), (True, "posix.system")])
def test_a_checkpoint_that_would_run_code_is_refused_and_runs_none(tmp_path, shell, name):
    marker = tmp_path / "code ran"
    path = tmp_path / "SetAnomalyDetect.ckpt"
    small_checkpoint(path, surprise=RunsCode(str(marker), shell))
    code = rf"holds a Python object \({name}\) that loading would run as code"
    with pytest.raises(ValueError, match=code):
        runs.load_model(path, AnomalyPredictor)
    assert not marker.exists()
    # And predict.py stops on it with that one line.
    with pytest.raises(SystemExit) as exit_info:
        predict.main(["--ckpt", str(path), "--set-sizes", "5"])
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message and name in message
    assert not marker.exists()


def test_a_moved_runs_last_checkpoint_is_pointed_at_its_new_folder(tmp_path):
    """Lightning keeps absolute paths in last.ckpt: after the run folder moved they name a folder
    that is gone, and Lightning would forget the best epoch. (test_train resumes a copied run.)"""
    root = Path(os.path.realpath(tmp_path))  # as ModelCheckpoint keeps its folder
    gone, here = root / "gone", root / "moved"
    here.mkdir()
    best, last = "epoch=1-step=122.ckpt", os.path.join(here, "last.ckpt")
    (here / best).write_bytes(b"")

    def states(folder):
        paths = dict(dirpath=str(folder), kth_best_model_path=str(folder / best))
        return {
            "ModelCheckpoint{'monitor': 'val_acc'}": dict(
                paths, best_model_path=str(folder / best), last_model_path="",
                best_k_models={str(folder / best): torch.tensor(0.5)},
            ),
            "ModelCheckpoint{'monitor': None}": dict(
                paths, best_model_path="", last_model_path=str(folder / "last.ckpt"),
                best_k_models={},
            ),
        }  # fmt: skip

    runs.relocate({"callbacks": states(gone), "epoch": 1}, last)
    saved = torch.load(last, weights_only=True)
    assert saved["epoch"] == 1 and saved["callbacks"] == states(here)
    # Without the best epoch's file beside it the run cannot go on as it was: one line says why.
    os.remove(here / best)
    with pytest.raises(SystemExit) as exit_info:
        runs.relocate({"callbacks": states(gone)}, last)
    assert str(exit_info.value.code) == (
        f"error: {last} continues from its best epoch {best}, which is not in {here}: copy the "
        "whole run folder, or train anew without --resume."
    )


def test_threads_follow_the_work_unless_omp_num_threads_chooses(monkeypatch):
    monkeypatch.setattr(runs, "usable_cores", lambda: 8)
    assert runs.cpu_threads("reverse") == runs.cpu_threads("seq2seq") == 1
    # The set task takes the usable cores, shared between its processes.
    assert [runs.cpu_threads("anomaly", devices) for devices in (1, 2, 3, 16)] == [8, 4, 2, 1]
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # the suite sets it (conftest.py)
        runs.use_cpu_threads("anomaly", devices=2)
        assert torch.get_num_threads() == 4
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        torch.set_num_threads(3)  # as torch reads OMP_NUM_THREADS when it loads
        runs.use_cpu_threads("reverse")
        assert torch.get_num_threads() == 3  # the user's choice stands
    finally:
        torch.set_num_threads(before)


def test_weights_that_are_not_finite_are_refused(tmp_path):
    path = tmp_path / "SetAnomalyDetect.ckpt"
    ckpt = small_checkpoint(path)
    assert runs.load_model(path, AnomalyPredictor)[0].hparams.model_dim == 32  # loads as it is
    ckpt["state_dict"]["output_net.4.bias"][0] = float("nan")
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match=r"not finite numbers \(output_net.4.bias\)"):
        runs.load_model(path, AnomalyPredictor)


def test_sigterm_stops_training_as_ctrl_c_does(synthetic_run, tmp_path):
    folder = copy_caches(synthetic_run, tmp_path)
    last = last_of(folder)
    log = tmp_path / "run.log"
    run = start_train(folder, "--epochs", "50", log=log)
    wait_for(lambda: "Epoch 1/50:" in log.read_text() and os.path.isfile(last), run)
    run.send_signal(signal.SIGTERM)
    assert run.wait(timeout=HANG_GUARD_S) == 128 + signal.SIGTERM
    output = log.read_text()
    assert "Traceback" not in output and output.rstrip().splitlines()[-1] == (
        f"Interrupted; {last} holds the run after its last finished epoch: run the same command "
        "with --resume to continue from there."
    )
    assert torch.load(last, weights_only=True)["epoch"] >= 0  # whole, and --resume reads it


@pytest.mark.parametrize("script", ["train.py", "predict.py", "visualize.py"])
def test_ctrl_c_while_the_libraries_load_is_one_line(script, tmp_path):
    run = subprocess.Popen(
        [sys.executable, script, "--checkpoint-dir", str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    time.sleep(0.5)  # torch alone takes seconds to load
    run.send_signal(signal.SIGINT)
    _, stderr = run.communicate(timeout=HANG_GUARD_S)
    assert run.returncode == 128 + signal.SIGINT
    assert stderr == "\nInterrupted while starting; nothing was written.\n"


def test_a_write_on_a_full_disk_is_one_line_and_leaves_no_half_file(tmp_path, monkeypatch):
    """What a checkpoint that Lightning copies into place raises when the disk fills up."""
    from harness import stops

    monkeypatch.setattr(signal, "signal", lambda *_: None)  # the test process keeps its handlers
    half = tmp_path / "epoch=0-step=15.ckpt"
    half.write_bytes(b"the first 454656 bytes")

    def copy_fails():
        raise OSError(errno.ENOSPC, "No space left on device", "/tmp/tmpz8y_l3tk", None, str(half))

    with pytest.raises(SystemExit) as exit_info:
        stops.run_main(copy_fails, "")
    message = str(exit_info.value.code)
    assert message.startswith(f"error: cannot write {half} (No space left on device; ")
    assert message.endswith(" MB free there)") and not half.exists()
