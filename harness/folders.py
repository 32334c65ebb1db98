"""Where a run keeps its files: the run and task folders, the checkpoints, the saved model, the
results, and the tutorial author's models. Only the standard library here, so that the command
line can name them before the large libraries load.

    <checkpoint-dir>/                      train.py's CHECKPOINT_PATH, saved_models/ by default
        train_set_features.tar, ...        feature caches (caches.py; *_fast.tar for --fast)
        SetAnomalyDetect.ckpt              a task's best model (model_file)
        SetAnomalyDetect/                  a task's folder (task_dir)
            .lock                          the process that runs there (lock.py)
            checkpoints/epoch=N-step=M.ckpt  the best epoch's weights, while training
            checkpoints/last.ckpt          what --resume continues from (last_checkpoint)
            lightning_logs/version_N/      TensorBoard logs
            results.json                   the training's accuracies and settings (record_file)
            evaluation.json                a later run's test of the saved model
        ReverseTask.ckpt, ReverseTask/     the same for --task reverse (and Seq2SeqTask)
        figures/                           visualize.py's pictures (and its .lock)
        synthetic/                         the same for --synthetic (run_dir)
        pretrained/                        the tutorial author's models (published_path)
"""

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: train.py's


# Each task's folder (<name>/: logs, checkpoints, results.json) and best model (<name>.ckpt).
TASK_NAMES = {"anomaly": "SetAnomalyDetect", "reverse": "ReverseTask", "seq2seq": "Seq2SeqTask"}


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


# The tutorial author's published model of each task that has one (pretrained.py fetches them).
PUBLISHED_FILES = {"anomaly": "SetAnomalyTask.ckpt", "reverse": "ReverseTask.ckpt"}


def published_path(checkpoint_dir, task):
    """Where the published model of task is kept: <checkpoint-dir>/pretrained/<its file name>."""
    return os.path.join(checkpoint_dir, "pretrained", PUBLISHED_FILES[task])


def pretrained_dir(checkpoint_dir, task):
    """Where the published model of task keeps its results.json: <checkpoint-dir>/pretrained/
    <TaskName>/, apart from a model trained here."""
    return task_dir(os.path.join(checkpoint_dir, "pretrained"), task)


def record_file(folder, evaluated):
    """Where a run's results.json goes in a task's folder: results.json, the record of the saved
    model's training; a run that only evaluated that model writes evaluation.json beside it, or
    results.json where there is none (its training stopped once the model was saved)."""
    record = os.path.join(folder, "results.json")
    return (
        os.path.join(folder, "evaluation.json") if evaluated and os.path.isfile(record) else record
    )


def run_from_elsewhere(checkpoint_dir):
    """Whether a command runs from another folder than the repository's with a relative
    --checkpoint-dir, which is then a folder of its own there, not the one beside the scripts."""
    return not os.path.isabs(checkpoint_dir) and not os.path.samefile(os.getcwd(), ROOT)
