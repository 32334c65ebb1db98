"""A run's settings beyond the model's hyper-parameters, as its checkpoints keep them, and the
refusal, in the user's own flags, of a checkpoint trained with other settings than those asked for.
"""

import sys


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
