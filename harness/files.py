"""Writing files safely: a file appears whole or not at all, a full disk or a missing permission is
one clear error, a download does not hang, a folder is shown writable before work starts. Only the
standard library here, so that stops.py can use it before the large libraries load.
"""

import contextlib
import errno
import json
import os
import shutil
import socket
import time

DOWNLOAD_TIMEOUT_S = 20  # seconds without an answer before a download counts as failed
# Bytes a second below which a download counts as failed, averaged over DOWNLOAD_TIMEOUT_S: a
# server that trickles a byte now and then would otherwise never time out.
DOWNLOAD_MIN_RATE = 10_000
# What the system answers when a file cannot be written: no space, no quota, no permission.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS}


@contextlib.contextmanager
def download_timeout():
    """Without a timeout a network that silently drops packets would hang a download for minutes."""
    default = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        yield
    finally:
        socket.setdefaulttimeout(default)


def read_response(response):
    """The whole body of an HTTP response, read as it arrives; raises TimeoutError if, over any
    DOWNLOAD_TIMEOUT_S seconds, it comes slower than DOWNLOAD_MIN_RATE bytes a second."""
    chunks, since, arrived = [], time.monotonic(), 0
    while chunk := response.read1(2**16):  # what has arrived, not a full 64 KiB
        chunks.append(chunk)
        arrived += len(chunk)
        seconds = time.monotonic() - since
        if seconds >= DOWNLOAD_TIMEOUT_S:
            if arrived < DOWNLOAD_MIN_RATE * seconds:
                raise TimeoutError(f"{arrived} bytes in {seconds:.0f} s: too slow")
            since, arrived = time.monotonic(), 0
    return b"".join(chunks)


def free_mb(folder):
    """Megabytes free on folder's disk; 0 if there is no such folder."""
    return shutil.disk_usage(folder).free / 2**20 if os.path.isdir(folder) else 0


def make_and_check_folder(folder):
    """Makes folder if missing; raises OSError if this process cannot write there. A command's
    outputs go to one folder: find out before any work, not after hours of it, that it cannot."""
    os.makedirs(folder, exist_ok=True)
    if not os.access(folder, os.W_OK):
        raise PermissionError("not writable")


def make_folders(folder):
    """Makes folder and those above it that are missing; returns the ones it made, innermost first,
    for remove_empty to take back if nothing comes of the work they were made for."""
    made, missing = [], os.path.abspath(folder)
    while not os.path.isdir(missing):
        made.append(missing)
        missing = os.path.dirname(missing)
    os.makedirs(folder, exist_ok=True)
    return made


def remove_empty(folders):
    """Removes each of folders (innermost first) that is empty; leaves the others."""
    for folder in folders:
        with contextlib.suppress(OSError):  # not empty, or gone already
            os.rmdir(folder)


def name_too_long(path):
    """Why path cannot be written under its own name and save_atomically's temporary one
    (path.tmp<process id>), or None: a name longer than its folder's file system takes, found out
    before the work whose result it would hold."""
    folder, name = os.path.split(os.path.abspath(path))
    longest = os.pathconf(folder, "PC_NAME_MAX") if os.path.isdir(folder) else 255
    temporary = f"{name}.tmp{os.getpid()}"
    if len(temporary.encode()) > longest:
        room = longest - len(temporary.encode()) + len(name.encode())
        return f"its name is too long: at most {room} bytes here, {len(name.encode())} given"
    return None


class WriteError(OSError):
    """A file could not be written (disk full, no permission); the message names the file, the
    cause and the space left. Nothing half-written is left behind."""


def save_atomically(path, write):
    """Calls write(tmp_path), then renames tmp_path to path: an interruption leaves no half file,
    and what a killed writer left (path.tmp<its process id>) goes now. Raises WriteError if it
    cannot be written."""
    folder = os.path.dirname(os.path.abspath(path))
    made = make_folders(folder)
    remove_left_temporaries(path)
    tmp_path = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp_path)
        os.replace(tmp_path, path)
    except (OSError, RuntimeError) as error:
        # torch.save reports a full disk as a RuntimeError; other OSErrors (a download's) pass on.
        if isinstance(error, OSError) and error.errno not in WRITE_ERRNOS:
            raise
        cause = (str(error).strip().splitlines() or [""])[0][:200]
        raise WriteError(
            f"cannot write {path} ({type(error).__name__}: {cause}; {free_mb(folder):.0f} MB "
            "free there)"
        ) from None
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        if not os.path.exists(path):  # nothing written: no empty folder made for it stays
            remove_empty(made)


def remove_left_temporaries(path):
    """Removes the temporary files of path (path.tmp<process id>) that a process which is gone
    left, killed while it wrote: a later write of the same file is the first to find them."""
    folder, name = os.path.split(os.path.abspath(path))
    for entry in os.listdir(folder):
        pid = entry.removeprefix(name + ".tmp")
        if entry.startswith(name + ".tmp") and pid.isdigit() and not is_running(int(pid)):
            os.remove(os.path.join(folder, entry))


def is_running(pid):
    """Whether a process with this id runs (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def save_json(path, obj):
    """obj as indented JSON at path, written atomically (save_atomically)."""

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)

    save_atomically(path, write)
