"""The tutorial author's trained models, for `python train.py --pretrained`: downloaded once to
<checkpoint-dir>/pretrained/, kept only when whole and verified by their git blob id, read once and
as data, and loaded strictly; train.py then tests them as it tests a model it trained.
"""

import hashlib
import os
import sys
import urllib.request

from harness.checkpoints import load_model, read_checkpoint
from harness.files import download_timeout, read_response, save_atomically
from harness.folders import PUBLISHED_FILES, published_path
from harness.sources import MissingResources

# Where phlippe/saved_models keeps each task's file, and the file's git blob id there, which the
# download must match.
PUBLISHED_URL = "https://raw.githubusercontent.com/phlippe/saved_models/main/tutorial6/"
PUBLISHED_IDS = {
    "anomaly": "d968830ea075a328847da19f8c349655d03ca88e",
    "reverse": "fc76b13c0207fc8c3c3acdd2f453277024442b28",
}


def git_blob_id(contents):
    """The id git gives a file of these bytes: the SHA-1 of b"blob <size>\\0" and the bytes."""
    return hashlib.sha1(b"blob %d\0" % len(contents) + contents).hexdigest()


def fetch_published(checkpoint_dir, task):
    """(path, git blob id, checkpoint dict) of the tutorial's model for task at
    <checkpoint-dir>/pretrained/, first downloaded if it is not there. The file is read once: its
    bytes are verified by their git blob id, and the checkpoint is read from those very bytes, as
    data (checkpoints.read_checkpoint), so a file put in its place meanwhile is never loaded. A
    download is kept only once it is whole and verified. Raises MissingResources where the file is
    neither there nor downloadable; exits with one line where it is another file."""
    name, expected = PUBLISHED_FILES[task], PUBLISHED_IDS[task]
    path = published_path(checkpoint_dir, task)
    if os.path.isfile(path):
        with open(path, "rb") as f:
            contents = f.read()
        found = git_blob_id(contents)
        if found != expected:
            sys.exit(
                f"error: {path} is not the published {name}: its git blob id is {found}, the "
                f"published one {expected}. Delete it and run again to download it."
            )
    else:
        contents = download(PUBLISHED_URL + name, path, expected)
    try:
        return path, expected, read_checkpoint(path, contents)
    except ValueError as error:
        sys.exit(f"error: {error}. Delete it and run again to download the published model.")


def download(url, path, expected):
    """The bytes at url, once their git blob id is shown to be expected, kept at path (written
    atomically). Raises MissingResources where they cannot be had (offline, say); exits with one
    line where another file came."""
    print(f"Downloading {url} to {path}")
    got = []

    def write(tmp):
        # A new opener reads the proxy settings now; urlopen's is built once per process.
        opener = urllib.request.build_opener()
        with download_timeout(), opener.open(url) as response:
            contents = read_response(response)
        found = git_blob_id(contents)
        if found != expected:
            raise ValueError(f"the file downloaded has git blob id {found}, not {expected}")
        with open(tmp, "wb") as f:
            f.write(contents)
        got.append(contents)

    try:
        save_atomically(path, write)
    except ValueError as error:  # another file than the published one: a proxy's page, say
        sys.exit(f"error: cannot get {url} ({error}). To place it by hand, download it to {path}.")
    except OSError as error:  # no network, HTTP errors, too slow
        name = os.path.basename(path)
        raise MissingResources(
            [
                f"the tutorial's {name} ({type(error).__name__}: {error}): expected at {path}. "
                f"To place it by hand, download {url} to that path."
            ],
            needs="--pretrained",
        ) from None
    return got[0]


def load_published(published, model_class, io_dims):
    """The model of published (fetch_published's path, id and checkpoint), loaded strictly into
    model_class with its own hyper-parameters, once they are shown to fit the task's inputs and
    outputs (io_dims). Exits with one line otherwise."""
    path, _, ckpt = published
    try:
        return load_model(path, model_class, io_dims, ckpt=ckpt)[0]
    except ValueError as error:
        sys.exit(f"error: {error}. Delete it and run again to download the published model.")


def published_record(published, model):
    """What results.json records of the published model tested: its file, its git blob id (of
    fetch_published's published) and its hyper-parameters; it was not trained here."""
    path, blob_id, _ = published
    return dict(
        trained=False,
        checkpoint=path,
        pretrained=os.path.basename(path),
        git_blob_id=blob_id,
        hyper_parameters=dict(model.hparams),
    )
