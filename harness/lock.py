"""The folder lock: one process at a time writes in a task's folder (its model, checkpoints and
results) or in visualize.py's figures. The lock is <folder>/.lock, held with flock, which the
system lets go when the process ends in any way; a second run is told which process holds it.
"""

import atexit
import contextlib
import os
import stat
import sys

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

from harness.files import free_mb, make_folders, remove_empty

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
