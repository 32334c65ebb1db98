"""The command line (harness/cli.py, commands.py): train.py's defaults, values refused with
argparse's error in one line, a mistyped flag named with the closest one, flags refused where
they mean nothing; and all of it before the large libraries load."""

import os

import pytest

from harness import commands
from helpers import run_code
from train import CHECKPOINT_PATH, DATASET_PATH, parse_args


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


def test_more_feature_workers_than_cores_are_refused(capsys):
    cores = len(os.sched_getaffinity(0))
    assert parse_args(["--num-workers", str(cores)]).num_workers == cores
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--num-workers", str(cores + 1)])
    assert exit_info.value.code == 2
    assert f"--num-workers {cores + 1}: this process may use {cores} CPU" in capsys.readouterr().err


def test_a_mistyped_flag_names_the_closest_one_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--synthtic", "--epocs", "3"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert err == (
        "train.py: error: unrecognized arguments: --synthtic --epocs 3; did you mean --synthetic, "
        "--epochs? (`python train.py -h` lists every flag)\n"
    )


def test_a_flag_is_taken_only_as_spelled_in_full(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--synthetic", "--epoch", "3"])  # argparse would read --epochs 3
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --epoch 3; did you mean --epochs?" in capsys.readouterr().err


# A command run as a user runs it, with -h or a mistyped flag, reporting what it had imported.
ANSWER = """
import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    print("torch loaded" if "torch" in sys.modules else "torch not loaded", file=sys.stderr)
"""
COMMANDS = ["train.py", "predict.py", "visualize.py", "bench.py"]


@pytest.mark.parametrize("script", COMMANDS)
@pytest.mark.parametrize("argv", [["-h"], ["--synthtic"]])
def test_help_and_a_mistyped_flag_answer_before_torch_loads(script, argv):
    proc = run_code(ANSWER, script, *argv)
    assert proc.returncode == (0 if argv == ["-h"] else 2), proc.stderr
    assert proc.stderr.endswith("torch not loaded\n")
    if argv == ["-h"]:
        assert proc.stdout.startswith(f"usage: {script}")
    else:
        assert proc.stderr.startswith(f"{script}: error: unrecognized arguments: --synthtic")


def test_a_bad_value_answers_before_torch_loads():
    proc = run_code(ANSWER, "train.py", "--epochs", "0")
    assert proc.returncode == 2 and proc.stderr.endswith("torch not loaded\n")
    assert "argument --epochs: must be at least 1, got 0" in proc.stderr


@pytest.mark.parametrize(
    "script, mistyped, meant",
    [("predict.py", "--jsn", "--json"), ("visualize.py", "--synthtic", "--synthetic"),
     ("bench.py", "--ablaton", "--ablation"), ("train.py", "--retrian", "--retrain")],
)  # fmt: skip
def test_every_command_names_the_flag_meant(script, mistyped, meant):
    proc = run_code(ANSWER, script, mistyped)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 2  # the line, and the import note
    assert f"did you mean {meant}? (`python {script} -h` lists every flag)" in proc.stderr


@pytest.mark.parametrize("parser", [commands.predict_parser, commands.visualize_parser])
def test_the_other_commands_name_train_pys_folders_as_their_defaults(parser):
    help_text = " ".join(parser("").format_help().split())
    assert f"(default: train.py's CHECKPOINT_PATH, {CHECKPOINT_PATH})" in help_text
    if parser is commands.visualize_parser:
        assert f"(default: train.py's DATASET_PATH, {DATASET_PATH})" in help_text
