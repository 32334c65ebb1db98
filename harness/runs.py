"""Where a run keeps its files, and reading them back: the run and task folders, the folder lock,
the checkpoints, the one loader of a saved model, results.json's record, and the device a run
uses. train.py, predict.py, visualize.py and bench.py share these.

    <checkpoint-dir>/                      the post's CHECKPOINT_PATH, saved_models/ by default
        train_set_features.tar, ...        feature caches (features.py; *_fast.tar for --fast)
        SetAnomalyDetect.ckpt              a task's best model (model_file)
        SetAnomalyDetect/                  a task's folder (task_dir)
            .lock                          the process that runs there (lock_folder)
            checkpoints/epoch=N-step=M.ckpt  the best epoch's weights, while training
            checkpoints/last.ckpt          what --resume continues from (last_checkpoint)
            lightning_logs/version_N/      TensorBoard logs
            results.json                   the training's accuracies and settings
            evaluation.json                a later run's test of the saved model
        ReverseTask.ckpt, ReverseTask/     the same for --task reverse (and Seq2SeqTask)
        figures/                           visualize.py's pictures (and its .lock)
        synthetic/                         the same for --synthetic (run_dir)
        pretrained/                        the tutorial author's models (pretrained.py)
"""

import atexit
import contextlib
import difflib
import glob
import inspect
import io
import os
import pickle
import platform
import random
import shutil
import stat
import sys

import numpy as np
import pytorch_lightning as pl
import torch
import torchvision
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.strategies import StrategyRegistry

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

from data import NUM_CATEGORIES
from features import CACHE_FILES, FEATURE_DIM, cache_path
from harness.cli import CHECKPOINT_PATH, TASK_DEFAULTS, train_command, usable_cores
from harness.files import (
    free_mb,
    make_folders,
    make_writable,
    remove_empty,
    remove_left_temporaries,
    save_atomically,
)
from model import BitMaskDropout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: train.py's
# Each task's folder (<name>/: logs, checkpoints, results.json) and best model (<name>.ckpt).
TASK_NAMES = {"anomaly": "SetAnomalyDetect", "reverse": "ReverseTask", "seq2seq": "Seq2SeqTask"}
# Each task's model inputs and outputs: a feature in, one anomaly logit out, per image of a set; a
# one-hot digit in, a score per digit out, per position (seq2seq: the digits, then BOS, EOS, PAD).
IO_DIMS = {
    "anomaly": dict(input_dim=FEATURE_DIM, num_classes=1),
    "reverse": dict(input_dim=NUM_CATEGORIES, num_classes=NUM_CATEGORIES),
    "seq2seq": dict(input_dim=NUM_CATEGORIES + 3, num_classes=NUM_CATEGORIES + 3),
}


def run_dir(checkpoint_dir, synthetic=False):
    """The folder of a run's feature caches and models: <checkpoint-dir>, or for --synthetic its
    synthetic/ sub-folder, apart from a real run's files."""
    return os.path.join(checkpoint_dir, "synthetic") if synthetic else checkpoint_dir


def task_dir(run_folder, task="anomaly"):
    """A task's folder in a run folder: <TaskName>/, with its logs, checkpoints and results.json."""
    return os.path.join(run_folder, TASK_NAMES[task])


def last_checkpoint(run_folder, task="anomaly"):
    """A task's full checkpoint (optimizer, scheduler, loop state), replaced after every epoch, that
    --resume continues from: <TaskName>/checkpoints/last.ckpt, beside the best epoch's weights."""
    return os.path.join(task_dir(run_folder, task), "checkpoints", "last.ckpt")


def model_file(run_folder, task="anomaly"):
    """A task's best model in a run folder: <TaskName>.ckpt (the post's SetAnomalyDetect.ckpt)."""
    return task_dir(run_folder, task) + ".ckpt"


HELD_LOCKS = {}  # folder -> (its open .lock, the folders made for it), held until the process ends


def lock_folder(folder, made=()):
    """Takes folder for this process alone, before any work there: one run at a time writes a
    task's model, checkpoints and results. The lock is <folder>/.lock, held with flock, which the
    system releases when the process ends in any way, so a killed run never blocks the next; a run
    that ends normally removes it (release_locks). A .lock that is a link, a folder or anything but
    a file is never opened through. Exits with one line naming the process that holds it. made:
    folders, outside folder, that were made for the run: removed with the lock where left empty."""
    if fcntl is None or os.path.realpath(folder) in HELD_LOCKS:  # Windows has no flock
        return
    made = make_folders(folder) + list(made)
    path = os.path.join(folder, ".lock")
    while True:
        try:  # O_NOFOLLOW: a link planted there is refused, not written through
            f = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644), "r+")
        except OSError:
            f = None
        if f is None or not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            kind = "a folder" if os.path.isdir(path) else "not a plain file"
            kind = "a link" if os.path.islink(path) else kind
            sys.exit(f"error: {path} is {kind}, where a run keeps its lock file. Remove it.")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            refuse_in_use(folder, f.read())
        # A run that finished between the open and the flock removed the file locked here: lock
        # the one at the path now, or two runs would each hold a file of their own.
        if is_file_at(f, path):
            break
        f.close()
    try:
        write_holder(f)
    except OSError as error:  # a full disk, say: no lock left behind, and the file named
        f.close()
        os.remove(path)
        remove_empty(made)
        sys.exit(
            f"error: cannot write {path} ({error.strerror}; {free_mb(folder):.0f} MB free there). "
            "Free some space, or use another --checkpoint-dir."
        )
    if not HELD_LOCKS:
        atexit.register(release_locks)
    HELD_LOCKS[os.path.realpath(folder)] = f, made


def write_holder(f):
    """Writes into the lock file f which process holds it: a second run names it."""
    f.truncate()
    f.write(f"process {os.getpid()} ({' '.join(['python', *sys.argv])})")
    f.flush()


def refuse_in_use(folder, holder):
    """Exits: folder is taken by the live process that holder (its .lock's text) names, shown
    printable (the text is any process's, escape sequences included)."""
    holder = "".join(c if c.isprintable() else "?" for c in holder.strip()[:500])
    sys.exit(
        f"error: {folder} is in use by {holder or 'another process'}. Wait for it to finish, or "
        "use another --checkpoint-dir."
    )


def holder_of(folder):
    """The text of folder's .lock if a live process holds it, else None."""
    path = os.path.join(folder, ".lock")
    if fcntl is None or not os.path.isfile(path) or os.path.islink(path):
        return None
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return f.read()
    return None


def release_locks():
    """Removes the .lock files this process holds, then lets go of them: a finished run leaves no
    lock naming a process that is gone. (A killed run's lock stays, and flock holds it no more.)
    The folders made for a lock go too where the run left them empty (it failed offline, say)."""
    for folder, (f, made) in HELD_LOCKS.items():
        path = os.path.join(folder, ".lock")
        with contextlib.suppress(OSError):  # a folder made read-only meanwhile keeps it: harmless
            if is_file_at(f, path):
                os.remove(path)
        f.close()
        remove_empty(made)
    HELD_LOCKS.clear()


def is_file_at(f, path):
    """Whether the open file f is the one at path (not one removed, nor another made there)."""
    return os.path.lexists(path) and os.path.samestat(os.fstat(f.fileno()), os.lstat(path))


# --------------------------------------------------------------------------------------------------
# Before any work: the checks that need the run's folder and device
# --------------------------------------------------------------------------------------------------


def outputs(args, run_folder):
    """(files, folders) that the run writes: each must be of its kind, or be made."""
    from harness.pretrained import pretrained_dir, published_path  # it imports this module

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
        make_writable(run_folder)
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


def refuse_unresumable(args, last, saved):
    """Exits with one line, before any work, where --resume cannot go on: no last.ckpt (the model
    saved already, or no training), or one trained with other run settings (--fast, --precision,
    ...), which need no data to compare."""
    if not os.path.isfile(last) and os.path.isfile(saved):
        sys.exit(
            f"error: --resume: the training finished and its model is saved as {saved}; nothing "
            "is left to resume. Run without --resume to evaluate it, or with --retrain to train "
            "anew."
        )
    if not os.path.isfile(last):
        sys.exit(
            f"error: --resume found no {last} to continue from. Run without --resume to start anew."
        )
    try:
        refuse_other_settings(last, read_checkpoint(last), {}, args, RESUME_HINT, resume=True)
    except ValueError as error:
        sys.exit(f"error: {error}. {RESUME_HINT}")


def run_from_elsewhere(checkpoint_dir):
    """Whether a command runs from another folder than the repository's with the default
    --checkpoint-dir, which is then a folder of its own there, not the one beside the scripts."""
    return checkpoint_dir == CHECKPOINT_PATH and not os.path.samefile(os.getcwd(), ROOT)


def say_where(args, run_folder):
    """Run from another folder than the repository's, the default --checkpoint-dir is a folder of
    its own: says where the files go, and where the run trains anew while a run in the repository
    left a model beside train.py, that it does not use it and how to."""
    if not run_from_elsewhere(args.checkpoint_dir):
        return
    print(f"Files go to {os.path.abspath(run_folder)} (--checkpoint-dir, in this folder).")
    beside = os.path.join(ROOT, CHECKPOINT_PATH)
    model = model_file(run_dir(beside, args.synthetic), args.task)
    if args.pretrained or os.path.isfile(model_file(run_folder, args.task)):
        return
    if os.path.isfile(model):
        print(
            f"This run trains a new model there, not using the one beside train.py, {model}; to "
            f"use that one instead, run with --checkpoint-dir {beside}."
        )


# --------------------------------------------------------------------------------------------------
# Checkpoints: reading, loading a saved model, saving the best epoch
# --------------------------------------------------------------------------------------------------


def read_checkpoint(path, contents=None):
    """The dict of the Lightning checkpoint at path, read as data only (torch.load's weights_only:
    tensors, numbers, strings, lists and dicts), never as code that a file could carry. contents:
    the file's bytes where they were read (and verified) already, so that what is loaded is what was
    checked, not what the path holds by now. Raises ValueError saying what is wrong."""
    source = path if contents is None else io.BytesIO(contents)
    try:
        ckpt = torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "GLOBAL " not in str(error):  # not a checkpoint at all
            raise ValueError(f"{path} cannot be read (UnpicklingError)") from None
        found = str(error).split("GLOBAL ")[1].split()[0]  # "... GLOBAL posix.system ..."
        raise ValueError(
            f"{path} holds a Python object ({found}) that loading would run as code; this "
            "project reads only checkpoints of tensors, numbers, strings and dicts"
        ) from None
    except Exception as error:
        raise ValueError(f"{path} cannot be read ({type(error).__name__})") from None
    if not (
        isinstance(ckpt, dict)
        and isinstance(ckpt.get("state_dict"), dict)
        and isinstance(ckpt.get("hyper_parameters"), dict)
    ):
        raise ValueError(
            f"{path} is not a Lightning checkpoint (the post's torch.save(model, ...) writes a "
            "pickled module instead)"
        )
    if not isinstance(ckpt.get("train_settings", {}), dict):
        raise ValueError(f"{path} holds run settings that are not a dict: not a file of train.py")
    return ckpt


def io_mismatch(hparams, io_dims):
    """Where a saved model's hyper-parameters differ from io_dims, the task's inputs and outputs
    (input_dim, num_classes), as "name saved (needs wanted)": a model of another task differs."""
    hparams = hparams if isinstance(hparams, dict) else {}
    return [
        f"{k} {hparams.get(k)!r} (needs {v})" for k, v in io_dims.items() if hparams.get(k) != v
    ]


def load_model(path, model_class, io_dims=None, device="cpu", ckpt=None, **kwargs):
    """(model_class's model saved at path, in eval mode, on device; the checkpoint dict), made with
    its own hyper-parameters and its weights loaded strictly; kwargs go to the model (fast_parts).
    ckpt: the checkpoint's dict where it was read already (read_checkpoint). Raises ValueError
    saying why it cannot be used: unreadable, not a Lightning checkpoint, its input and output
    sizes other than io_dims (a model of another task), weights that are not finite numbers or do
    not fit."""
    ckpt = read_checkpoint(path) if ckpt is None else ckpt
    hparams = ckpt["hyper_parameters"]
    wrong = io_mismatch(hparams, io_dims or {})
    if wrong:
        raise ValueError(f"{path} is a model of another task: {', '.join(wrong)}")
    state = ckpt["state_dict"]
    bad = [k for k, v in state.items() if torch.is_tensor(v) and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{path} holds weights that are not finite numbers ({', '.join(bad)})")
    try:
        # As Lightning's load_from_checkpoint: the hyper-parameters the class takes.
        takes = inspect.signature(model_class.__init__).parameters
        make = lambda: model_class(**{k: v for k, v in hparams.items() if k in takes}, **kwargs)
        # Made first on the meta device, which allocates nothing: hyper-parameters that claim a
        # huge model are refused by their weights' shapes before any memory is spent on them.
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in make().state_dict().items()}
        found = {k: tuple(v.shape) for k, v in state.items() if torch.is_tensor(v)}
        differ = [k for k in sorted(shapes.keys() | found.keys()) if shapes.get(k) != found.get(k)]
        if differ:
            raise RuntimeError(
                f"weight {differ[0]} is {found.get(differ[0], 'missing')} in the file, "
                f"{shapes.get(differ[0], 'none')} by its hyper-parameters"
            )
        model = make()
        model.load_state_dict(state, strict=True)
    except Exception as error:  # missing or misshapen weights, hyper-parameters it cannot take
        first_line = (str(error).strip().splitlines() or [""])[0]
        raise ValueError(
            f"{path} does not load into {model_class.__name__} "
            f"({type(error).__name__}: {first_line})"
        ) from None
    return model.to(device).eval(), ckpt


def run_settings(args, resume=False):
    """The run's settings that a saved model must match besides its hyper-parameters; with resume,
    all that shape training, which --resume must match as well."""
    settings = dict(
        batch_size=args.batch_size,
        epochs=args.epochs,
        gradient_clip_val=args.gradient_clip_val,
        seed=args.seed,
    )
    if args.task == "anomaly":
        settings["set_size"] = args.set_size
    if resume:  # the same model may be loaded by any of these, but not trained on with others
        settings.update(
            precision=args.precision,
            fast=args.fast,
            compile=args.compile,
            devices=args.devices,
            strategy=args.strategy,
        )
    return settings


class SeedEachProcess(pl.Callback):
    """With several processes, seeds process r with seed + r once they are set up.

    Lightning seeds every process alike, so without this each would draw the same random sets
    (numpy) and dropout masks (torch) as the others. One process keeps the run's seed untouched.
    """

    def __init__(self, seed):
        self.seed = seed

    def setup(self, trainer, pl_module, stage):
        if trainer.world_size > 1:
            pl.seed_everything(self.seed + trainer.global_rank, verbose=False)
            # But Lightning's DistributedSampler shuffles with PL_GLOBAL_SEED, which must be the
            # same in every process: otherwise their shares of an epoch overlap.
            os.environ["PL_GLOBAL_SEED"] = str(self.seed)


def logs_version(root_dir, resume):
    """The TensorBoard version_N folder a run logs to under root_dir/lightning_logs: None for a new
    one; with --resume the newest, so that the interrupted run's curves continue."""
    logs = os.path.join(root_dir, "lightning_logs")
    if not (resume and os.path.isdir(logs)):
        return None
    found = [name[8:] for name in os.listdir(logs) if name.startswith("version_")]
    return max((int(n) for n in found if n.isdigit()), default=None)


class KeepRunState(pl.Callback):
    """Writes into every checkpoint Lightning saves the run's settings that shape training, so that
    --resume can compare them with those asked for, and every process's random generators; a
    resumed training puts these back as it starts, so it draws the sets and dropout masks that
    the uninterrupted training would have drawn, and ends where that one ends."""

    def __init__(self, args):
        self.settings = run_settings(args, resume=True)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        checkpoint["train_settings"] = self.settings
        states = [random_states(pl_module)]
        if trainer.world_size > 1:  # every process saves its own draws, in rank order
            states = [None] * trainer.world_size
            torch.distributed.all_gather_object(states, random_states(pl_module))
        checkpoint["random_states"] = states

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        # Now, before the training loader's first iterator draws its seed, as the uninterrupted
        # run's next epoch does right after the save. (Lightning's sanity check draws nothing.)
        states = checkpoint.get("random_states")
        if isinstance(states, list) and len(states) == trainer.world_size:
            set_random_states(states[trainer.global_rank], pl_module)


def random_states(pl_module):
    """This process's random generators as a checkpoint holds them (tensors, numbers, lists and
    dicts): torch's and CUDA's (dropout, the order of the sets), numpy's (the post's set draws),
    Python's, and each fast-path dropout's bit generator."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss],
        "python": random.getstate(),
        "dropout_bits": [
            d.bit_generator and d.bit_generator.state for d in bit_dropouts(pl_module)
        ],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_random_states(states, pl_module):
    """Puts back what random_states took."""
    torch.set_rng_state(states["torch"])
    kind, keys, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    random.setstate(states["python"])
    for dropout, state in zip(bit_dropouts(pl_module), states["dropout_bits"], strict=True):
        dropout.bit_generator = None
        if state is not None:
            dropout.bit_generator = np.random.PCG64()
            dropout.bit_generator.state = state
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def bit_dropouts(pl_module):
    """The fast path's dropout layers of pl_module, each with a random generator of its own."""
    return [m for m in pl_module.modules() if isinstance(m, BitMaskDropout)]


def refuse_other_settings(path, ckpt, hparams, args, hint, resume=False):
    """Exits with one line, listing each difference, if the checkpoint at path (its dict ckpt) was
    trained with other hyper-parameters or run settings than asked for."""
    trained_with = ckpt.get("train_settings", {})
    saved = dict(ckpt["hyper_parameters"], **trained_with)
    asked = run_settings(args, resume)
    asked = dict(hparams, **{k: v for k, v in asked.items() if k in trained_with})
    differ = {k: (saved.get(k), v) for k, v in asked.items() if saved.get(k) != v}
    if differ.keys() & {"epochs", "batch_size"}:
        differ.pop("max_iters", None)  # the steps follow from these two, named already
    differ = [setting_text(k, *values) for k, values in differ.items()]
    if differ:
        sys.exit(
            f"error: {path} was trained with other settings than asked for: "
            f"{', '.join(differ)}. {hint}"
        )


# The settings that no flag sets directly, as a user knows them.
DERIVED_SETTINGS = {
    "max_iters": "training steps",
    "input_dim": "input features",
    "num_classes": "classes",
}


def setting_text(name, saved, asked):
    """A saved setting against the one asked for, in the user's flags: "--epochs 2 (asked 3)";
    those that no flag sets by their own names: "training steps 30 (asked 45)"."""
    if name in DERIVED_SETTINGS:
        return f"{DERIVED_SETTINGS[name]} {saved!r} (asked {asked!r})"
    flag = "--" + name.replace("_", "-")
    if isinstance(asked, bool):
        return f"{'with' if saved else 'without'} {flag} (asked {'with' if asked else 'without'})"
    return f"{flag} {saved} (asked {asked})"


def load_saved_model(path, model_class, hparams, args, fast_parts=()):
    """train.py's saved model at path, once shown to be trained with the settings asked for;
    exits with one line otherwise."""
    hint = "Run with --retrain to train a new model in its place, or another --checkpoint-dir."
    io_dims = {k: hparams[k] for k in ("input_dim", "num_classes")}
    try:
        model, ckpt = load_model(path, model_class, io_dims, fast_parts=fast_parts)
    except ValueError as error:
        sys.exit(f"error: {error}. {hint}")
    refuse_other_settings(path, ckpt, hparams, args, hint)
    return model


RESUME_HINT = "Resume with the settings of the interrupted run, or train anew without --resume."


def resume_from(args, hparams, last):
    """With --resume, the last checkpoint, once its schedule, settings and weights are shown to fit
    what is asked, and its paths moved to where the run folder is now; otherwise None, after
    clearing its folder (its checkpoints would be mistaken for this run's)."""
    if args.resume:
        folder = os.path.dirname(last)
        for name in os.listdir(folder):  # what a killed writer left: last.ckpt.tmp<pid>, say
            written, _, pid = name.rpartition(".tmp")
            if written and pid.isdigit():
                remove_left_temporaries(os.path.join(folder, written))
        try:
            ckpt = read_checkpoint(last)
        except ValueError as error:
            sys.exit(f"error: {error}. {RESUME_HINT}")
        refuse_other_settings(last, ckpt, hparams, args, RESUME_HINT, resume=True)
        relocate(ckpt, last)
        return last
    if not args.fast_dev_run:  # a fast dev run writes no checkpoint, so it clears none
        shutil.rmtree(os.path.dirname(last), ignore_errors=True)
    return None


def relocate(ckpt, last):
    """Points the ModelCheckpoint states in last.ckpt (ckpt, its dict) at last's own folder and
    writes it back. Lightning keeps absolute paths there: after the run folder was moved or copied
    it would forget the best epoch, or follow the paths to the old folder."""
    folder = os.path.realpath(os.path.dirname(last))  # as ModelCheckpoint keeps its dirpath
    moved = lambda path: os.path.join(folder, os.path.basename(path)) if path else path
    changed = False
    for state in ckpt.get("callbacks", {}).values():
        if not (isinstance(state, dict) and "dirpath" in state):
            continue
        if state["dirpath"] != folder:
            state["dirpath"], changed = folder, True
            for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
                state[key] = moved(state.get(key, ""))
            best_k = state.get("best_k_models", {}).items()
            state["best_k_models"] = {moved(p): v for p, v in best_k}
        # Checked before any work, moved or not: Lightning would train every epoch left, then
        # fail to read the best one.
        best = state.get("best_model_path")
        if best and not os.path.isfile(best):
            sys.exit(
                f"error: {last} continues from its best epoch {os.path.basename(best)}, which is "
                f"not in {folder}: copy the whole run folder, or train anew without --resume."
            )
    if changed:
        save_atomically(last, lambda tmp: torch.save(ckpt, tmp))


# What a stop while the best epoch is being saved leaves: the whole training, in last.ckpt.
SAVING_STOPPED = (
    "the training had finished its epochs: run the same command with --resume (in place of "
    "--retrain) to save its best epoch and test it."
)


def save_model(ckpt, path, args):
    """Keeps the best epoch's checkpoint dict ckpt at path as a Lightning checkpoint with the run's
    settings (the post's torch.save(model, ...) pickles the module, which load_from_checkpoint
    cannot read). The records of the model it replaces go first, so that none ever describes
    another model; the training's checkpoints go once it is saved: nothing is left to resume."""
    for name in ("results.json", "evaluation.json"):
        record = os.path.join(path.removesuffix(".ckpt"), name)
        if os.path.isfile(record):
            os.remove(record)
    ckpt = dict(ckpt, train_settings=run_settings(args))
    save_atomically(path, lambda tmp: torch.save(ckpt, tmp))
    shutil.rmtree(os.path.join(path.removesuffix(".ckpt"), "checkpoints"), ignore_errors=True)


class BestCheckpoint(ModelCheckpoint):
    """The best epoch's checkpoint, by validation accuracy, written as the epoch ends and just
    before last.ckpt. Lightning would remove the one it replaces at once, while last.ckpt still
    named it: a stop between the two writes left a training that --resume could not continue.
    Here the replaced one goes only as the next epoch starts, when last.ckpt names its successor;
    so whatever moment a run stops, the best epoch that last.ckpt names is on disk."""

    def __init__(self, dirpath):
        super().__init__(dirpath, monitor="val_acc", mode="max", save_weights_only=True)
        self.replaced = []

    def _remove_checkpoint(self, trainer, filepath):
        self.replaced.append(filepath)

    def on_train_epoch_start(self, trainer, pl_module):
        for path in self.replaced:
            super()._remove_checkpoint(trainer, path)
        self.replaced = []


class StopDiverging(pl.Callback):
    """Stops a training whose loss is no longer a finite number, at the first such step and before
    its update, with one line: a too large learning rate does this, and every later step and
    checkpoint would hold NaN. Its checkpoints go: resuming would diverge again, and another
    learning rate is a new training."""

    def __init__(self, args, checkpoints):
        self.args, self.checkpoints = args, checkpoints

    def on_before_backward(self, trainer, pl_module, loss):
        if torch.isfinite(loss).all():
            return
        shutil.rmtree(self.checkpoints, ignore_errors=True)
        args, usual = self.args, TASK_DEFAULTS[self.args.task]["lr"]
        smaller = usual if args.lr > usual else args.lr / 10  # the task's own, or a tenth
        command = train_command(
            "--lr", f"{smaller:g}", synthetic=args.synthetic, checkpoint_dir=args.checkpoint_dir,
            task=args.task,
        )  # fmt: skip
        sys.exit(
            f"error: the training diverged: its loss became {loss.item()} at epoch "
            f"{trainer.current_epoch + 1}, step {trainer.global_step + 1}, with --lr {args.lr:g}. "
            f"Its checkpoints are removed (resuming would diverge again); train anew with a "
            f"smaller learning rate, e.g. `{command}`."
        )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, writing each checkpoint beside its place and renaming it
    there (save_atomically): Lightning's own writes it in the system's temporary folder and moves
    it, which across file systems is a copy that a kill leaves half done."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        save_atomically(str(path), lambda tmp: torch.save(checkpoint, tmp))


def record_file(folder, evaluated):
    """Where a run's results.json goes in a task's folder: results.json, the record of the saved
    model's training; a run that only evaluated that model writes evaluation.json beside it, or
    results.json where there is none (its training stopped once the model was saved)."""
    record = os.path.join(folder, "results.json")
    return (
        os.path.join(folder, "evaluation.json") if evaluated and os.path.isfile(record) else record
    )


# --------------------------------------------------------------------------------------------------
# The device
# --------------------------------------------------------------------------------------------------


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


def device_name(device):
    """The GPU's name, or the CPU's as the platform reports it: what results are measured on."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):  # Linux names the model; platform.processor() often not
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def results_record(result, args, device, seconds, **record):
    """What results.json holds: the accuracies (result), what was tested (record: trained,
    checkpoint, ...), the run's settings, the device, its CPU threads and library versions, and the
    seconds."""
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pytorch_lightning": pl.__version__,
        "numpy": np.__version__,
    }
    return dict(
        result,
        **record,
        settings=vars(args),
        device=device_name(device),
        cpu_threads=torch.get_num_threads(),  # their number changes the arithmetic (threads.py)
        versions=versions,
        seconds=seconds,
    )
