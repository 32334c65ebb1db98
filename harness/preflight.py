"""The checks before any work, which need the run's folder and device: --resume has something to
continue from, --strategy is Lightning's, the device is here (and enough of it), every output can
be written as its kind; then the task's folder is locked for this process. (The flags' own values
are checked as they are parsed: cli.py.)
"""

import difflib
import glob
import os
import sys

import torch
from pytorch_lightning.strategies import StrategyRegistry

from features import CACHE_FILES
from harness.caches import cache_path
from harness.files import make_and_check_folder, make_folders
from harness.folders import (
    ROOT,
    last_checkpoint,
    model_file,
    pretrained_dir,
    published_path,
    run_dir,
    run_from_elsewhere,
    task_dir,
)
from harness.lock import holder_of, lock_folder, refuse_in_use
from harness.resume import refuse_unresumable
from harness.threads import usable_cores


def check_before_work(args, lock=True):
    """(run folder, device) of the run, once shown usable: exits with one line, before anything is
    computed or deleted, if --resume has nothing to continue from, --strategy is not Lightning's,
    the device is not here or there are fewer than --devices of it, an output is there as another
    kind (a folder for a file, or a file for a folder), or the folder is not writable; then, with
    lock, takes the task's folder for this process (lock_folder). A run that Lightning's DDP
    started takes no lock. (The flags' own values were checked as they were parsed: cli.py.)"""
    run_folder = run_dir(args.checkpoint_dir, args.synthetic)
    last = last_checkpoint(run_folder, args.task)
    saved = model_file(run_folder, args.task)
    if args.resume:
        refuse_unresumable(args, last, saved)
    known = lightning_strategies()
    if args.strategy not in known:
        close = difflib.get_close_matches(args.strategy, known, n=1)
        maybe = f" (did you mean {close[0]}?)" if close else ""
        sys.exit(
            f"error: --strategy {args.strategy} is not one of Lightning's{maybe}: auto, ddp, "
            "ddp_spawn, fsdp, ... (pytorch_lightning.strategies.StrategyRegistry)."
        )
    device = pick_device(args.accelerator)
    usable = usable_devices(device)
    if args.devices > usable:
        sys.exit(
            f"error: --devices {args.devices}: this machine has {usable} "
            f"{'CPU cores' if device.type == 'cpu' else device.type.upper() + ' devices'} to train "
            "on, a process each. Use fewer."
        )
    training = not (args.resume or args.retrain or args.fast_dev_run or args.pretrained)
    holder = holder_of(task_dir(run_folder, args.task)) if lock else None
    if holder is not None:  # a live run, not a stopped one: say so before anything else
        refuse_in_use(task_dir(run_folder, args.task), holder)
    if training and os.path.isfile(last) and not os.path.isfile(saved):  # never deleted unasked
        sys.exit(
            f"error: {last} holds a training that stopped before its model was saved: run the same "
            "command with --resume to go on from it, or with --retrain to train anew (deleting it)."
        )
    files, folders = outputs(args, run_folder)
    for path, kind in [(f, "file") for f in files] + [(f, "folder") for f in folders]:
        if os.path.exists(path) and os.path.isdir(path) != (kind == "folder"):
            sys.exit(
                f"error: {path} is a {'file' if kind == 'folder' else 'folder'}, where the run "
                f"keeps a {kind}. Move it away, or use another --checkpoint-dir."
            )
    try:
        made = make_folders(run_folder)
        make_and_check_folder(run_folder)
    except OSError as error:
        sys.exit(f"error: --checkpoint-dir: cannot write to {run_folder} ({error}).")
    if args.compile:  # torch.compile's caches with the run's files, not in the system's /tmp
        cache = os.path.join(os.path.abspath(run_folder), "torch_compile_cache")
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", cache)
        os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(cache, "triton"))
    if lock:  # the folders made here go too, where the run leaves them empty
        lock_folder(os.path.dirname(files[-1]) if args.pretrained else folders[1], made)
        say_where(args, run_folder)
    return run_folder, device


def outputs(args, run_folder):
    """(files, folders) that the run writes: each must be of its kind, or be made."""
    if args.pretrained:
        folder = pretrained_dir(args.checkpoint_dir, args.task)
        files = [published_path(args.checkpoint_dir, args.task)]
        return files + [os.path.join(folder, "results.json")], [os.path.dirname(folder), folder]
    folder = task_dir(run_folder, args.task)
    files = [model_file(run_folder, args.task)]
    files += [os.path.join(folder, name) for name in ("results.json", "evaluation.json")]
    if args.task == "anomaly":
        files += [cache_path(run_folder, split, args.fast) for split in CACHE_FILES]
    logs = os.path.join(folder, "lightning_logs")
    folders = [folder, os.path.join(folder, "checkpoints"), logs]
    # TensorBoard's version_N folders: one that is a file would stop the run once it has begun.
    folders += sorted(glob.glob(os.path.join(logs, "version_*")))
    return files, [run_folder, *folders]


def pick_device(accelerator):
    """The device --accelerator names, chosen as Lightning chooses it for training (auto and gpu:
    CUDA, then Apple's MPS; auto then the CPU); features and sets are made there too. Exits with
    one line if there is no such device here."""
    is_there = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    available = [kind for kind, there in is_there.items() if there]
    if accelerator == "auto":
        return torch.device((available + ["cpu"])[0])
    wanted = ["cuda", "mps"] if accelerator == "gpu" else [accelerator]
    found = [kind for kind in wanted if kind == "cpu" or kind in available]
    if not found:
        kinds = " or ".join(kind.upper() for kind in wanted)
        sys.exit(
            f"error: --accelerator {accelerator}: this machine has no {kinds} device that PyTorch "
            "can use. Use --accelerator auto or cpu."
        )
    return torch.device(found[0])


def usable_devices(device):
    """How many devices of device's kind this process may train on: its CPU cores (a process
    each), the GPUs PyTorch sees, Apple's one MPS device."""
    if device.type == "cuda":
        return torch.cuda.device_count()
    if device.type == "mps":
        return 1
    return usable_cores()


def lightning_strategies():
    """The names --strategy may take: auto and those Lightning registers (ddp, fsdp, ...)."""
    return ["auto", *StrategyRegistry.available_strategies()]


def say_where(args, run_folder):
    """Run from another folder than the repository's, a relative --checkpoint-dir is a folder of
    its own: says where the files go, and where the run trains anew while a run in the repository
    left a model beside train.py, that it does not use it and how to."""
    if not run_from_elsewhere(args.checkpoint_dir):
        return
    print(f"Files go to {os.path.abspath(run_folder)} (--checkpoint-dir, relative to this folder).")
    beside = os.path.join(ROOT, args.checkpoint_dir)
    model = model_file(run_dir(beside, args.synthetic), args.task)
    if args.pretrained or os.path.isfile(model_file(run_folder, args.task)):
        return
    if os.path.isfile(model):
        print(
            f"This run trains a new model there, not using the one beside train.py, {model}; to "
            f"use that one instead, run with --checkpoint-dir {beside}."
        )
