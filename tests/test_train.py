"""train.py end to end: flags, the --synthetic pipeline, the saved-model path, --resume, several
processes, precision and compilation, errors."""

import errno
import json
import math
import os
import re
import shutil
import signal
import types

import pytest
import pytorch_lightning as pl
import torch

import train
from data import anomaly_datasets
from harness import callbacks, checkpoints, fast, preflight
from harness.fast import SetBatches
from harness.preflight import pick_device
from helpers import (
    RESUMED,
    SMALL_RUN,
    SMALL_SET_MODEL,
    assert_ran,
    clustered_features,
    copy_caches,
    last_of,
    randomise,
    read_results,
    recomputed_accuracies,
    run_code,
    run_train,
    train_in_process,
)
from model import AnomalyPredictor
from train import parse_args

SPLITS = ("train", "val", "test")
CACHES = ("train", "test")  # the feature caches: the val sets come from the train split


def test_a_run_into_a_file_is_short_and_ends_with_its_results(synthetic_run):
    checkpoint_dir, proc = synthetic_run
    lines = proc.stdout.splitlines()
    assert len(lines) <= 40 and "\r" not in proc.stdout, proc.stdout
    results = os.path.join(checkpoint_dir, "synthetic", "SetAnomalyDetect", "results.json")
    assert lines[-4:-1] == [
        f"{split.capitalize() + ' accuracy:':16s}{100 * acc:.2f}%"
        for split, acc in ((s, read_results(checkpoint_dir)[f"{s}_acc"]) for s in SPLITS)
    ]
    assert lines[-1] == f"Results written to {results}"
    # Each stage says what it does; nothing but the run's own lines (no warning, tip or banner).
    assert [line.split()[0] for line in lines] == (
        ["Extracting"] * 2 + ["Training", "Epoch", "Epoch", "Saved"] + ["Train", "Val", "Test"]
        + ["Results"]
    )  # fmt: skip
    assert lines[3].startswith("Epoch 1/2: train acc ") and lines[4].startswith("Epoch 2/2: ")


def test_synthetic_run_writes_results_and_a_loadable_model(synthetic_run):
    checkpoint_dir, proc = synthetic_run
    results = read_results(checkpoint_dir)
    recomputed = recomputed_accuracies(checkpoint_dir)  # the saved model's, without Lightning
    for key in ("train_acc", "val_acc", "test_acc"):
        assert results[key] == pytest.approx(recomputed[key], abs=1e-6)
        assert f"{key.split('_')[0].capitalize()} accuracy:" in proc.stdout
    assert results["trained"] is True and results["settings"]["synthetic"] is True
    assert set(results["seconds"]) >= {"features", "train", "evaluate", "total"}
    assert {"torch", "torchvision", "pytorch_lightning"} <= set(results["versions"])
    assert results["cpu_threads"] == int(os.environ["OMP_NUM_THREADS"])  # 1: conftest.py sets it
    synthetic_dir = os.path.join(checkpoint_dir, "synthetic")
    assert {"train_set_features.tar", "test_set_features.tar", "SetAnomalyDetect.ckpt"} <= set(
        os.listdir(synthetic_dir)
    )
    assert os.listdir(checkpoint_dir) == ["synthetic"]  # nothing mixes with a real run's files
    logs = os.path.join(synthetic_dir, "SetAnomalyDetect", "lightning_logs")
    assert any(f.startswith("events.out.tfevents") for _, _, files in os.walk(logs) for f in files)
    model = AnomalyPredictor.load_from_checkpoint(
        os.path.join(synthetic_dir, "SetAnomalyDetect.ckpt")
    )
    assert model.hparams.model_dim == 256 and model.hparams.num_layers == 4


def test_second_run_loads_the_saved_model_and_only_evaluates(synthetic_run, tmp_path):
    checkpoint_dir, first = shutil.copytree(synthetic_run[0], tmp_path / "run"), synthetic_run[1]
    ckpt = os.path.join(checkpoint_dir, "synthetic", "SetAnomalyDetect.ckpt")
    mtime, training = os.path.getmtime(ckpt), read_results(checkpoint_dir)
    proc = train_in_process("--synthetic", "--checkpoint-dir", checkpoint_dir)
    assert_ran(proc)
    assert "Found the saved model" in proc.stdout and "Epoch" not in proc.stdout + proc.stderr
    assert os.path.getmtime(ckpt) == mtime
    # results.json stays the training's record; the evaluation is recorded apart.
    assert read_results(checkpoint_dir) == training and training["trained"] is True
    evaluation = os.path.join(checkpoint_dir, "synthetic", "SetAnomalyDetect", "evaluation.json")
    assert proc.stdout.splitlines()[-1] == f"Results written to {evaluation}"
    with open(evaluation) as f:
        evaluation = json.load(f)
    assert evaluation["trained"] is False
    # All three evaluations are on fixed sets, so the same model scores the same on them.
    assert accuracy_lines(proc) == accuracy_lines(first)
    assert all(evaluation[f"{s}_acc"] == training[f"{s}_acc"] for s in SPLITS)
    # And an evaluation adds nothing to the training's logs.
    logs = os.path.join(checkpoint_dir, "synthetic", "SetAnomalyDetect", "lightning_logs")
    assert os.listdir(logs) == ["version_0"]


def accuracy_lines(proc):
    return [line for line in proc.stdout.splitlines() if " accuracy:" in line]


def test_a_run_is_the_same_whether_or_not_the_feature_caches_were_there(synthetic_run, tmp_path):
    checkpoint_dir = copy_caches(synthetic_run, tmp_path)  # the shared run extracted them first
    proc = train_in_process("--synthetic", "--checkpoint-dir", checkpoint_dir)
    assert_ran(proc)
    assert "Loaded the train features" in proc.stdout
    assert accuracy_lines(proc) == accuracy_lines(synthetic_run[1])


def test_saved_model_with_other_settings_stops_with_a_message(synthetic_run, tmp_path):
    checkpoint_dir = shutil.copytree(synthetic_run[0], tmp_path / "run")
    proc = train_in_process("--synthetic", "--checkpoint-dir", checkpoint_dir, "--model-dim", "128")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "--model-dim 256 (asked 128)" in proc.stderr and "--retrain" in proc.stderr


def test_unreadable_saved_model_stops_with_a_message(synthetic_run, tmp_path):
    checkpoint_dir = copy_caches(synthetic_run, tmp_path)
    (tmp_path / "synthetic" / "SetAnomalyDetect.ckpt").write_bytes(b"not a checkpoint")
    proc = train_in_process("--synthetic", "--checkpoint-dir", checkpoint_dir)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "SetAnomalyDetect.ckpt cannot be read" in proc.stderr and "--retrain" in proc.stderr


def test_fast_dev_run_saves_nothing(synthetic_run, tmp_path):
    checkpoint_dir = copy_caches(synthetic_run, tmp_path)
    proc = train_in_process("--synthetic", "--checkpoint-dir", checkpoint_dir, "--fast-dev-run")
    assert_ran(proc)
    assert "Test accuracy:" in proc.stdout
    written = [f for _, _, files in os.walk(checkpoint_dir) for f in files if f != ".lock"]
    # No model, no results.
    assert sorted(written) == ["test_set_features.tar", "train_set_features.tar"]


def stop_at(monkeypatch, module, name):
    """Makes module.name raise KeyboardInterrupt, as Ctrl-C or SIGTERM would at that moment."""

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, name, stop)


def test_results_json_always_describes_the_saved_model(synthetic_run, tmp_path, monkeypatch):
    checkpoint_dir = str(shutil.copytree(synthetic_run[0], tmp_path / "run"))
    assert read_results(checkpoint_dir)["settings"]["epochs"] == 2  # the first model's record
    retrain = ["--synthetic", "--checkpoint-dir", checkpoint_dir, *SMALL_RUN, "--epochs", "3"]
    stop_at(monkeypatch, train, "evaluate")  # stopped once the new model is saved
    with pytest.raises(KeyboardInterrupt):
        train_in_process(*retrain, "--retrain")
    monkeypatch.undo()
    task = os.path.join(checkpoint_dir, "synthetic", "SetAnomalyDetect")
    assert os.path.isfile(task + ".ckpt") and not os.path.exists(os.path.join(task, "results.json"))
    # The rerun evaluates the new model and writes its record.
    proc = train_in_process(*retrain)
    assert proc.returncode == 0 and "Found the saved model" in proc.stdout
    record = read_results(checkpoint_dir)
    assert record["settings"]["epochs"] == 3 and record["settings"]["model_dim"] == 32
    assert not os.path.exists(os.path.join(task, "evaluation.json"))
    assert f"Test accuracy:  {100 * record['test_acc']:.2f}%" in proc.stdout


def test_a_stop_while_saving_keeps_the_training_and_says_how_to_save_it(
    synthetic_run, tmp_path, monkeypatch
):
    checkpoint_dir = copy_caches(synthetic_run, tmp_path)
    command = ["--synthetic", "--checkpoint-dir", checkpoint_dir, *SMALL_RUN, "--epochs", "1"]
    stop_at(monkeypatch, checkpoints, "save_model")
    with pytest.raises(KeyboardInterrupt) as stop:
        train_in_process(*command)
    monkeypatch.undo()
    assert "--resume" in str(stop.value) and os.path.isfile(last_of(checkpoint_dir))
    # The same command never deletes the finished training: it says how to keep it.
    proc = train_in_process(*command)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and "--resume" in proc.stderr
    assert os.path.isfile(last_of(checkpoint_dir)) and "Epoch" not in proc.stdout
    proc = train_in_process(*command, "--resume")  # saves the best epoch, trains no more
    assert_ran(proc)
    assert "Saved the best epoch" in proc.stdout and "Epoch 1/1" not in proc.stdout
    assert read_results(checkpoint_dir)["trained"] is True
    # Finished and saved: nothing is left to resume, and the message says what a plain run does.
    proc = train_in_process(*command, "--resume")
    assert proc.returncode == 1 and "the training finished and its model is saved" in proc.stderr
    assert "Run without --resume to evaluate it" in proc.stderr


def val_accuracies(output):
    return [float(line.split("val acc ")[1].split("%")[0]) for line in output.splitlines()
            if line.startswith("Epoch ")]  # fmt: skip


def files_of(folder):
    return {(path, os.path.getmtime(os.path.join(path, f)), f) for path, _, fs in os.walk(folder)
            for f in fs}  # fmt: skip


def test_ctrl_c_in_training_keeps_the_last_epoch_and_says_how_to_resume(interrupted_run, tmp_path):
    folder, run = interrupted_run
    assert run.returncode == 128 + signal.SIGINT and "Traceback" not in run.stderr
    assert run.stderr.strip() == (
        f"Interrupted; {last_of(folder)} holds the run after its last finished epoch: run the "
        "same command with --resume to continue from there."
    )
    assert torch.load(last_of(folder), weights_only=True)["global_step"] == 990 // 16
    assert not os.path.exists(os.path.join(folder, "synthetic", "SetAnomalyDetect.ckpt"))
    proc = train_in_process("--synthetic", "--checkpoint-dir", tmp_path, "--resume")
    assert proc.returncode == 1
    assert re.match("error: --resume found no .*last.ckpt to continue from", proc.stderr)


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--epochs", "2"], ["--epochs 3 (asked 2)"]),
        (["--seed", "7", "--gradient-clip-val", "1"],
         ["--gradient-clip-val 2.0 (asked 1.0)", "--seed 42 (asked 7)"]),
    ],
)  # fmt: skip
def test_resume_refuses_settings_other_than_the_interrupted_runs(
    interrupted_run, tmp_path, flags, named
):
    folder = shutil.copytree(interrupted_run[0], tmp_path / "run")
    proc = train_in_process(*RESUMED, "--checkpoint-dir", folder, *flags, "--resume")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith(f"error: {last_of(folder)} was trained with other settings")
    assert all(difference in proc.stderr for difference in named)
    assert "max_iters" not in proc.stderr and "steps" not in proc.stderr  # no name the user set


def check_resumed(proc, interrupted, folder):
    """The resumed run went on at epoch 2, kept the best epoch of all three and its folder tidy."""
    assert_ran(proc)
    output = proc.stdout + proc.stderr
    assert "epochs of 61 steps, from epoch 2" in output
    assert "Epoch 1/3:" not in output and "Epoch 2/3:" in output and "Epoch 3/3:" in output
    assert "warning" not in output.lower()
    best = max(val_accuracies(interrupted.stdout) + val_accuracies(proc.stdout))
    assert f"Saved the best epoch (val acc {best:.2f}%)" in proc.stdout
    # The training finished and its model is saved: its checkpoints are gone, nothing to resume.
    assert not os.path.exists(os.path.dirname(last_of(folder)))
    assert read_results(folder)["trained"] is True


def test_resume_without_its_best_epoch_is_refused_before_training(interrupted_run, tmp_path):
    folder = shutil.copytree(interrupted_run[0], tmp_path / "run")
    checkpoints = os.path.dirname(last_of(folder))
    (best,) = [f for f in os.listdir(checkpoints) if f.startswith("epoch=")]
    os.remove(os.path.join(checkpoints, best))
    proc = train_in_process(*RESUMED, "--checkpoint-dir", folder, "--resume")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert f"continues from its best epoch {best}, which is not in" in proc.stderr
    assert "Epoch" not in proc.stdout  # before any training


def test_resume_refuses_another_strategy(interrupted_run, tmp_path):
    folder = shutil.copytree(interrupted_run[0], tmp_path / "run")
    proc = train_in_process(*RESUMED, "--checkpoint-dir", folder, "--strategy", "ddp", "--resume")
    assert proc.returncode == 1 and "--strategy auto (asked ddp)" in proc.stderr


def test_a_copied_run_resumes_on_its_own_and_ends_where_the_uninterrupted_one_ends(
    synthetic_run, interrupted_run, tmp_path
):
    original, interrupted = interrupted_run
    copy = str(shutil.copytree(original, tmp_path / "copy"))
    before = files_of(original)
    resumed = train_in_process(*RESUMED, "--checkpoint-dir", copy, "--resume")
    check_resumed(resumed, interrupted, copy)
    assert files_of(original) == before  # it read and wrote nothing of the run it came from
    # One CPU thread (conftest), the same seed and caches: the same draws, the same model.
    whole = copy_caches(synthetic_run, tmp_path / "whole")
    proc = train_in_process(*RESUMED, "--checkpoint-dir", whole)
    assert_ran(proc)
    for split in SPLITS:
        assert read_results(copy)[f"{split}_acc"] == read_results(whole)[f"{split}_acc"]
    models = [os.path.join(f, "synthetic", "SetAnomalyDetect.ckpt") for f in (copy, whole)]
    weights = [torch.load(m, weights_only=True)["state_dict"] for m in models]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[1])


@pytest.mark.parametrize("task, name", [("reverse", "ReverseTask"), ("seq2seq", "Seq2SeqTask")])
def test_sequence_task_runs_through_train_py(task, name, tmp_path):
    proc = train_in_process("--task", task, "--checkpoint-dir", tmp_path, "--fast-dev-run")
    assert_ran(proc)
    assert (
        "Val accuracy:" in proc.stdout
        and "Test accuracy:" in proc.stdout
        and "Train accuracy" not in proc.stdout
    )
    assert not os.path.exists(tmp_path / f"{name}.ckpt")


def test_fast_synthetic_run(synthetic_run, fast_synthetic_run):
    checkpoint_dir, proc = fast_synthetic_run  # begun with the faithful feature caches alone
    # The post's features are there too: the run says why its numbers differ from theirs.
    faithful = [os.path.join(checkpoint_dir, "synthetic", f"{s}_set_features.tar") for s in CACHES]
    named = " and ".join(faithful)  # each split's, the train split's too
    assert f"These are --fast's features; the post's, in {named}, differ slightly" in proc.stdout
    # The fast path makes caches of its own, beside the faithful ones, which it leaves alone.
    synthetic_dir = os.path.join(checkpoint_dir, "synthetic")
    assert {"train_set_features_fast.tar", "test_set_features_fast.tar"} <= set(
        os.listdir(synthetic_dir)
    )
    faithful_cache = os.path.join(synthetic_run[0], "synthetic", "test_set_features.tar")
    assert torch.equal(
        torch.load(os.path.join(synthetic_dir, "test_set_features.tar"))["features"],
        torch.load(faithful_cache)["features"],
    )
    results = read_results(checkpoint_dir)
    assert results["settings"]["fast"] is True
    assert results["test_acc"] == pytest.approx(recomputed_accuracies(checkpoint_dir)["test_acc"])
    model = AnomalyPredictor.load_from_checkpoint(
        os.path.join(checkpoint_dir, "synthetic", "SetAnomalyDetect.ckpt")
    )
    assert list(model.state_dict()) == list(AnomalyPredictor(**model.hparams).state_dict())


@pytest.mark.parametrize("fast", [False, True])
def test_ddp_trains_on_two_processes_and_evaluates_on_one(synthetic_run, tmp_path, request, fast):
    fast_run = request.getfixturevalue("fast_synthetic_run") if fast else None
    checkpoint_dir = copy_caches(synthetic_run, tmp_path, fast_run)
    ddp_args = ["--accelerator", "cpu", "--devices", "2", "--strategy", "ddp"]
    fast_flag = ["--fast"] if fast else []
    proc = run_train(
        "--synthetic", "--checkpoint-dir", checkpoint_dir, *ddp_args, *fast_flag, *SMALL_RUN
    )
    assert_ran(proc)
    assert "warning" not in (proc.stdout + proc.stderr).lower()
    # The first process alone prints; a second one took part, as the step count below shows.
    assert proc.stdout.count(" train features ") == 1
    assert proc.stdout.count("Test accuracy:") == 1
    ddp = read_results(checkpoint_dir)
    # Each process took its half of the 990 training anomalies an epoch: ceil(990 / 2) // 64 steps.
    assert f"2 epochs of {495 // 64} steps" in proc.stdout
    # The saved model's accuracy over the full, fixed sets, computed here without Lightning: the
    # same numbers.
    recomputed = recomputed_accuracies(checkpoint_dir)
    for key in ("train_acc", "val_acc", "test_acc"):
        assert ddp[key] == pytest.approx(recomputed[key], abs=1e-6)


class EpochRecord(pl.Callback):
    """Writes, in each process, what it trained on in an epoch: its steps, every anomaly, and where
    the other images of its first batch's sets sit in their class's list."""

    def __init__(self, out_dir, datasets):
        self.out_dir, self.datasets, self.anomalies, self.positions = out_dir, datasets, [], None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        sets = batch[1]
        self.anomalies += sets[:, -1].tolist()
        if self.positions is None:
            by_label = self.datasets["train"].img_idx_by_label
            position = {int(i): p for row in by_label for p, i in enumerate(row)}
            self.positions = [[position[int(i)] for i in row[:-1]] for row in sets]

    def on_train_epoch_end(self, trainer, module):
        record = dict(steps=trainer.global_step, anomalies=self.anomalies, positions=self.positions)
        with open(os.path.join(self.out_dir, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump(record, f)


@pytest.mark.parametrize("fast", [False, True])
def test_each_process_trains_on_its_half_and_draws_its_own_sets(tmp_path, fast):
    flags = ["--accelerator", "cpu", "--devices", "2", "--strategy", "ddp", "--batch-size", "8"]
    args = parse_args([*flags, *SMALL_RUN, "--epochs", "1"] + (["--fast"] if fast else []))
    pl.seed_everything(args.seed, verbose=False)
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(10).repeat(100)
    feats = torch.randn(len(labels), 16, generator=g)
    datasets = anomaly_datasets(feats, labels, feats[:100], labels[:100], 10)
    loaders = train.make_loaders(args, datasets, torch.device("cpu"))
    model = AnomalyPredictor(**train.model_hparams(args, dict(input_dim=16, num_classes=1), 1))
    # Two processes with Lightning's sampler, seeding and process group, as train.py's DDP makes
    # them, only forked from this one rather than started anew (seconds of imports each).
    trainer = train.make_trainer(
        args, tmp_path, [EpochRecord(tmp_path, datasets)], strategy="ddp_fork",
        limit_val_batches=0, logger=False,
    )  # fmt: skip
    environ = dict(os.environ)
    try:
        trainer.fit(model, loaders["train"])
    finally:  # the DDP variables Lightning sets here (MASTER_PORT, ...) are not for later tests
        os.environ.clear()
        os.environ.update(environ)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # Each process takes every other anomaly of the epoch (the first ones padded to an even count)
    # in whole batches, and none that the other took.
    steps = math.ceil(len(datasets["train"]) / 2) // 8
    assert [r["steps"] for r in ranks] == [steps, steps]
    assert [len(r["anomalies"]) for r in ranks] == [8 * steps, 8 * steps]
    assert not set(ranks[0]["anomalies"]) & set(ranks[1]["anomalies"])
    # Each draws its own images around them: Lightning seeds both processes alike, which would
    # give the k-th set of each the same random positions.
    assert ranks[0]["positions"] != ranks[1]["positions"]


@pytest.mark.parametrize("accelerator", ["cuda", "gpu", "mps"])
def test_a_missing_accelerator_is_one_line(tmp_path, monkeypatch, accelerator):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        pick_device(accelerator)
    message = str(exit_info.value.code)
    assert message.startswith("error: --accelerator") and "\n" not in message
    # And the whole run says just that, before it makes any folder.
    proc = train_in_process("--accelerator", accelerator, "--checkpoint-dir", tmp_path)
    assert proc.returncode == 1 and proc.stderr.strip() == message and proc.stdout == ""
    assert os.listdir(tmp_path) == []


def test_bf16_mixed_precision_synthetic_run(synthetic_run, tmp_path):
    checkpoint_dir = copy_caches(synthetic_run, tmp_path)
    args = [
        "--synthetic",
        "--checkpoint-dir",
        checkpoint_dir,
        "--precision",
        "bf16-mixed",
        *SMALL_RUN,
    ]
    proc = train_in_process(*args)
    assert_ran(proc)
    assert "on cpu in bf16-mixed precision: 2 epochs" in proc.stdout
    results = read_results(checkpoint_dir)
    assert results["settings"]["precision"] == "bf16-mixed"
    # Tested in bf16 too: a few of the 200 test sets' closest logits may rank otherwise than in
    # float32.
    recomputed = recomputed_accuracies(checkpoint_dir)
    for key in ("train_acc", "val_acc", "test_acc"):
        assert results[key] == pytest.approx(recomputed[key], abs=0.03)


def compile_pair(parts, dropout=0.0):
    """An eager model and a copy whose training forward is compiled (with the quick aot_eager
    backend: the same graph capture, forward and backward, without generating code)."""
    torch.manual_seed(0)
    hparams = dict(SMALL_SET_MODEL, input_dim=16, max_iters=10, dropout=dropout, input_dropout=0.0)
    eager = randomise(fast.use_fast_path(AnomalyPredictor(**hparams), parts))
    compiled = fast.use_fast_path(AnomalyPredictor(**hparams), parts)
    compiled.load_state_dict(eager.state_dict())
    fast.compile_training_forward(compiled, torch.device("cpu"), backend="aot_eager")
    return eager, compiled


@pytest.mark.parametrize("flags", [["--compile"], ["--fast", "--compile"]])
def test_compiled_training_step_is_one_graph_and_matches_eager(flags):
    args = parse_args(flags)
    expected = {"attention", "adam"} if args.fast else set()  # --compile keeps PyTorch's dropout
    assert set(fast.model_parts(args.fast, args.compile)) == expected
    eager, compiled = compile_pair(fast.model_parts(args.fast, args.compile))
    x, labels = torch.randn(4, 10, 16), torch.full((4,), 9)
    for model in (eager, compiled):
        model.train()
        loss = torch.nn.functional.cross_entropy(model.anomaly_logits(x), labels)
        loss.backward()  # fullgraph=True: any graph break would have raised
    torch.testing.assert_close(compiled.anomaly_logits(x), eager.anomaly_logits(x))
    for p, q in zip(eager.parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4)
    # The CPU's numpy-drawn dropout masks would break the graph: that is why --compile drops them.
    _, with_bit_masks = compile_pair(fast.MODEL_PARTS, dropout=0.1)
    with pytest.raises(Exception, match="(?i)graph break|unsupported|numpy"):
        with_bit_masks.train().anomaly_logits(x)


def test_compiled_synthetic_run(synthetic_run, tmp_path):
    checkpoint_dir = copy_caches(synthetic_run, tmp_path)
    args = ["--synthetic", "--checkpoint-dir", checkpoint_dir, "--compile", *SMALL_RUN]
    proc = train_in_process(*args)
    assert_ran(proc)
    results = read_results(checkpoint_dir)
    assert results["settings"]["compile"] is True
    recomputed = recomputed_accuracies(checkpoint_dir)
    for key in ("train_acc", "val_acc", "test_acc"):
        assert results[key] == pytest.approx(recomputed[key], abs=1e-6)


def test_an_unwritable_checkpoint_dir_or_a_strategy_lightning_refuses_is_one_line(tmp_path):
    under_a_file = tmp_path / "file"
    under_a_file.write_text("")
    # The script itself: its whole output is that one line.
    proc = run_train("--task", "reverse", "--checkpoint-dir", under_a_file / "models")
    assert proc.returncode == 1 and proc.stderr.startswith("error: --checkpoint-dir: cannot write")
    assert proc.stderr.count("\n") == 1 and proc.stdout == ""
    proc = train_in_process(
        "--task", "reverse", "--strategy", "nonsense", "--checkpoint-dir", tmp_path
    )
    assert proc.returncode == 1 and proc.stderr.startswith("error: ") and "nonsense" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_fast_with_several_devices_samples_on_the_device():
    feats, labels = clustered_features(10, 50, 4, seed=0)  # 5 per class for validation
    datasets = anomaly_datasets(feats, labels, feats, labels, set_size=5)
    args = parse_args(["--fast", "--devices", "2", "--strategy", "ddp"])
    loaders = train.make_loaders(args, datasets, torch.device("cpu"))
    assert all(isinstance(loader, SetBatches) for loader in loaders.values())


def test_offline_the_message_names_what_runs_without_downloads(tmp_path, monkeypatch):
    # A proxy on a closed local port makes every download fail at once, whatever the network.
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    data = tmp_path / "datasets"
    proc = train_in_process("--data-dir", data, "--checkpoint-dir", tmp_path / "models")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "CIFAR-100" in proc.stderr and "resnet34-b627a593.pth" in proc.stderr
    assert "python train.py --synthetic" in proc.stderr and "--pretrained" in proc.stderr
    assert not data.exists()  # no empty folder left for a download that never came


# train.py as a user starts it, stopped by `how` as the epoch that improves on the best ends
# (epoch 2 of WINDOW_RUN: val 19.09 %, then 29.09 %): its best checkpoint written, last.ckpt not
# yet.
WINDOW_RUN = ["--synthetic", *SMALL_RUN, "--epochs", "3", "--lr", "3e-3", "--warmup", "5"]
STOPPED_IN_THE_WINDOW = """
import errno, os, runpy, signal, sys
from harness import callbacks
how, save = sys.argv.pop(1), callbacks.AtomicCheckpointIO.save_checkpoint
def save_or_stop(self, checkpoint, path, storage_options=None):
    if str(path).endswith("last.ckpt") and checkpoint["epoch"] == 1:
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if how == "term":
            os.kill(os.getpid(), signal.SIGTERM)
    return save(self, checkpoint, path, storage_options)
callbacks.AtomicCheckpointIO.save_checkpoint = save_or_stop
runpy.run_path("train.py", run_name="__main__")
"""


def model_weights(checkpoint_dir):
    path = os.path.join(checkpoint_dir, "synthetic", "SetAnomalyDetect.ckpt")
    return torch.load(path, weights_only=True)["state_dict"]


@pytest.mark.parametrize("how", ["kill", "term", "full"])
def test_a_stop_between_the_best_and_the_last_checkpoint_can_be_resumed(
    synthetic_run, tmp_path, monkeypatch, how
):
    folder = copy_caches(synthetic_run, tmp_path / "run")
    flags = [*WINDOW_RUN, "--num-workers", "0", "--checkpoint-dir", folder]
    if how == "full":  # in this process: last.ckpt cannot be written, as on a full disk
        save = callbacks.AtomicCheckpointIO.save_checkpoint

        def fail(io, checkpoint, path, storage_options=None):
            if str(path).endswith("last.ckpt") and checkpoint["epoch"] == 1:
                raise OSError(errno.ENOSPC, "No space left on device")
            return save(io, checkpoint, path, storage_options)

        monkeypatch.setattr(callbacks.AtomicCheckpointIO, "save_checkpoint", fail)
        with pytest.raises(OSError):
            train_in_process(*flags)
        monkeypatch.undo()
    else:  # a kill -9, or SIGTERM as a scheduler sends it, to the script as a user starts it
        stopped = run_code(STOPPED_IN_THE_WINDOW, how, *flags)
        assert stopped.returncode == {"kill": -9, "term": 143}[how], stopped.stderr
        assert "Traceback" not in stopped.stderr and "Epoch 2/3" in stopped.stdout
        if how == "term":  # as Ctrl-C: one line, naming what --resume continues from
            assert stopped.stderr.rstrip().splitlines()[-1] == (
                f"Interrupted; {last_of(folder)} holds the run after its last finished epoch: "
                "run the same command with --resume to continue from there."
            )
    checkpoints = os.path.dirname(last_of(folder))
    whole = copy_caches(synthetic_run, tmp_path / "whole")
    assert train_in_process(*WINDOW_RUN, "--checkpoint-dir", whole).returncode == 0
    # The next command, in place or moved, continues it and ends where the uninterrupted run ends.
    places = [folder] + [shutil.copytree(folder, tmp_path / "moved")] * (how == "kill")
    for place in places:
        resumed = train_in_process(*WINDOW_RUN, "--checkpoint-dir", place, "--resume")
        assert resumed.returncode == 0, resumed.stderr
        assert "from epoch 2" in resumed.stdout and "Epoch 3/3" in resumed.stdout
        expected, weights = model_weights(whole), model_weights(place)
        assert all(torch.equal(weights[k], expected[k]) for k in expected)
    assert not os.path.exists(checkpoints)  # the training is saved: its checkpoints went


def test_a_diverging_training_stops_with_one_line_at_the_first_non_finite_loss(
    synthetic_run, tmp_path
):
    folder = copy_caches(synthetic_run, tmp_path)
    proc = train_in_process("--synthetic", "--checkpoint-dir", folder, "--lr", "1e30")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert re.match(
        r"error: the training diverged: its loss became (nan|inf) at epoch 1, step \d+, with --lr "
        r"1e\+30\. Its checkpoints are removed \(resuming would diverge again\); train anew with a "
        r"smaller learning rate: the same command with --lr 0\.0005\.\n$",
        proc.stderr,
    )
    assert "Epoch 1/2" not in proc.stdout  # stopped within the first epoch
    assert not os.path.exists(os.path.dirname(last_of(folder)))  # nothing to resume
    assert not os.path.exists(os.path.join(folder, "synthetic", "SetAnomalyDetect.ckpt"))


def test_a_learning_rate_beyond_float32_is_refused_as_parsed(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--lr", "1e308"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert "argument --lr: must be greater than 0 and at most 3.403e+38" in err


def test_resume_with_other_run_settings_is_refused_before_any_extraction(interrupted_run, tmp_path):
    folder = shutil.copytree(interrupted_run[0], tmp_path / "run")
    proc = train_in_process(*RESUMED, "--checkpoint-dir", folder, "--fast", "--resume")
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert "without --fast (asked with)" in proc.stderr  # the interrupted run's, then the asked
    assert proc.stdout == ""  # no feature extracted, nothing loaded
    assert not any(name.endswith("_fast.tar") for name in os.listdir(folder / "synthetic"))


def test_compile_caches_go_with_the_run(tmp_path, monkeypatch):
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):
        monkeypatch.delenv(name, raising=False)  # the suite sets one (conftest.py)
    args = parse_args(["--synthetic", "--compile", "--checkpoint-dir", str(tmp_path)])
    preflight.check_before_work(args, lock=False)
    cache = tmp_path / "synthetic" / "torch_compile_cache"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(cache)
    assert os.environ["TRITON_CACHE_DIR"] == str(cache / "triton")


def test_a_diverging_resumed_training_is_told_to_start_anew_without_resume(tmp_path):
    args = parse_args(["--synthetic", "--resume", "--lr", "1e30"])
    stop = callbacks.StopDiverging(args, str(tmp_path / "checkpoints"), usual_lr=5e-4)
    trainer = types.SimpleNamespace(current_epoch=2, global_step=40)
    with pytest.raises(SystemExit) as exit_info:
        stop.on_before_backward(trainer, None, torch.tensor(float("nan")))
    assert str(exit_info.value.code).endswith(
        "train anew with a smaller learning rate: the same command without --resume, with --lr "
        "0.0005."
    )


def test_fast_training_gets_fused_adam_from_its_trainer(synthetic_run, fast_synthetic_run, tmp_path,
                                                         monkeypatch):  # fmt: skip
    folder = copy_caches(synthetic_run, tmp_path, fast_synthetic_run)
    calls, use = [], fast.use_fast_path

    def recorded(model, parts=fast.MODEL_PARTS, trainer=None):
        calls.append((tuple(parts), trainer is not None))
        return use(model, parts, trainer)

    monkeypatch.setattr(fast, "use_fast_path", recorded)
    proc = train_in_process("--synthetic", "--fast", "--fast-dev-run", "--checkpoint-dir", folder)
    assert_ran(proc)
    assert calls == [(fast.MODEL_PARTS, True)]  # the model that trains, with its Trainer
