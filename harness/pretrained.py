"""The tutorial author's trained models, for `python train.py --pretrained`: downloaded once to
<checkpoint-dir>/pretrained/, kept only when whole and verified by their git blob id, and loaded
strictly; train.py then tests them as it tests a model it trained.
"""

import hashlib
import os
import shutil
import sys
import urllib.request

from harness.files import download_timeout, save_atomically
from harness.runs import load_model, task_dir

# Each task's file in phlippe/saved_models, and the file's git blob id there, which the download
# must match.
PUBLISHED_URL = "https://raw.githubusercontent.com/phlippe/saved_models/main/tutorial6/"
PUBLISHED = {
    "anomaly": ("SetAnomalyTask.ckpt", "d968830ea075a328847da19f8c349655d03ca88e"),
    "reverse": ("ReverseTask.ckpt", "fc76b13c0207fc8c3c3acdd2f453277024442b28"),
}


def pretrained_dir(checkpoint_dir, task):
    """Where the published model of task keeps its results.json: <checkpoint-dir>/pretrained/
    <TaskName>/, apart from a model trained here."""
    return task_dir(os.path.join(checkpoint_dir, "pretrained"), task)


def git_blob_id(path):
    """The id git gives the file at path: the SHA-1 of b"blob <size>\\0" and its bytes."""
    with open(path, "rb") as f:
        contents = f.read()
    return hashlib.sha1(b"blob %d\0" % len(contents) + contents).hexdigest()


def published_model(checkpoint_dir, task):
    """(path, git blob id) of the tutorial's model for task at <checkpoint-dir>/pretrained/, first
    downloaded if it is not there. A download is kept only once it is whole and verified; a file
    that is there is used only if its id is the published one. Exits with one line otherwise."""
    name, expected = PUBLISHED[task]
    path = os.path.join(checkpoint_dir, "pretrained", name)
    if not os.path.isfile(path):
        url = PUBLISHED_URL + name
        print(f"Downloading {url} to {path}")

        def download(tmp):
            # A new opener reads the proxy settings now; urlopen's is built once per process.
            opener = urllib.request.build_opener()
            with download_timeout(), opener.open(url) as response, open(tmp, "wb") as f:
                shutil.copyfileobj(response, f)
            found = git_blob_id(tmp)
            if found != expected:
                raise ValueError(f"the file downloaded has git blob id {found}, not {expected}")

        try:
            save_atomically(path, download)
        except (OSError, ValueError) as error:  # no network, HTTP errors, another file
            sys.exit(
                f"error: cannot get {url} ({type(error).__name__}: {error}). To place it by hand, "
                f"download it to {path}."
            )
        return path, expected  # verified before it was kept
    found = git_blob_id(path)
    if found != expected:
        sys.exit(
            f"error: {path} is not the published {name}: its git blob id is {found}, the "
            f"published one {expected}. Delete it and run again to download it."
        )
    return path, found


def load_published(path, model_class, io_dims, fast_parts=()):
    """The model saved at path, loaded strictly into model_class with its own hyper-parameters,
    once they are shown to fit the task's inputs and outputs (io_dims). Its git blob id was checked
    (published_model), so it is trusted to hold other Python objects than data, as checkpoints of
    older Lightning versions do. Exits with one line otherwise."""
    try:
        return load_model(path, model_class, io_dims, trusted=True, fast_parts=fast_parts)[0]
    except ValueError as error:
        sys.exit(f"error: {error}. Delete it and run again to download the published model.")
