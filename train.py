"""模型训练和推理: the post's training section, for the post's set anomaly task and two sequence
tasks (the tutorial's reversal; sorting with the encoder-decoder, this project's own). Its
hyper-parameters and folders come first; then the data are set up (数据处理), a Lightning Trainer
fits the model or the saved one is loaded (train_anomaly), and it is tested on each split.
`python train.py -h` lists the flags (harness/cli.py); harness/README.md maps the program around.
"""

from harness import stops

# The post's folders: where CIFAR-100 goes, and where features, models and results go.
DATASET_PATH = "datasets"
CHECKPOINT_PATH = "saved_models"

# Each task's hyper-parameters and Trainer settings, the command line's defaults (a flag overrides
# any). anomaly: the post's train_anomaly(...) call and Trainer; reverse: the tutorial's sequence
# task; seq2seq: the encoder-decoder's sorting.
TASK_DEFAULTS = {
    "anomaly": dict(set_size=10, batch_size=64, model_dim=256, num_heads=4, num_layers=4,
                    dropout=0.1, input_dropout=0.1, lr=5e-4, warmup=100, epochs=100,
                    gradient_clip_val=2.0),
    "reverse": dict(set_size=None, batch_size=128, model_dim=32, num_heads=1, num_layers=1,
                    dropout=0.0, input_dropout=0.0, lr=5e-4, warmup=50, epochs=10,
                    gradient_clip_val=5.0),
    "seq2seq": dict(set_size=None, batch_size=128, model_dim=64, num_heads=4, num_layers=2,
                    dropout=0.0, input_dropout=0.0, lr=1e-3, warmup=100, epochs=10,
                    gradient_clip_val=5.0),
}  # fmt: skip


def parse_args(argv=None):
    """The run's settings: the flags in argv (None: the command line's), TASK_DEFAULTS and the
    post's folders for the others (harness/cli.py)."""
    return cli.parse_args(argv, TASK_DEFAULTS, DATASET_PATH, CHECKPOINT_PATH)


if __name__ == "__main__":
    stops.while_starting()  # Ctrl-C or SIGTERM from the start on: one line, no traceback
    from harness import cli, threads

    threads.wait_briefly()  # before torch loads: how its idle threads wait
    parse_args()  # -h and a mistyped flag answer now, before the large libraries load (seconds)


import math
import os
import sys
import time

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only
from torch.utils.data import DataLoader

from data import (
    NUM_CATEGORIES,
    SEQ_LEN,
    SEQ_SIZES,
    ReverseDataset,
    SetAnomalyDataset,
    SortDataset,
    anomaly_datasets,
)
from features import FEATURE_DIM
from harness import checkpoints, cli, fast, folders, pretrained, results, resume, threads
from harness.caches import cifar100_features
from harness.callbacks import AtomicCheckpointIO, BestCheckpoint, SeedEachProcess, StopDiverging
from harness.preflight import check_before_work
from harness.runlog import RunLog, quiet_lightning
from harness.sources import OFFLINE, MissingResources
from harness.synthetic import synthetic_features
from model import AnomalyPredictor, ReversePredictor, Seq2SeqPredictor

# Each task's model inputs and outputs: per image of a set a feature in, one anomaly logit out
# (the post's input_dim and num_classes=1); per position a one-hot digit in, a score per digit out
# (seq2seq: the digits, then BOS, EOS and PAD).
IO_DIMS = {
    "anomaly": dict(input_dim=FEATURE_DIM, num_classes=1),
    "reverse": dict(input_dim=NUM_CATEGORIES, num_classes=NUM_CATEGORIES),
    "seq2seq": dict(input_dim=NUM_CATEGORIES + 3, num_classes=NUM_CATEGORIES + 3),
}

# --------------------------------------------------------------------------------------------------
# 数据处理: features, datasets and loaders
# --------------------------------------------------------------------------------------------------


def anomaly_setup(args, run_folder, device):
    """The set task's model class, its input and output sizes, and its datasets: cached features,
    the post's split, sets. Exits with a message on missing or unusable data."""
    try:
        if args.synthetic:
            feats = synthetic_features(run_folder, device, args.num_workers, args.fast)
        else:
            feats = cifar100_features(
                args.data_dir, run_folder, device, args.num_workers, args.fast
            )
        datasets = anomaly_datasets(*feats["train"], *feats["test"], args.set_size)
    except MissingResources as error:  # offline, say: name what runs without the downloads
        sys.exit(f"error: {error}\n{OFFLINE}")
    except ValueError as error:
        sys.exit(f"error: {error}")
    # Train accuracy is measured on fixed sets of the training images, drawn as val's and test's
    # are, so that one model always scores the same; training itself draws fresh sets.
    train = datasets["train"]
    datasets["train_eval"] = SetAnomalyDataset(train.img_feats, train.labels, args.set_size, False)
    return AnomalyPredictor, IO_DIMS["anomaly"], datasets


def sequence_setup(args):
    """The sequence tasks' model class, sizes and data, drawn from torch's generator after seeding,
    in the order train, val, test."""
    if args.task == "reverse":
        datasets = {s: ReverseDataset(NUM_CATEGORIES, SEQ_LEN, n) for s, n in SEQ_SIZES.items()}
        return ReversePredictor, IO_DIMS["reverse"], datasets
    datasets = {s: SortDataset(NUM_CATEGORIES, SEQ_LEN, n) for s, n in SEQ_SIZES.items()}
    return Seq2SeqPredictor, IO_DIMS["seq2seq"], datasets


def make_loaders(args, datasets, device):
    """Batches of each of datasets ("train", then the evaluation sets): the post's DataLoaders, or
    with --fast (set task) fast.SetBatches, which samples whole batches with tensor operations on
    the device."""
    if args.fast and args.task == "anomaly":
        return {
            s: fast.SetBatches(ds, args.batch_size, device, args.seed) for s, ds in datasets.items()
        }
    loaders = {
        split: DataLoader(dataset, args.batch_size, shuffle=False, drop_last=False)
        for split, dataset in datasets.items()
    }
    loaders["train"] = DataLoader(
        datasets["train"],
        args.batch_size,
        shuffle=True,
        drop_last=True,
        pin_memory=device.type == "cuda",
    )
    return loaders


def model_hparams(args, io_dims, epoch_steps):
    """The model's constructor arguments for this run: io_dims (input_dim, num_classes), the
    flags, and max_iters from epoch_steps, the optimizer steps of an epoch (steps_per_epoch)."""
    return dict(
        io_dims,
        model_dim=args.model_dim,
        num_heads=args.num_heads,
        num_layers=args.num_layers,
        lr=args.lr,
        warmup=args.warmup,
        max_iters=args.epochs * epoch_steps,
        dropout=args.dropout,
        input_dropout=args.input_dropout,
    )


def steps_per_epoch(args, loaders, datasets):
    """Optimizer steps in an epoch of each process; exits if a batch is larger than the data. With
    several processes each takes every N-th item (Lightning's DistributedSampler): fewer steps."""
    if len(loaders["train"]) == 0:
        sys.exit(
            f"error: --batch-size {args.batch_size} is larger than the "
            f"{len(datasets['train'])} training items."
        )
    if args.devices == 1:
        return len(loaders["train"])
    return math.ceil(len(datasets["train"]) / args.devices) // args.batch_size


# --------------------------------------------------------------------------------------------------
# 模型训练和推理: the Trainer, training or loading the saved model, testing
# --------------------------------------------------------------------------------------------------


def make_trainer(args, root_dir, callbacks, **overrides):
    """The Lightning Trainer of a run: devices, precision, epochs, clipping, each process's seed,
    TensorBoard logs under root_dir. The run prints its own progress (RunLog)."""
    version = resume.logs_version(root_dir, args.resume)
    settings = dict(
        default_root_dir=root_dir,
        callbacks=[*callbacks, SeedEachProcess(args.seed)],
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        logger=TensorBoardLogger(root_dir, "lightning_logs", version, default_hp_metric=False),
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator=args.accelerator,
        devices=args.devices,
        strategy=args.strategy,
        precision=args.precision,
        max_epochs=args.epochs,
        gradient_clip_val=args.gradient_clip_val,
        fast_dev_run=args.fast_dev_run,
        plugins=[AtomicCheckpointIO()],
    )
    try:
        return pl.Trainer(**dict(settings, **overrides))
    except Exception as error:  # Lightning refuses settings it cannot use, e.g. an unknown strategy
        sys.exit(f"error: {error}")


def train_anomaly(args, model_class, hparams, loaders, run_folder):
    """The post's train_anomaly: if a saved model is there and no retraining is asked for, load it;
    otherwise fit, reload the best epoch and save it. Then test it on each split. It keeps the
    post's name, though it trains every task (the tutorial's train_reverse is the same steps).
    Returns (model, {"train_acc", "val_acc", "test_acc"}, whether it trained, seconds), or None on
    every process but the first when several train."""
    start = time.time()
    root_dir = folders.task_dir(run_folder, args.task)
    saved = folders.model_file(run_folder, args.task)
    parts = fast.model_parts(args.fast, args.compile)
    found = os.path.isfile(saved) and not (args.retrain or args.resume or args.fast_dev_run)
    if found:
        model = checkpoints.load_saved_model(saved, model_class, hparams, args)
        fast.use_fast_path(model, parts)
        print(f"Found the saved model {saved}, loading it...")
    else:
        last_path = folders.last_checkpoint(run_folder, args.task)
        folder, log = os.path.dirname(last_path), RunLog(last_path)
        best = BestCheckpoint(folder)  # the best epoch by val_acc, saved before last.ckpt
        last = ModelCheckpoint(folder, filename="last")  # what --resume continues from
        # Logged at least once an epoch, so that even a short run has training curves.
        every = min(50, hparams["max_iters"] // args.epochs)
        callbacks = [log, StopDiverging(args, folder, TASK_DEFAULTS[args.task]["lr"])]
        callbacks += [] if args.fast_dev_run else [best, last, resume.KeepRunState(args)]
        trainer = make_trainer(args, root_dir, callbacks, log_every_n_steps=every)
        model = fast.use_fast_path(model_class(**hparams), parts, trainer)
        if args.compile:
            fast.compile_training_forward(model, trainer.strategy.root_device)
        checkpoint = resume.resume_from(args, hparams, last_path)
        trainer.fit(model, loaders["train"], loaders["val"], ckpt_path=checkpoint)
        if not trainer.is_global_zero:  # with several processes, the first alone saves and tests
            return None
        if not args.fast_dev_run:  # a fast dev run checkpoints nothing: it tests the model it has
            try:
                model, ckpt = checkpoints.load_model(best.best_model_path, model_class)
                fast.use_fast_path(model, parts)
                checkpoints.save_model(ckpt, saved, args)
            except KeyboardInterrupt:  # the training is whole in last.ckpt: say how to keep it
                raise KeyboardInterrupt(checkpoints.SAVING_STOPPED) from None
            score = f"val acc {100 * float(best.best_model_score):.2f}%"
            print(f"Saved the best epoch ({score}) as {saved}")
    seconds = {"train": time.time() - start}
    start = time.time()
    result = evaluate(args, model, loaders, root_dir)
    seconds["evaluate"] = time.time() - start
    return model, result, not found, seconds


def evaluate(args, model, loaders, root_dir):
    """{"train_acc", "val_acc", "test_acc"} of model (sequence tasks: val and test), tested by
    Lightning on one process, over the full sets (no padded copies). The set task's train accuracy
    is on its fixed training sets. Not logged: results.json holds it."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # the other processes have finished
    log = RunLog()
    tester = make_trainer(args, root_dir, [log], devices=1, strategy="auto", logger=False)
    splits = ("train", "val", "test") if args.task == "anomaly" else ("val", "test")
    result = {}
    for split in splits:
        log.label = f"Testing on the {split} {'sets' if args.task == 'anomaly' else 'sequences'}"
        loader = loaders["train_eval" if split == "train" else split]
        result[f"{split}_acc"] = tester.test(model, loader, verbose=False)[0]["test_acc"]
    return result


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def evaluate_published(args, published, model_class, loaders):
    """--pretrained: (accuracies, what results.json records of it, seconds) of the tutorial
    author's model, published = (its path, its git blob id, its checkpoint), tested as
    train_anomaly tests a model trained here."""
    model = pretrained.load_published(published, model_class, IO_DIMS[args.task])
    fast.use_fast_path(model, fast.model_parts(args.fast))
    print(f"Testing the tutorial author's model {published[0]}")
    start = time.time()
    result = evaluate(args, model, loaders, folders.pretrained_dir(args.checkpoint_dir, args.task))
    return result, pretrained.published_record(published, model), {"evaluate": time.time() - start}


def main(argv=None):
    args = parse_args(argv)
    quiet_lightning()
    if rank_zero_only.rank > 0:  # a process that Lightning's DDP started: the first one prints
        sys.stdout = open(os.devnull, "w")
    start, seconds = time.time(), {}
    run_folder, device = check_before_work(args, lock=rank_zero_only.rank == 0)
    threads.use_cpu_threads(args.task, args.devices if device.type == "cpu" else 1)
    if args.pretrained:  # fetched and verified first: the features may take long
        try:
            published = pretrained.fetch_published(args.checkpoint_dir, args.task)
        except MissingResources as error:
            sys.exit(f"error: {error}")
    if args.task == "anomaly":
        model_class, io_dims, datasets = anomaly_setup(args, run_folder, device)
        seconds["features"] = time.time() - start
    # Seeded after the features: extracting them draws random numbers, and a run must not depend
    # on whether their caches were already there.
    pl.seed_everything(args.seed, verbose=False)
    if args.task != "anomaly":
        model_class, io_dims, datasets = sequence_setup(args)
    loaders = make_loaders(args, datasets, device)
    hparams = model_hparams(args, io_dims, steps_per_epoch(args, loaders, datasets))

    if args.pretrained:  # the tutorial author's model; its results go apart
        result, tested, more = evaluate_published(args, published, model_class, loaders)
        root_dir = folders.pretrained_dir(args.checkpoint_dir, args.task)
    else:
        outcome = train_anomaly(args, model_class, hparams, loaders, run_folder)
        if outcome is None:  # another process of a several-device run: the first one reports
            return None
        _, result, trained, more = outcome
        checkpoint = None if args.fast_dev_run else folders.model_file(run_folder, args.task)
        tested = dict(trained=trained, checkpoint=checkpoint)
        root_dir = folders.task_dir(run_folder, args.task)
    seconds.update(more, total=time.time() - start)
    return results.report(result, args, device, seconds, root_dir, **tested)


if __name__ == "__main__":
    stops.run_main(main, "every file is whole: run the same command again to go on.")
