"""The command line (cli.py): the post's and the tutorial's defaults, values refused with
argparse's error, flags refused where they mean nothing; and check_before_work's refusals,
made before anything is computed or deleted."""

import os

import pytest

from harness.cli import parse_args
from helpers import copy_caches, train_in_process


def test_defaults_are_the_posts_run():
    args = parse_args([])
    assert (
        args.task,
        args.set_size,
        args.batch_size,
        args.model_dim,
        args.num_heads,
        args.num_layers,
    ) == ("anomaly", 10, 64, 256, 4, 4)
    assert (
        args.dropout,
        args.input_dropout,
        args.lr,
        args.warmup,
        args.epochs,
        args.gradient_clip_val,
    ) == (0.1, 0.1, 5e-4, 100, 100, 2.0)
    assert (args.seed, args.data_dir, args.checkpoint_dir) == (42, "datasets", "saved_models")
    # Feature extraction's workers: the post's 4, but never more than this machine's cores.
    assert args.num_workers == min(4, len(os.sched_getaffinity(0)))


@pytest.mark.parametrize(
    "argv",
    [
        ["--epochs", "0"],
        ["--set-size", "1"],
        ["--model-dim", "10", "--num-heads", "4"],
        ["--dropout", "1"],
        ["--dropout", "-0.1"],
        ["--input-dropout", "1.5"],
        ["--lr", "0"],
        ["--lr", "inf"],
        ["--gradient-clip-val", "nan"],
        ["--batch-size", "0"],
        ["--task", "other"],
        ["--num-workers", "-1"],
        ["--seed", "-1"],
        ["--seed", str(2**32)],
        ["--fast-dev-run", "--resume"],
        ["--checkpoint-dir", ""],
        ["--checkpoint-dir", __file__],
        ["--data-dir", __file__],
    ],
)
def test_invalid_values_get_an_argparse_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_sequence_tasks_have_the_tutorials_defaults():
    args = parse_args(["--task", "reverse"])
    assert (
        args.batch_size,
        args.model_dim,
        args.num_heads,
        args.num_layers,
        args.dropout,
        args.lr,
        args.warmup,
        args.epochs,
        args.gradient_clip_val,
    ) == (128, 32, 1, 1, 0.0, 5e-4, 50, 10, 5.0)
    assert parse_args(["--task", "seq2seq", "--epochs", "3"]).epochs == 3


@pytest.mark.parametrize(
    "argv", [["--task", "reverse", "--synthetic"], ["--task", "seq2seq", "--set-size", "5"]]
)
def test_anomaly_only_flags_are_refused_for_sequence_tasks(argv):
    with pytest.raises(SystemExit):
        parse_args(argv)


@pytest.mark.parametrize(
    "argv",
    [
        ["--retrain"],
        ["--resume"],
        ["--synthetic"],
        ["--model-dim", "128"],
        ["--epochs", "3"],
        ["--set-size", "5"],
        ["--compile"],
        ["--task", "seq2seq"],
    ],
)
def test_flags_it_cannot_honour_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--pretrained", *argv])
    assert exit_info.value.code == 2 and "--pretrained" in capsys.readouterr().err


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


def test_more_feature_workers_than_cores_are_refused(capsys):
    cores = len(os.sched_getaffinity(0))
    assert parse_args(["--num-workers", str(cores)]).num_workers == cores
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--num-workers", str(cores + 1)])
    assert exit_info.value.code == 2
    assert f"--num-workers {cores + 1}: this process may use {cores} CPU" in capsys.readouterr().err
