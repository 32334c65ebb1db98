"""A run's folder and checks (harness/lock.py, checkpoints.py, resume.py, preflight.py,
callbacks.py): one run in a folder at a time, whatever runs beside it; checkpoints read as data,
never as code, and a moved run's last.ckpt pointed at its new folder; the device a run uses."""

import errno
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

import predict
import train
from harness import callbacks, checkpoints, folders, lock, preflight, resume
from harness.preflight import pick_device
from helpers import (
    HANG_GUARD_S,
    SMALL,
    SMALL_SET_MODEL,
    RunsCode,
    assert_ran,
    copy_caches,
    last_of,
    read_results,
    start_python,
    train_in_process,
)
from model import AnomalyPredictor
from train import parse_args

# A process that takes a task's folder as a run does (lock.lock_folder), then waits.
TAKE_THE_FOLDER = """
import sys, time
from harness import lock
lock.lock_folder(sys.argv[1])
print("held", flush=True)
time.sleep(600)
"""


def test_a_second_run_in_the_same_folder_is_refused_and_a_killed_one_blocks_nothing(
    synthetic_run, tmp_path
):
    folder = copy_caches(synthetic_run, tmp_path)
    task = os.path.join(folder, "synthetic", "SetAnomalyDetect")
    # What a training that runs there has written: its last epoch.
    os.makedirs(os.path.dirname(last_of(folder)))
    Path(last_of(folder)).write_bytes(b"epoch 1")
    first = start_python("-c", TAKE_THE_FOLDER, task)
    try:
        assert first.stdout.readline() == "held\n"
        second = train_in_process("--synthetic", "--checkpoint-dir", folder, *SMALL,
                                  "--retrain", "--seed", "2")  # fmt: skip
        # The same command again: the first is live, not a training that stopped.
        again = train_in_process("--synthetic", "--checkpoint-dir", folder, *SMALL, "--seed", "1")
        assert first.poll() is None  # the refusals came while the first held the folder
    finally:
        first.send_signal(signal.SIGKILL)  # as a crash or `kill -9` would end it
        first.wait(timeout=HANG_GUARD_S)
    assert second.returncode == 1 and second.stderr.count("\n") == 1, second.stderr
    assert f"{task} is in use by process {first.pid} (python -c {task})" in second.stderr
    assert second.stdout == ""  # refused before any work
    assert again.returncode == 1 and again.stderr == second.stderr
    assert os.listdir(os.path.dirname(last_of(folder))) == ["last.ckpt"]  # nothing written

    # The killed process's lock went with it: the next run goes ahead and trains with its seed.
    proc = train_in_process("--synthetic", "--checkpoint-dir", folder, *SMALL,
                            "--epochs", "1", "--retrain", "--seed", "2")  # fmt: skip
    assert_ran(proc)
    assert read_results(folder)["settings"]["seed"] == 2


@pytest.mark.parametrize("kind", ["link", "folder"])
def test_a_lock_that_is_not_a_file_is_refused_and_never_written_through(
    synthetic_run, tmp_path, kind
):
    folder = copy_caches(synthetic_run, tmp_path / "run")
    lock = Path(folder) / "synthetic" / "SetAnomalyDetect" / ".lock"
    lock.parent.mkdir()
    notes = tmp_path / "notes.txt"
    notes.write_text("the user's notes")
    if kind == "link":
        lock.symlink_to(notes)
    else:
        lock.mkdir()
    proc = train_in_process("--synthetic", "--checkpoint-dir", folder, *SMALL, "--epochs", "1")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert (
        proc.stderr == f"error: {lock} is a {kind}, where a run keeps its lock file. Remove it.\n"
    )
    assert notes.read_text() == "the user's notes"
    assert not (lock.parent / "checkpoints").exists()  # refused before any work


def test_a_finished_run_leaves_no_lock(synthetic_run):
    task = Path(synthetic_run[0]) / "synthetic" / "SetAnomalyDetect"
    assert (task / "results.json").is_file() and not (task / ".lock").exists()


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
        checkpoints.load_model(path, AnomalyPredictor)
    assert not marker.exists()
    # And predict.py stops on it with that one line.
    with pytest.raises(SystemExit) as exit_info:
        predict.main(["--ckpt", str(path), "--set-sizes", "5"])
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message and name in message
    assert not marker.exists()


def test_hyper_parameters_that_claim_a_huge_model_are_refused_before_it_is_made(
    tmp_path, monkeypatch
):
    path = tmp_path / "SetAnomalyDetect.ckpt"
    ckpt = small_checkpoint(path)
    torch.save(dict(ckpt, hyper_parameters=dict(ckpt["hyper_parameters"], model_dim=4096)), path)
    made = []  # the models made off the meta device, where memory is spent
    init = AnomalyPredictor.__init__

    def counting_init(self, *args, **kwargs):
        made.append(torch.empty(0).device.type)
        init(self, *args, **kwargs)

    monkeypatch.setattr(AnomalyPredictor, "__init__", counting_init)
    with pytest.raises(ValueError, match="does not load into AnomalyPredictor .*model_dim|weight "):
        checkpoints.load_model(path, AnomalyPredictor)
    assert "cpu" not in made  # refused by the weights' shapes, no model of 4096 made


def test_run_settings_that_are_not_a_record_are_refused(tmp_path):
    path = tmp_path / "SetAnomalyDetect.ckpt"
    small_checkpoint(path, train_settings=[1])
    with pytest.raises(ValueError, match="holds run settings that are not a dict"):
        checkpoints.load_model(path, AnomalyPredictor)


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

    resume.relocate({"callbacks": states(gone), "epoch": 1}, last)
    saved = torch.load(last, weights_only=True)
    assert saved["epoch"] == 1 and saved["callbacks"] == states(here)
    # Without the best epoch's file beside it the run cannot go on as it was: one line says why.
    os.remove(here / best)
    with pytest.raises(SystemExit) as exit_info:
        resume.relocate({"callbacks": states(gone)}, last)
    assert str(exit_info.value.code) == (
        f"error: {last} continues from its best epoch {best}, which is not in {here}: copy the "
        "whole run folder, or train anew without --resume."
    )


def test_weights_that_are_not_finite_are_refused(tmp_path):
    path = tmp_path / "SetAnomalyDetect.ckpt"
    ckpt = small_checkpoint(path)
    assert (
        checkpoints.load_model(path, AnomalyPredictor)[0].hparams.model_dim == 32
    )  # loads as it is
    ckpt["state_dict"]["output_net.4.bias"][0] = float("nan")
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match=r"not finite numbers \(output_net.4.bias\)"):
        checkpoints.load_model(path, AnomalyPredictor)


def test_auto_device_follows_lightnings_order(monkeypatch):
    for cuda, mps, expected in [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")]:
        monkeypatch.setattr(torch.cuda, "is_available", lambda cuda=cuda: cuda)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda mps=mps: mps)
        assert pick_device("auto").type == expected
        if expected != "cpu":
            assert pick_device("gpu").type == expected


def test_lightnings_checkpoints_are_renamed_into_place_from_their_own_folder(tmp_path, monkeypatch):
    """Lightning writes a checkpoint in the system's temporary folder and moves it: a copy, where
    that is another file system, which a kill leaves half done. Here it is renamed from beside."""
    renamed = []
    replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: renamed.append((a, b)) or replace(a, b))
    path = tmp_path / "checkpoints" / "last.ckpt"
    callbacks.AtomicCheckpointIO().save_checkpoint({"epoch": 3}, path)
    assert [os.path.dirname(a) for a, b in renamed] == [str(path.parent)]
    assert torch.load(path, weights_only=True) == {"epoch": 3}
    assert os.listdir(path.parent) == ["last.ckpt"]
    trainer = train.make_trainer(parse_args([]), str(tmp_path), [])
    assert isinstance(trainer.strategy.checkpoint_io, callbacks.AtomicCheckpointIO)


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
        # TensorBoard's next log folder: as a file, the run would stop once it had begun.
        ("synthetic/SetAnomalyDetect/lightning_logs/version_1", "file"),
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


def test_a_pretrained_folder_that_is_a_file_is_one_line_before_any_work(tmp_path):
    (tmp_path / "pretrained").write_text("")
    proc = train_in_process("--task", "reverse", "--pretrained", "--checkpoint-dir", tmp_path)
    assert proc.returncode == 1 and proc.stderr == (
        f"error: {tmp_path / 'pretrained'} is a file, where the run keeps a folder. Move it away, "
        "or use another --checkpoint-dir.\n"
    )
    assert proc.stdout == ""  # nothing downloaded


def test_a_strategy_lightning_does_not_know_is_refused_before_any_work(tmp_path):
    proc = train_in_process("--synthetic", "--strategy", "dpp", "--checkpoint-dir", tmp_path)
    assert proc.returncode == 1 and proc.stderr.startswith(
        "error: --strategy dpp is not one of Lightning's (did you mean ddp?): "
    )
    assert proc.stderr.count("\n") == 1 and proc.stdout == ""  # no features extracted


def test_run_from_another_folder_it_says_where_files_go_and_where_the_model_is(
    tmp_path, monkeypatch, capsys
):
    repository, elsewhere = tmp_path / "repository", tmp_path / "elsewhere"
    model = repository / "saved_models" / "synthetic" / "SetAnomalyDetect.ckpt"
    model.parent.mkdir(parents=True)
    model.write_bytes(b"")
    elsewhere.mkdir()
    monkeypatch.setattr(folders, "ROOT", str(repository))  # where the scripts are
    monkeypatch.setattr(preflight, "ROOT", str(repository))
    monkeypatch.chdir(elsewhere)
    args = parse_args(["--synthetic"])
    preflight.say_where(args, folders.run_dir(args.checkpoint_dir, args.synthetic))
    assert capsys.readouterr().out == (
        f"Files go to {elsewhere / 'saved_models' / 'synthetic'} (--checkpoint-dir, relative to "
        "this folder).\nThis run trains a new model there, not using the one beside train.py, "
        f"{model}; to use that one instead, run with --checkpoint-dir "
        f"{repository / 'saved_models'}.\n"
    )
    monkeypatch.chdir(repository)  # in the repository: nothing to say
    preflight.say_where(args, folders.run_dir(args.checkpoint_dir, args.synthetic))
    assert capsys.readouterr().out == ""


class FakeTrainer:
    def __init__(self, world_size, global_rank):
        self.world_size, self.global_rank = world_size, global_rank


def test_each_process_is_seeded_apart_and_one_process_is_left_alone(monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "42")  # as pl.seed_everything(42) left it
    np.random.seed(7)
    before = np.random.get_state()[1].copy()
    callbacks.SeedEachProcess(42).setup(FakeTrainer(world_size=1, global_rank=0), None, "fit")
    assert np.array_equal(np.random.get_state()[1], before)  # a single run keeps its seed
    draws = []
    for rank in (0, 1):
        callbacks.SeedEachProcess(42).setup(
            FakeTrainer(world_size=2, global_rank=rank), None, "fit"
        )
        draws.append((np.random.randint(2**31), torch.randint(2**31, ()).item()))
        np.random.seed(42 + rank)  # what process `rank` is seeded with: reproducible
        torch.manual_seed(42 + rank)
        assert draws[-1] == (np.random.randint(2**31), torch.randint(2**31, ()).item())
        # The seed Lightning's DistributedSampler shuffles with stays the run's in every process.
        assert os.environ["PL_GLOBAL_SEED"] == "42"
    assert draws[0][0] != draws[1][0] and draws[0][1] != draws[1][1]


HOLD_THE_LOCK = """
import fcntl, sys, time
with open(sys.argv[1], "w") as f:
    f.write(sys.argv[2])
    f.flush()
    fcntl.flock(f, fcntl.LOCK_EX)
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.mark.skipif(lock.fcntl is None, reason="no flock here")
def test_a_lock_holders_text_is_shown_printable(tmp_path):
    task = tmp_path / "synthetic" / "SetAnomalyDetect"
    task.mkdir(parents=True)
    holder = start_python("-c", HOLD_THE_LOCK, task / ".lock", "process 7 (\x1b[31mred\x07)")
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(SystemExit) as exit_info:
            preflight.check_before_work(
                parse_args(["--synthetic", "--checkpoint-dir", str(tmp_path)])
            )
    finally:
        holder.kill()
        holder.wait()
    assert str(exit_info.value.code) == (
        f"error: {task} is in use by process 7 (?[31mred?). Wait for it to finish, or use "
        "another --checkpoint-dir."
    )


def test_resume_after_the_model_was_saved_says_what_a_plain_run_does(tmp_path):
    args = parse_args(["--synthetic", "--checkpoint-dir", str(tmp_path), "--resume"])
    saved = folders.model_file(folders.run_dir(str(tmp_path), True))
    os.makedirs(os.path.dirname(saved))
    Path(saved).write_bytes(b"")
    with pytest.raises(SystemExit) as exit_info:
        preflight.check_before_work(args)
    assert str(exit_info.value.code) == (
        f"error: --resume: the training finished and its model is saved as {saved}; nothing is "
        "left to resume. Run without --resume to evaluate it, or with --retrain to train anew."
    )


def test_a_lock_that_cannot_be_written_is_one_line_and_left_nowhere(tmp_path, monkeypatch):
    def full(f):  # a disk with no room left for the holder's line
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lock, "write_holder", full)
    folder = tmp_path / "run" / "SetAnomalyDetect"
    with pytest.raises(SystemExit) as exit_info:
        lock.lock_folder(str(folder))
    message = str(exit_info.value.code)
    assert message.startswith(f"error: cannot write {folder / '.lock'} (No space left on device; ")
    assert message.endswith(" MB free there). Free some space, or use another --checkpoint-dir.")
    assert not (tmp_path / "run").exists()  # no lock, and no folder made for it


@pytest.mark.skipif(lock.fcntl is None, reason="no flock here")
def test_a_lock_in_a_folder_made_read_only_is_let_go_without_an_error(tmp_path, monkeypatch):
    lock.lock_folder(str(tmp_path))

    def read_only(path):  # what removing a file from a read-only folder raises
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(lock.os, "remove", read_only)
    lock.release_locks()  # at exit: no "Exception ignored in atexit callback"
    monkeypatch.undo()
    assert lock.HELD_LOCKS == {} and (tmp_path / ".lock").exists()
    lock.lock_folder(str(tmp_path))  # let go: the next run takes it
    lock.release_locks()
    assert not (tmp_path / ".lock").exists()
