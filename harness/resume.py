"""A training that goes on where it stopped (train.py --resume): refused before any work where it
cannot, its last checkpoint pointed at the folder it is in now, its logs continued, and the random
generators of every process kept in each checkpoint and put back, so that a resumed training ends
with the weights of an uninterrupted one.
"""

import os
import random
import shutil
import sys

import numpy as np
import pytorch_lightning as pl
import torch

from harness.checkpoints import read_checkpoint
from harness.fast import BitMaskDropout
from harness.files import remove_left_temporaries, save_atomically
from harness.settings import refuse_other_settings, run_settings

RESUME_HINT = "Resume with the settings of the interrupted run, or train anew without --resume."


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
