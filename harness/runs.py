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

import inspect
import os
import pickle
import platform
import shutil
import sys

import numpy as np
import pytorch_lightning as pl
import torch
import torchvision

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

from data import NUM_CATEGORIES
from features import FEATURE_DIM
from harness.files import save_atomically

CHECKPOINT_PATH = "saved_models"  # the post's: where a run keeps its files (--checkpoint-dir)
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


HELD_LOCKS = {}  # the folders this process holds, with their open .lock: held until it ends


def lock_folder(folder):
    """Takes folder for this process alone, before any work there: one run at a time writes a
    task's model, checkpoints and results. The lock is <folder>/.lock, held with flock, which the
    system releases when the process ends in any way, so a killed run never blocks the next. Exits
    with one line naming the process that holds it."""
    if fcntl is None or os.path.realpath(folder) in HELD_LOCKS:  # Windows has no flock
        return
    os.makedirs(folder, exist_ok=True)
    f = open(os.path.join(folder, ".lock"), "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        sys.exit(
            f"error: {folder} is in use by {holder}. Wait for it to finish, or use another "
            "--checkpoint-dir."
        )
    f.seek(0)
    f.truncate()
    f.write(f"process {os.getpid()} ({' '.join(['python', *sys.argv])})")
    f.flush()
    HELD_LOCKS[os.path.realpath(folder)] = f


# --------------------------------------------------------------------------------------------------
# Checkpoints: reading, loading a saved model, saving the best epoch
# --------------------------------------------------------------------------------------------------


def read_checkpoint(path, trusted=False):
    """The dict of the Lightning checkpoint at path, read as data only (torch.load's weights_only:
    tensors, numbers, strings, lists and dicts), never as code that a file could carry. trusted: a
    file verified otherwise (the published models, by their git blob id) may hold other Python
    objects. Raises ValueError saying what is wrong."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "GLOBAL " not in str(error):  # not a checkpoint at all
            raise ValueError(f"{path} cannot be read (UnpicklingError)") from None
        if not trusted:  # torch names the object: "... GLOBAL posix.system ..."
            found = str(error).split("GLOBAL ")[1].split()[0]
            raise ValueError(
                f"{path} holds a Python object ({found}) that loading would run as code; this "
                "project reads only checkpoints of tensors, numbers, strings and dicts"
            ) from None
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
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
    return ckpt


def io_mismatch(hparams, io_dims):
    """Where a saved model's hyper-parameters differ from io_dims, the task's inputs and outputs
    (input_dim, num_classes), as "name saved (needs wanted)": a model of another task differs."""
    hparams = hparams if isinstance(hparams, dict) else {}
    return [
        f"{k} {hparams.get(k)!r} (needs {v})" for k, v in io_dims.items() if hparams.get(k) != v
    ]


def load_model(path, model_class, io_dims=None, device="cpu", trusted=False, **kwargs):
    """(model_class's model saved at path, in eval mode, on device; the checkpoint dict), made with
    its own hyper-parameters and its weights loaded strictly; kwargs go to the model (fast_parts).
    Raises ValueError saying why it cannot be used: unreadable, not a Lightning checkpoint, its
    input and output sizes other than io_dims (a model of another task), weights that are not
    finite numbers or do not fit. trusted: as read_checkpoint's."""
    ckpt = read_checkpoint(path, trusted)
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
        model = model_class(**{k: v for k, v in hparams.items() if k in takes}, **kwargs)
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
            precision=args.precision, fast=args.fast, compile=args.compile, devices=args.devices
        )
    return settings


class KeepSettings(pl.Callback):
    """Writes the run's settings that shape training into every checkpoint Lightning saves, so
    that --resume can compare them with those asked for."""

    def __init__(self, args):
        self.settings = run_settings(args, resume=True)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        checkpoint["train_settings"] = self.settings


def refuse_other_settings(path, ckpt, hparams, args, hint, resume=False):
    """Exits with one line, listing each difference, if the checkpoint at path (its dict ckpt) was
    trained with other hyper-parameters or run settings than asked for."""
    trained_with = ckpt.get("train_settings", {})
    saved = dict(ckpt["hyper_parameters"], **trained_with)
    asked = run_settings(args, resume)
    asked = dict(hparams, **{k: v for k, v in asked.items() if k in trained_with})
    differ = [f"{k} {saved.get(k)!r} (asked {v!r})" for k, v in asked.items() if saved.get(k) != v]
    if differ:
        sys.exit(
            f"error: {path} was trained with other settings than asked for: "
            f"{', '.join(differ)}. {hint}"
        )


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


def resume_from(args, hparams, last):
    """With --resume, the last checkpoint, once its schedule, settings and weights are shown to fit
    what is asked, and its paths moved to where the run folder is now; otherwise None, after
    clearing its folder (its checkpoints would be mistaken for this run's)."""
    if args.resume:
        hint = "Resume with the settings of the interrupted run, or train anew without --resume."
        try:
            ckpt = read_checkpoint(last)
        except ValueError as error:
            sys.exit(f"error: {error}. {hint}")
        refuse_other_settings(last, ckpt, hparams, args, hint, resume=True)
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
        if not (isinstance(state, dict) and "dirpath" in state) or state["dirpath"] == folder:
            continue
        state["dirpath"], changed = folder, True
        for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
            state[key] = moved(state.get(key, ""))
        state["best_k_models"] = {moved(p): v for p, v in state.get("best_k_models", {}).items()}
        best = state["best_model_path"]
        if best and not os.path.isfile(best):
            sys.exit(
                f"error: {last} continues from its best epoch {os.path.basename(best)}, which is "
                f"not in {folder}: copy the whole run folder, or train anew without --resume."
            )
    if changed:
        save_atomically(last, lambda tmp: torch.save(ckpt, tmp))


def save_model(ckpt, path, args):
    """Keeps the best epoch's checkpoint dict ckpt at path as a Lightning checkpoint with the run's
    settings (the post's torch.save(model, ...) pickles the module, which load_from_checkpoint
    cannot read)."""
    ckpt = dict(ckpt, train_settings=run_settings(args))
    save_atomically(path, lambda tmp: torch.save(ckpt, tmp))


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


def usable_cores():
    """The CPU cores this process may run on (its affinity: a container's or taskset's share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def cpu_threads(task, devices=1):
    """The CPU threads a run computes with: one for the sequence tasks, whose tiny steps gain next
    to nothing from a second but lose much when another process takes a core: PyTorch's threads
    spin while they wait for each other, so a step waits for the thread that is not running
    (BENCHMARKS.md, "A shared machine: CPU threads"). The set task keeps the usable cores, shared
    between the run's processes. Chosen by the work, not by the load of the moment: the same
    command trains the same model on every run."""
    return 1 if task != "anomaly" else max(1, usable_cores() // devices)


def use_cpu_threads(task, devices=1):
    """Sets torch's CPU threads to cpu_threads(task, devices), unless OMP_NUM_THREADS chooses (as
    OMP_NUM_THREADS=1 does best for the set task on a busy machine)."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(cpu_threads(task, devices))


def device_name(device):
    """The GPU's name, or the CPU's as the platform reports it: what results are measured on."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or "cpu"


def results_record(result, args, device, seconds, **record):
    """What results.json holds: the accuracies (result), what was tested (record: trained,
    checkpoint, ...), the run's settings, the device and library versions, and the seconds."""
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
        versions=versions,
        seconds=seconds,
    )
