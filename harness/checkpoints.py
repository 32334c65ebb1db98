"""Reading, loading and saving models: every checkpoint read as data only, the one loader of a
saved model (strict, its sizes and weights checked), and the best epoch kept as the task's model
with the settings it was trained with. (Lightning's own checkpoints are written by callbacks.py.)
"""

import inspect
import io
import os
import pickle
import shutil
import sys

import torch

from harness.files import save_atomically
from harness.settings import refuse_other_settings, run_settings


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


def load_model(path, model_class, io_dims=None, device="cpu", ckpt=None):
    """(model_class's model saved at path, in eval mode, on device; the checkpoint dict), made with
    its own hyper-parameters and its weights loaded strictly.
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
        make = lambda: model_class(**{k: v for k, v in hparams.items() if k in takes})
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


def load_saved_model(path, model_class, hparams, args):
    """train.py's saved model at path, once shown to be trained with the settings asked for;
    exits with one line otherwise."""
    hint = "Run with --retrain to train a new model in its place, or another --checkpoint-dir."
    io_dims = {k: hparams[k] for k in ("input_dim", "num_classes")}
    try:
        model, ckpt = load_model(path, model_class, io_dims)
    except ValueError as error:
        sys.exit(f"error: {error}. {hint}")
    refuse_other_settings(path, ckpt, hparams, args, hint)
    return model


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
