"""The post's experiment end to end: CIFAR-100 features from a ResNet34, sets of 10 with one odd image,
a 4-layer Transformer encoder that finds it (数据处理和模型训练, 模型训练和推理); and two sequence tasks.

    python train.py                  # the post's run; a second run loads the saved model and only evaluates
    python train.py --synthetic      # every stage offline on generated images, in well under two minutes on a CPU
    python train.py --task reverse   # the tutorial's sequence task: reverse a sequence (encoder only)
    python train.py --task seq2seq   # the decoder the post describes: sort a sequence, token by token
"""

import argparse
import json
import math
import os
import platform
import shutil
import sys
import time
import warnings

import numpy as np
import pytorch_lightning as pl
import torch
import torch.utils.data as data
import torchvision
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger

from data import ReverseDataset, SetBatches, SortDataset, anomaly_datasets
from features import MissingResources, cifar100_features, save_atomically, synthetic_features
from model import AnomalyPredictor, ReversePredictor, Seq2SeqPredictor

# Each task's defaults: the post's run for anomaly, the tutorial's for reverse. A flag overrides any of them.
TASK_DEFAULTS = {
    "anomaly": dict(set_size=10, batch_size=64, model_dim=256, num_heads=4, num_layers=4, dropout=0.1,
                    input_dropout=0.1, lr=5e-4, warmup=100, epochs=100, gradient_clip_val=2.0),
    "reverse": dict(set_size=None, batch_size=128, model_dim=32, num_heads=1, num_layers=1, dropout=0.0,
                    input_dropout=0.0, lr=5e-4, warmup=50, epochs=10, gradient_clip_val=5.0),
    "seq2seq": dict(set_size=None, batch_size=128, model_dim=64, num_heads=4, num_layers=2, dropout=0.0,
                    input_dropout=0.0, lr=1e-3, warmup=100, epochs=10, gradient_clip_val=5.0),
}
# Where each task keeps its logs and results (<name>/) and its best model (<name>.ckpt).
TASK_NAMES = {"anomaly": "SetAnomalyDetect", "reverse": "ReverseTask", "seq2seq": "Seq2SeqTask"}
# The sequence tasks' data, as in the tutorial: 10 categories, length 16, 50 000 / 1 000 / 10 000 sequences.
NUM_CATEGORIES, SEQ_LEN, SEQ_SIZES = 10, 16, {"train": 50000, "val": 1000, "test": 10000}

# The set loaders read features already in memory: worker processes would only add start-up time.
warnings.filterwarnings("ignore", ".*does not have many workers.*")
# Train accuracy is measured on freshly drawn, shuffled training sets, as in the post.
warnings.filterwarnings("ignore", ".*sampler has shuffling enabled.*")


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def probability(text):
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def positive_float(text):
    value = float(text)
    if not value > 0.0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {value}")
    return value


def set_size(text):
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"a set needs the anomaly and at least one other image: at least 2, got {value}")
    return value


def parse_args(argv=None):
    default_accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=list(TASK_DEFAULTS), default="anomaly",
                   help="anomaly: the post's set anomaly detection (default); reverse: the tutorial's sequence "
                        "reversal; seq2seq: sorting with the encoder-decoder")
    p.add_argument("--set-size", type=set_size, help="images per set, the anomaly included (default: 10)")
    p.add_argument("--batch-size", type=positive_int, help="sets or sequences per batch (default: 64; 128)")
    p.add_argument("--model-dim", type=positive_int, help="features inside the Transformer (default: 256; 32; 64)")
    p.add_argument("--num-heads", type=positive_int, help="attention heads (default: 4; 1; 4)")
    p.add_argument("--num-layers", type=positive_int, help="encoder (and decoder) layers (default: 4; 1; 2)")
    p.add_argument("--dropout", type=probability, help="dropout in the Transformer (default: 0.1; 0; 0)")
    p.add_argument("--input-dropout", type=probability, help="dropout on the inputs (default: 0.1; 0; 0)")
    p.add_argument("--lr", type=positive_float, help="Adam learning rate (default: 5e-4; 5e-4; 1e-3)")
    p.add_argument("--warmup", type=positive_int, help="warm-up steps (default: 100; 50; 100)")
    p.add_argument("--epochs", type=positive_int, help="epochs (default: 100, 2 with --synthetic; 10; 10)")
    p.add_argument("--gradient-clip-val", type=positive_float, help="gradient-norm clipping (default: 2; 5; 5)")
    p.add_argument("--seed", type=int, default=42, help="random seed (default: 42)")
    p.add_argument("--data-dir", default="datasets", help="where CIFAR-100 is or is downloaded to (default: datasets)")
    p.add_argument("--checkpoint-dir", default="saved_models",
                   help="feature caches, logs, the model and results (default: saved_models)")
    p.add_argument("--accelerator", choices=["cpu", "cuda", "gpu", "mps", "auto"], default=default_accelerator,
                   help=f"Lightning accelerator (default here: {default_accelerator})")
    p.add_argument("--devices", type=positive_int, default=1, help="devices to train on (default: 1)")
    p.add_argument("--strategy", default="auto",
                   help="Lightning strategy, e.g. ddp with --devices 2 or more (default: auto)")
    p.add_argument("--fast", action="store_true",
                   help="the fast path: batched feature extraction, sets sampled on the device, fused attention, "
                        "cheaper dropout masks, fused Adam (see BENCHMARKS.md); the same model and checkpoints")
    p.add_argument("--num-workers", type=int, default=4,
                   help="DataLoader workers for the feature extraction (default: 4, as the post)")
    p.add_argument("--fast-dev-run", action="store_true",
                   help="one training and one validation batch, then evaluate the model in memory; saves nothing")
    p.add_argument("--retrain", action="store_true", help="train anew even if a saved model exists")
    p.add_argument("--resume", action="store_true", help="continue an interrupted training from its last checkpoint")
    p.add_argument("--synthetic", action="store_true",
                   help="generated images and an untrained ResNet34 instead of CIFAR-100: offline, small, fast; "
                        "writes under <checkpoint-dir>/synthetic/")
    p.epilog = "Defaults given as 'a; b; c' are those of --task anomaly; reverse; seq2seq."
    args = p.parse_args(argv)
    if args.synthetic and args.task != "anomaly":
        p.error("--synthetic replaces CIFAR-100 for --task anomaly; the sequence tasks need no download")
    if args.set_size is not None and args.task != "anomaly":
        p.error("--set-size belongs to --task anomaly")
    defaults = dict(TASK_DEFAULTS[args.task], epochs=2 if args.synthetic else TASK_DEFAULTS[args.task]["epochs"])
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.model_dim % args.num_heads != 0:
        p.error(f"--model-dim ({args.model_dim}) must be divisible by --num-heads ({args.num_heads})")
    if args.num_workers < 0:
        p.error(f"--num-workers must be 0 or more, got {args.num_workers}")
    return args


def read_checkpoint(path):
    """The dict of a Lightning checkpoint at path; exits with a message if it is not one."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        sys.exit(f"error: {path} cannot be read ({type(error).__name__}). "
                 "Delete it or run with --retrain to train a new model.")
    if not (isinstance(ckpt, dict) and "state_dict" in ckpt and "hyper_parameters" in ckpt):
        sys.exit(f"error: {path} is not a Lightning checkpoint (the post's torch.save(model, ...) writes a pickled "
                 "module instead). Run with --retrain to train a new model in its place.")
    return ckpt


def check_saved_model(path, hparams, settings, hint):
    """Stops with a message if the model saved at path was trained with other settings than asked for."""
    ckpt = read_checkpoint(path)
    saved = dict(ckpt["hyper_parameters"], **ckpt.get("train_settings", {}))
    asked = dict(hparams, **{k: v for k, v in settings.items() if k in ckpt.get("train_settings", {})})
    differ = [f"{k} {saved.get(k)!r} (asked {v!r})" for k, v in asked.items() if saved.get(k) != v]
    if differ:
        sys.exit(f"error: {path} was trained with other settings than asked for: {', '.join(differ)}. {hint}")


def anomaly_setup(args, checkpoint_dir, device):
    """Features (cached), the post's split and the set datasets of the anomaly task; exits on missing data."""
    try:
        if args.synthetic:
            feats = synthetic_features(checkpoint_dir, device, num_workers=args.num_workers, fast=args.fast)
        else:
            feats = cifar100_features(args.data_dir, checkpoint_dir, device, num_workers=args.num_workers,
                                      fast=args.fast)
    except MissingResources as error:
        sys.exit(f"error: {error}")
    train_set_feats, train_set_labels = feats["train"]
    test_feats, test_labels = feats["test"]

    # 自定义数据类,并构建dataloader: the post's per-class split, then sets.
    try:
        datasets = anomaly_datasets(train_set_feats, train_set_labels, test_feats, test_labels, args.set_size)
    except ValueError as error:
        sys.exit(f"error: {error}")
    return AnomalyPredictor, dict(input_dim=train_set_feats.shape[-1], num_classes=1), datasets


def sequence_setup(args):
    """The sequence tasks' data, drawn from torch's generator after seeding, in the order train, val, test."""
    if args.task == "reverse":
        datasets = {split: ReverseDataset(NUM_CATEGORIES, SEQ_LEN, size) for split, size in SEQ_SIZES.items()}
        return ReversePredictor, dict(input_dim=NUM_CATEGORIES, num_classes=NUM_CATEGORIES), datasets
    datasets = {split: SortDataset(NUM_CATEGORIES, SEQ_LEN, size) for split, size in SEQ_SIZES.items()}
    vocabulary = NUM_CATEGORIES + 3  # the digits, then BOS, EOS and PAD
    return Seq2SeqPredictor, dict(input_dim=vocabulary, num_classes=vocabulary), datasets


def model_hparams(args, io_dims, steps_per_epoch):
    """The model's constructor arguments for this run: io_dims (input_dim, num_classes) and the flags."""
    return dict(io_dims, model_dim=args.model_dim, num_heads=args.num_heads, num_layers=args.num_layers,
                lr=args.lr, warmup=args.warmup, max_iters=args.epochs * steps_per_epoch, dropout=args.dropout,
                input_dropout=args.input_dropout)


def make_loaders(args, datasets, device):
    """{"train", "val", "test"} batches of the datasets: the post's DataLoaders, or with --fast (set task,
    one device) SetBatches, which samples whole batches with tensor operations on the device."""
    if args.fast and args.task == "anomaly" and args.devices == 1:
        return {split: SetBatches(dataset, args.batch_size, device) for split, dataset in datasets.items()}
    return {"train": data.DataLoader(datasets["train"], batch_size=args.batch_size, shuffle=True, drop_last=True,
                                     pin_memory=device.type == "cuda"),
            "val": data.DataLoader(datasets["val"], batch_size=args.batch_size, shuffle=False, drop_last=False),
            "test": data.DataLoader(datasets["test"], batch_size=args.batch_size, shuffle=False, drop_last=False)}


def make_trainer(args, root_dir, callbacks, **overrides):
    """The Lightning Trainer of a run: devices, epochs, clipping, TensorBoard logs under root_dir."""
    settings = dict(default_root_dir=root_dir,
                    callbacks=callbacks,
                    enable_checkpointing=bool(callbacks),
                    logger=TensorBoardLogger(root_dir, name="lightning_logs", default_hp_metric=False),
                    accelerator=args.accelerator,
                    devices=args.devices,
                    strategy=args.strategy,
                    max_epochs=args.epochs,
                    gradient_clip_val=args.gradient_clip_val,
                    fast_dev_run=args.fast_dev_run)
    return pl.Trainer(**dict(settings, **overrides))


def device_name(device):
    """The GPU's name, or the CPU's as the platform reports it: what results and benchmarks are measured on."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"


def evaluate(trainer, model, loaders):
    """Accuracy of model on each loader, in [0, 1]."""
    return {name: trainer.test(model, dataloaders=loader, verbose=False)[0]["test_acc"]
            for name, loader in loaders.items()}


def main(argv=None):
    args = parse_args(argv)
    start = time.time()
    seconds = {}
    checkpoint_dir = os.path.join(args.checkpoint_dir, "synthetic") if args.synthetic else args.checkpoint_dir
    name = TASK_NAMES[args.task]
    root_dir = os.path.join(checkpoint_dir, name)
    pretrained_filename = os.path.join(checkpoint_dir, f"{name}.ckpt")
    last_checkpoint = os.path.join(root_dir, "checkpoints", "last.ckpt")
    if args.resume and not os.path.isfile(last_checkpoint):
        sys.exit(f"error: --resume found no {last_checkpoint} to continue from. Run without --resume to start anew.")
    pl.seed_everything(args.seed)

    device = torch.device("cuda" if torch.cuda.is_available() and args.accelerator != "cpu" else "cpu")
    if args.task == "anomaly":
        model_class, io_dims, datasets = anomaly_setup(args, checkpoint_dir, device)
        seconds["features"] = time.time() - start
    else:
        model_class, io_dims, datasets = sequence_setup(args)
    loaders = make_loaders(args, datasets, device)
    train_loader, val_loader, test_loader = loaders["train"], loaders["val"], loaders["test"]
    if len(train_loader) == 0:
        sys.exit(f"error: --batch-size {args.batch_size} is larger than the {len(datasets['train'])} training items.")

    # 模型训练和推理
    # With several processes each one takes every N-th item (Lightning's DistributedSampler), so fewer steps.
    steps_per_epoch = (len(train_loader) if args.devices == 1
                       else math.ceil(len(datasets["train"]) / args.devices) // args.batch_size)
    hparams = model_hparams(args, io_dims, steps_per_epoch)
    settings = dict(batch_size=args.batch_size, epochs=args.epochs, gradient_clip_val=args.gradient_clip_val,
                    seed=args.seed)
    if args.task == "anomaly":
        settings["set_size"] = args.set_size
    best_checkpoint = ModelCheckpoint(dirpath=os.path.dirname(last_checkpoint), monitor="val_acc", mode="max",
                                      save_weights_only=True)
    # A second, full checkpoint (optimizer, scheduler, loop state), replaced after every epoch, for --resume.
    last = ModelCheckpoint(dirpath=os.path.dirname(last_checkpoint), filename="last")
    trainer = make_trainer(args, root_dir, callbacks=[] if args.fast_dev_run else [best_checkpoint, last])

    train_start = time.time()
    trained = not os.path.isfile(pretrained_filename) or args.retrain or args.resume or args.fast_dev_run
    if not trained:
        check_saved_model(pretrained_filename, hparams, settings,
                          "Run with --retrain to train a new model in its place, or choose another --checkpoint-dir.")
        print(f"Found pretrained model {pretrained_filename}, loading...")
        model = model_class.load_from_checkpoint(pretrained_filename).use_fast_path(args.fast)
    else:
        if args.resume:  # the schedule and the weights of the interrupted run must fit what is asked now
            check_saved_model(last_checkpoint, hparams, settings,
                              "Resume with the settings of the interrupted run, or train anew without --resume.")
        elif not args.fast_dev_run:  # earlier checkpoints of this task would be mistaken for this run's
            shutil.rmtree(os.path.dirname(last_checkpoint), ignore_errors=True)
        model = model_class(**hparams).use_fast_path(args.fast)
        trainer.fit(model, train_loader, val_loader, ckpt_path=last_checkpoint if args.resume else None)
        if not trainer.is_global_zero:  # with several processes, the first one alone saves and evaluates
            return None
        if not args.fast_dev_run:  # a fast dev run checkpoints nothing and evaluates the model it has
            model = model_class.load_from_checkpoint(best_checkpoint.best_model_path).use_fast_path(args.fast)
            # Keep the best model as a Lightning checkpoint (the post pickles the whole module with
            # torch.save, which load_from_checkpoint cannot read), with the run's settings for the check above.
            ckpt = torch.load(best_checkpoint.best_model_path, map_location="cpu", weights_only=False)
            ckpt["train_settings"] = settings
            save_atomically(pretrained_filename, lambda tmp: torch.save(ckpt, tmp))
    seconds["train"] = time.time() - train_start

    eval_start = time.time()
    if trainer.world_size > 1:  # evaluate on this one process, over the full sets (no padded duplicates)
        trainer = make_trainer(args, root_dir, callbacks=[], devices=1, strategy="auto", logger=False)
    # Train accuracy is on freshly drawn training sets, as in the post; the sequence tasks report val and test.
    loaders = {"train_acc": train_loader} if args.task == "anomaly" else {}
    result = evaluate(trainer, model, dict(loaders, val_acc=val_loader, test_acc=test_loader))
    seconds["evaluate"] = time.time() - eval_start
    seconds["total"] = time.time() - start

    for key, label in (("train_acc", "Train accuracy: "), ("val_acc", "Val accuracy:   "), ("test_acc", "Test accuracy:  ")):
        if key in result:
            print(f"{label}{100.0 * result[key]:4.2f}%")

    results = dict(result,
                   trained=trained,
                   checkpoint=None if args.fast_dev_run else pretrained_filename,
                   settings=vars(args),
                   device=device_name(device),
                   versions={"python": platform.python_version(), "torch": torch.__version__,
                             "torchvision": torchvision.__version__, "pytorch_lightning": pl.__version__,
                             "numpy": np.__version__},
                   seconds=seconds)
    if args.fast_dev_run:  # a one-batch check must not replace a real run's results
        print("Fast dev run: results not saved.")
        return results
    results_file = os.path.join(root_dir, "results.json")

    def write_results(tmp):
        with open(tmp, "w") as f:
            json.dump(results, f, indent=2)

    save_atomically(results_file, write_results)
    print(f"Results written to {results_file}")
    return results


if __name__ == "__main__":
    main()
