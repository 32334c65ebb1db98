"""The post's experiment end to end: CIFAR-100 features from a ResNet34, sets of 10 with one odd image,
a 4-layer Transformer encoder that finds it (数据处理和模型训练, 模型训练和推理).

    python train.py               # the post's run; a second run loads the saved model and only evaluates
    python train.py --synthetic   # every stage offline on generated images, in well under two minutes on a CPU
"""

import argparse
import json
import os
import platform
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

from data import SetAnomalyDataset, split_train_val
from features import MissingResources, cifar100_features, save_atomically, synthetic_features
from model import AnomalyPredictor

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
    p.add_argument("--task", choices=["anomaly"], default="anomaly", help="experiment to run (default: anomaly)")
    p.add_argument("--set-size", type=set_size, default=10, help="images per set, the anomaly included (default: 10)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="sets per batch (default: 64)")
    p.add_argument("--model-dim", type=positive_int, default=256, help="features inside the Transformer (default: 256)")
    p.add_argument("--num-heads", type=positive_int, default=4, help="attention heads (default: 4)")
    p.add_argument("--num-layers", type=positive_int, default=4, help="encoder layers (default: 4)")
    p.add_argument("--dropout", type=probability, default=0.1, help="dropout in the Transformer (default: 0.1)")
    p.add_argument("--input-dropout", type=probability, default=0.1, help="dropout on the features (default: 0.1)")
    p.add_argument("--lr", type=positive_float, default=5e-4, help="Adam learning rate (default: 5e-4)")
    p.add_argument("--warmup", type=positive_int, default=100, help="warm-up steps (default: 100)")
    p.add_argument("--epochs", type=positive_int, default=None, help="epochs (default: 100; 2 with --synthetic)")
    p.add_argument("--gradient-clip-val", type=positive_float, default=2.0, help="gradient-norm clipping (default: 2)")
    p.add_argument("--seed", type=int, default=42, help="random seed (default: 42)")
    p.add_argument("--data-dir", default="datasets", help="where CIFAR-100 is or is downloaded to (default: datasets)")
    p.add_argument("--checkpoint-dir", default="saved_models",
                   help="feature caches, logs, the model and results (default: saved_models)")
    p.add_argument("--accelerator", choices=["cpu", "cuda", "gpu", "mps", "auto"], default=default_accelerator,
                   help=f"Lightning accelerator (default here: {default_accelerator})")
    p.add_argument("--devices", type=positive_int, default=1, help="devices to train on (default: 1)")
    p.add_argument("--num-workers", type=int, default=4,
                   help="DataLoader workers for the feature extraction (default: 4, as the post)")
    p.add_argument("--fast-dev-run", action="store_true",
                   help="one training and one validation batch, then evaluate the model in memory; saves nothing")
    p.add_argument("--retrain", action="store_true", help="train anew even if a saved model exists")
    p.add_argument("--resume", action="store_true", help="continue an interrupted training from its last checkpoint")
    p.add_argument("--synthetic", action="store_true",
                   help="generated images and an untrained ResNet34 instead of CIFAR-100: offline, small, fast; "
                        "writes under <checkpoint-dir>/synthetic/")
    args = p.parse_args(argv)
    if args.model_dim % args.num_heads != 0:
        p.error(f"--model-dim ({args.model_dim}) must be divisible by --num-heads ({args.num_heads})")
    if args.num_workers < 0:
        p.error(f"--num-workers must be 0 or more, got {args.num_workers}")
    if args.epochs is None:
        args.epochs = 2 if args.synthetic else 100
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


def check_saved_model(path, hparams, settings):
    """Stops with a message if the saved model was trained with other settings than asked for."""
    ckpt = read_checkpoint(path)
    saved = dict(ckpt["hyper_parameters"], **ckpt.get("train_settings", {}))
    asked = dict(hparams, **{k: v for k, v in settings.items() if k in ckpt.get("train_settings", {})})
    differ = [f"{k} {saved.get(k)!r} (asked {v!r})" for k, v in asked.items() if saved.get(k) != v]
    if differ:
        sys.exit(f"error: the saved model {path} was trained with other settings than asked for: {', '.join(differ)}. "
                 "Run with --retrain to train a new one in its place, or choose another --checkpoint-dir.")


def evaluate(trainer, model, loaders):
    """Set accuracy of model on each loader, in [0, 1]."""
    return {name: trainer.test(model, dataloaders=loader, verbose=False)[0]["test_acc"]
            for name, loader in loaders.items()}


def main(argv=None):
    args = parse_args(argv)
    start = time.time()
    seconds = {}
    checkpoint_dir = os.path.join(args.checkpoint_dir, "synthetic") if args.synthetic else args.checkpoint_dir
    root_dir = os.path.join(checkpoint_dir, "SetAnomalyDetect")
    pretrained_filename = os.path.join(checkpoint_dir, "SetAnomalyDetect.ckpt")
    last_checkpoint = os.path.join(root_dir, "checkpoints", "last.ckpt")
    if args.resume and not os.path.isfile(last_checkpoint):
        sys.exit(f"error: --resume found no {last_checkpoint} to continue from. Run without --resume to start anew.")
    pl.seed_everything(args.seed)

    # 获取数据集 / 提取图片特征: features of every image, computed once and cached.
    device = torch.device("cuda" if torch.cuda.is_available() and args.accelerator != "cpu" else "cpu")
    try:
        if args.synthetic:
            feats = synthetic_features(checkpoint_dir, device, num_workers=args.num_workers)
        else:
            feats = cifar100_features(args.data_dir, checkpoint_dir, device, num_workers=args.num_workers)
    except MissingResources as error:
        sys.exit(f"error: {error}")
    train_set_feats, train_set_labels = feats["train"]
    test_feats, test_labels = feats["test"]
    seconds["features"] = time.time() - start

    # 自定义数据类,并构建dataloader: the post's per-class split, then sets.
    try:
        train_indices, val_indices = split_train_val(train_set_labels)
        train_dataset = SetAnomalyDataset(train_set_feats[train_indices], train_set_labels[train_indices],
                                          set_size=args.set_size, train=True)
        val_dataset = SetAnomalyDataset(train_set_feats[val_indices], train_set_labels[val_indices],
                                        set_size=args.set_size, train=False)
        test_dataset = SetAnomalyDataset(test_feats, test_labels, set_size=args.set_size, train=False)
    except ValueError as error:
        sys.exit(f"error: {error}")
    train_loader = data.DataLoader(train_dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                   pin_memory=device.type == "cuda")
    val_loader = data.DataLoader(val_dataset, batch_size=args.batch_size, shuffle=False, drop_last=False)
    test_loader = data.DataLoader(test_dataset, batch_size=args.batch_size, shuffle=False, drop_last=False)
    if len(train_loader) == 0:
        sys.exit(f"error: --batch-size {args.batch_size} is larger than the {len(train_dataset)} training sets.")

    # 模型训练和推理
    hparams = dict(input_dim=train_set_feats.shape[-1], model_dim=args.model_dim, num_classes=1,
                   num_heads=args.num_heads, num_layers=args.num_layers, lr=args.lr, warmup=args.warmup,
                   max_iters=args.epochs * len(train_loader), dropout=args.dropout, input_dropout=args.input_dropout)
    settings = dict(set_size=args.set_size, batch_size=args.batch_size, epochs=args.epochs,
                    gradient_clip_val=args.gradient_clip_val, seed=args.seed)
    best_checkpoint = ModelCheckpoint(dirpath=os.path.dirname(last_checkpoint), monitor="val_acc", mode="max",
                                      save_weights_only=True)
    # A second, full checkpoint (optimizer, scheduler, loop state) after every epoch, for --resume.
    last = ModelCheckpoint(dirpath=os.path.dirname(last_checkpoint), save_top_k=0, save_last=True)
    trainer = pl.Trainer(default_root_dir=root_dir,
                         callbacks=[best_checkpoint, last],
                         logger=TensorBoardLogger(root_dir, name="lightning_logs", default_hp_metric=False),
                         accelerator=args.accelerator,
                         devices=args.devices,
                         max_epochs=args.epochs,
                         gradient_clip_val=args.gradient_clip_val,
                         fast_dev_run=args.fast_dev_run)

    train_start = time.time()
    trained = not os.path.isfile(pretrained_filename) or args.retrain or args.resume or args.fast_dev_run
    if not trained:
        check_saved_model(pretrained_filename, hparams, settings)
        print(f"Found pretrained model {pretrained_filename}, loading...")
        model = AnomalyPredictor.load_from_checkpoint(pretrained_filename)
    else:
        model = AnomalyPredictor(**hparams)
        trainer.fit(model, train_loader, val_loader, ckpt_path=last_checkpoint if args.resume else None)
        if not args.fast_dev_run:  # a fast dev run checkpoints nothing and evaluates the model it has
            model = AnomalyPredictor.load_from_checkpoint(best_checkpoint.best_model_path)
            # Keep the best model as a Lightning checkpoint (the post pickles the whole module with
            # torch.save, which load_from_checkpoint cannot read), with the run's settings for the check above.
            ckpt = torch.load(best_checkpoint.best_model_path, map_location="cpu", weights_only=False)
            ckpt["train_settings"] = settings
            save_atomically(pretrained_filename, lambda tmp: torch.save(ckpt, tmp))
    seconds["train"] = time.time() - train_start

    eval_start = time.time()
    result = evaluate(trainer, model, {"train_acc": train_loader, "val_acc": val_loader, "test_acc": test_loader})
    seconds["evaluate"] = time.time() - eval_start
    seconds["total"] = time.time() - start

    print(f"Train accuracy: {100.0 * result['train_acc']:4.2f}%")
    print(f"Val accuracy:   {100.0 * result['val_acc']:4.2f}%")
    print(f"Test accuracy:  {100.0 * result['test_acc']:4.2f}%")

    results = dict(result,
                   trained=trained,
                   checkpoint=None if args.fast_dev_run else pretrained_filename,
                   settings=vars(args),
                   device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
                   versions={"python": platform.python_version(), "torch": torch.__version__,
                             "torchvision": torchvision.__version__, "pytorch_lightning": pl.__version__,
                             "numpy": np.__version__},
                   seconds=seconds)
    results_file = os.path.join(root_dir, "results.json")
    def write_results(tmp):
        with open(tmp, "w") as f:
            json.dump(results, f, indent=2)

    save_atomically(results_file, write_results)
    print(f"Results written to {results_file}")
    return results


if __name__ == "__main__":
    main()
