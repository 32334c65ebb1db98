"""stops.py: a command stopped early (Ctrl-C or SIGTERM at any moment, a full disk, a torchvision
of another build) says so in one line and exits with a code, never a traceback."""

import contextlib
import errno
import os
import signal
import time
from importlib.metadata import version

import pytest

from helpers import HANG_GUARD_S, run_code, run_script, start_python


@pytest.mark.parametrize("script", ["train.py", "predict.py", "visualize.py"])
def test_ctrl_c_while_the_libraries_load_is_one_line(script, tmp_path):
    run = start_python(script, "--checkpoint-dir", tmp_path)
    time.sleep(0.5)  # torch alone takes seconds to load
    run.send_signal(signal.SIGINT)
    _, stderr = run.communicate(timeout=HANG_GUARD_S)
    assert run.returncode == 128 + signal.SIGINT
    assert stderr == "\nInterrupted while starting; nothing was written.\n"


def test_a_write_on_a_full_disk_is_one_line_and_leaves_no_half_file(tmp_path, monkeypatch):
    """What a checkpoint that Lightning copies into place raises when the disk fills up."""
    from harness import stops

    monkeypatch.setattr(signal, "signal", lambda *_: None)  # the test process keeps its handlers
    half = tmp_path / "epoch=0-step=15.ckpt"
    half.write_bytes(b"the first 454656 bytes")

    def copy_fails():
        raise OSError(errno.ENOSPC, "No space left on device", "/tmp/tmpz8y_l3tk", None, str(half))

    with pytest.raises(SystemExit) as exit_info:
        stops.run_and_report(copy_fails, "")
    message = str(exit_info.value.code)
    assert message.startswith(f"error: cannot write {half} (No space left on device; ")
    assert message.endswith(" MB free there)") and not half.exists()


def test_a_torchvision_of_another_build_is_one_line_naming_both(tmp_path):
    """As a CPU torch beside a CUDA torchvision fails: on loading, an operator is missing."""
    fake = tmp_path / "torchvision"
    fake.mkdir()
    (fake / "__init__.py").write_text(
        'raise RuntimeError("operator torchvision::nms does not exist")\n'
    )
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    proc = run_script("train.py", "--task", "reverse", "--checkpoint-dir", tmp_path, env=env)
    torch, torchvision = version("torch"), version("torchvision")
    assert proc.returncode == 1 and proc.stderr == (
        f"error: torchvision {torchvision} does not fit torch {torch} (operator torchvision::nms "
        "does not exist). Install the two together: pip install --force-reinstall torch "
        "torchvision (add --index-url https://download.pytorch.org/whl/cpu for the CPU build).\n"
    )


def test_a_ctrl_c_before_its_handler_is_in_place_is_one_line():
    # What a Ctrl-C in a script's first milliseconds raises, where Python's own handler still
    # turns it into a KeyboardInterrupt: one line, as later.
    code = "from harness import stops; stops.while_starting(); raise KeyboardInterrupt"
    run = start_python("-c", code, start_new_session=True)
    _, stderr = run.communicate(timeout=HANG_GUARD_S)
    assert run.returncode == 128 + signal.SIGINT
    assert stderr == "\nInterrupted while starting; nothing was written.\n"


def test_a_stop_as_the_command_ends_is_one_line():
    # The files are written and main has returned; what runs at exit is stopped.
    code = (
        "import atexit, time; from harness import stops; stops.while_starting(); "
        "atexit.register(time.sleep, 600); stops.run_main(lambda: print('done', flush=True), '')"
    )
    run = start_python("-c", code, start_new_session=True)
    assert run.stdout.readline() == "done\n"
    time.sleep(0.2)  # into the atexit callback
    run.send_signal(signal.SIGINT)
    _, stderr = run.communicate(timeout=HANG_GUARD_S)
    assert run.returncode == 128 + signal.SIGINT
    assert stderr == "\nInterrupted as it ended; every file is whole.\n"


def test_sigterm_to_the_whole_group_while_extracting_is_one_line(tmp_path):
    # As `timeout`, a job scheduler or a closing terminal sends it: the DataLoader's workers get it
    # too. The main process alone stops, and ends its workers.
    workers = str(min(2, len(os.sched_getaffinity(0))))
    command = ["train.py", "--synthetic", "--num-workers", workers, "--checkpoint-dir", tmp_path]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    run = start_python(*command, start_new_session=True, env=env)
    assert run.stdout.readline().startswith("Extracting the train features")
    time.sleep(1.0)  # the workers are at work
    os.killpg(run.pid, signal.SIGTERM)
    _, stderr = run.communicate(timeout=HANG_GUARD_S)
    assert run.returncode == 128 + signal.SIGTERM
    assert stderr == "\nInterrupted; every file is whole: run the same command again to go on.\n"
    assert not os.path.exists(tmp_path / "synthetic")  # no cache, whole or half; no empty folder


# A command's main run by run_main, as each script runs it: what `how` makes of it.
RUN_MAIN = """
import os, signal, sys, threading
from harness import stops
how = sys.argv[1]

def main():
    if how == "stop-in-lightning":  # Lightning catches a stop and exits with 1, saying nothing
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        except KeyboardInterrupt:
            sys.exit(1)
    if how == "thread-write":  # TensorBoard's writer thread, its folder gone
        error = FileNotFoundError(2, "No such file or directory", b"/gone/events.out")
        thread = threading.Thread(target=lambda: (_ for _ in ()).throw(error))
        thread.start()
        thread.join()
    if how == "folder-removed":
        open("/gone/run/last.ckpt", "wb")
    if how == "ddp-peer-gone":  # a DDP process whose first process was killed
        os.environ["LOCAL_RANK"] = "1"
        raise RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer\\nmore")

stops.run_main(main, "no results were written.")
"""


@pytest.mark.parametrize(
    "how, code, line",
    [("stop-in-lightning", 143, "\nInterrupted; no results were written.\n"),
     ("thread-write", 1, "error: cannot write /gone/events.out (No such file or directory)\n"),
     ("folder-removed", 1,
      "error: cannot write /gone/run/last.ckpt: its folder was removed while the command ran.\n"),
     ("ddp-peer-gone", 1,
      "error: process 1 of the run stops: its first process is gone ([gloo/transport/tcp/pair.cc:"
      "534] Connection closed by peer).\n")],
)  # fmt: skip
def test_what_a_library_makes_of_a_stop_or_a_failed_write_is_one_line(how, code, line):
    proc = run_code(RUN_MAIN, how)
    assert (proc.returncode, proc.stderr) == (code, line)


def test_a_command_ends_without_the_interpreters_teardown_where_a_stop_is_unheard():
    # An object whose teardown takes seconds, as a large library's can at interpreter exit, where
    # Python has given the signals back to the system and SIGTERM killed the command unheard.
    code = (
        "import time; from harness import stops\n"
        "class Slow:\n    def __del__(self): time.sleep(5)\n"
        "slow = Slow()\n"
        "stops.run_main(lambda: print('done', flush=True), '')"
    )
    run = start_python("-c", code, start_new_session=True)
    assert run.stdout.readline() == "done\n"
    time.sleep(0.5)  # where the teardown would be
    with contextlib.suppress(ProcessLookupError):  # gone already: ended at once
        run.send_signal(signal.SIGTERM)
    _, stderr = run.communicate(timeout=HANG_GUARD_S)
    assert run.returncode == 0 and stderr == ""
