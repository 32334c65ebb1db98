"""files.py: a file is written whole or not at all, a failed write is one error naming the file and
its cause, what a killed writer left goes; JSON saved atomically, an output folder shown writable,
and the download timeouts."""

import errno
import io
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from harness import files
from harness.files import save_atomically


@pytest.mark.parametrize(
    "failure, cause",
    [
        # What torch.save raises when the disk fills up.
        (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"),
         "RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"),
        (OSError(errno.ENOSPC, "No space left on device"),
         "OSError: [Errno 28] No space left on device"),
    ],
)  # fmt: skip
def test_a_failed_write_names_the_file_and_its_cause_and_leaves_nothing(tmp_path, failure, cause):
    path = tmp_path / "SetAnomalyDetect.ckpt"

    def write_then_fail(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise failure

    with pytest.raises(files.WriteError) as error:
        save_atomically(str(path), write_then_fail)
    assert str(error.value).startswith(f"cannot write {path} ({cause}; ")
    assert str(error.value).endswith(" MB free there)") and os.listdir(tmp_path) == []
    # Other errors, a download's say, are not about writing: they pass on as they are.
    refused = OSError(errno.ECONNREFUSED, "Connection refused")
    with pytest.raises(OSError) as error:
        save_atomically(str(path), lambda tmp: (_ for _ in ()).throw(refused))
    assert error.value is refused


def test_interrupted_write_leaves_nothing_behind(tmp_path):
    path = tmp_path / "file.tar"

    def write_then_fail(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_atomically(str(path), write_then_fail)
    assert os.listdir(tmp_path) == []
    save_atomically(str(path), lambda tmp: open(tmp, "wb").close())
    assert os.listdir(tmp_path) == ["file.tar"]


def test_saved_json_reads_back_equal_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "run" / "results.json"  # in a folder not made yet
    record = {"test_acc": 0.9375, "trained": True, "checkpoint": None, "settings": {"seed": 42},
              "sizes": [2, 5, 10], "device": "Intel® Xeon®"}  # fmt: skip
    files.save_json(str(path), record)
    with open(path) as f:
        assert json.load(f) == record
    files.save_json(str(path), {"test_acc": 0.5})  # a second save replaces the first whole
    with open(path) as f:
        assert json.load(f) == {"test_acc": 0.5}
    assert os.listdir(path.parent) == ["results.json"]  # no .tmp<pid> left beside it


def test_make_and_check_folder_makes_a_missing_folder_and_refuses_a_file_in_its_place(tmp_path):
    nested = tmp_path / "a" / "b" / "c"
    files.make_and_check_folder(str(nested))
    assert nested.is_dir()
    files.make_and_check_folder(str(nested))  # one that is there already is fine
    taken = tmp_path / "a" / "file"
    taken.write_text("")
    for folder in (taken, taken / "below"):
        with pytest.raises(OSError):
            files.make_and_check_folder(str(folder))
    assert taken.read_text() == ""


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write to any folder"
)
def test_make_and_check_folder_refuses_a_folder_without_write_permission(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(PermissionError):
            files.make_and_check_folder(str(locked))
    finally:
        locked.chmod(0o755)  # so that pytest can remove it


def test_download_timeout_holds_inside_and_is_put_back_after_even_on_an_error():
    before = socket.getdefaulttimeout()
    try:
        socket.setdefaulttimeout(3.5)  # some other setting, which must come back
        with files.download_timeout():
            assert socket.getdefaulttimeout() == files.DOWNLOAD_TIMEOUT_S
            with socket.socket() as sock:  # as a download's connection would be made
                assert sock.gettimeout() == files.DOWNLOAD_TIMEOUT_S
        assert socket.getdefaulttimeout() == 3.5
        with pytest.raises(ConnectionResetError):
            with files.download_timeout():
                assert socket.getdefaulttimeout() == files.DOWNLOAD_TIMEOUT_S
                raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
        assert socket.getdefaulttimeout() == 3.5
        socket.setdefaulttimeout(None)  # Python's default: no timeout
        with files.download_timeout():
            assert socket.getdefaulttimeout() == files.DOWNLOAD_TIMEOUT_S
        assert socket.getdefaulttimeout() is None
    finally:
        socket.setdefaulttimeout(before)


def test_what_a_killed_writer_left_goes_with_the_next_write(tmp_path):
    path = tmp_path / "results.json"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    left = tmp_path / f"results.json.tmp{gone}"
    left.write_text('{"half')  # a process killed while it wrote
    running = tmp_path / f"results.json.tmp{os.getppid()}"
    running.write_text('{"half')  # a process that still writes
    other = tmp_path / "other.json.tmp1"
    other.write_text("")  # another file's
    files.save_json(path, {"a": 1})
    assert not left.exists() and running.exists() and other.exists()
    assert json.loads(path.read_text()) == {"a": 1}


def test_read_response_gives_up_on_a_server_that_trickles(monkeypatch):
    monkeypatch.setattr(files, "DOWNLOAD_TIMEOUT_S", 0.2)

    class Trickle:  # a byte every 20 ms, never the end: 50 bytes a second
        def read1(self, size):
            time.sleep(0.02)
            return b"x"

    with pytest.raises(TimeoutError, match="too slow"):
        files.read_response(Trickle())

    class Whole(io.BytesIO):
        read1 = io.BytesIO.read1

    body = os.urandom(200_000)
    assert files.read_response(Whole(body)) == body
