"""The suite's set-up: one CPU thread a test process, and the runs that the whole suite makes once
and every test reads: `python train.py --synthetic` as a newcomer starts it, the same with --fast,
and a run stopped by Ctrl-C. Kept light to import: pytest-xdist's controlling process loads this
file and nothing else. The helpers the tests share are in helpers.py."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pytest

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


@pytest.hookimpl(trylast=True)  # after pytest's own, which makes the basetemp's factory
def pytest_configure(config):
    """One CPU thread for each test process and every script it starts, unless OMP_NUM_THREADS
    says otherwise: the suite runs one process a core (pytest-xdist's -n auto, pytest.ini), and
    threads that wait for a busy core spin (BENCHMARKS.md, "A shared machine"). And every temporary
    file of the session, the tests' own and those of the scripts they start (Lightning's,
    torch.compile's caches, which torch makes as it is imported), goes under pytest's basetemp:
    none is left elsewhere."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if "torch" in sys.modules:  # otherwise torch reads OMP_NUM_THREADS as it loads
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    base = config._tmp_path_factory.getbasetemp()  # this process's basetemp
    temporary = base / "tmp"
    temporary.mkdir(exist_ok=True)
    os.environ["TMPDIR"] = tempfile.tempdir = str(temporary)
    # The compile caches in the session's basetemp, which xdist's processes share: a graph
    # compiled by one is reused by the other.
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(shared / "torchinductor")


def run_once(tmp_path_factory, name, run):
    """(folder, process) of run(folder): a run that leaves its files in folder and returns its
    process with the output, made once for the whole test session. With pytest-xdist the first
    test process that asks makes it while the others wait, and all read the same one. Its users
    only read the folder; a test that writes copies it first."""
    base = tmp_path_factory.getbasetemp()
    # xdist's processes have their folders side by side in the session's; without flock, one each
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") and fcntl else base
    made = shared / name
    with open(shared / f"{name}.lock", "a") as lock:
        if fcntl:
            fcntl.flock(lock, fcntl.LOCK_EX)
        if not (made / "exit_code").exists():
            shutil.rmtree(made, ignore_errors=True)
            (made / "models").mkdir(parents=True)
            proc = run(str(made / "models"))
            (made / "stdout").write_text(proc.stdout)
            (made / "stderr").write_text(proc.stderr or "")
            (made / "exit_code").write_text(str(proc.returncode))  # written last: the run is whole
    code, out, err = ((made / f).read_text() for f in ("exit_code", "stdout", "stderr"))
    return str(made / "models"), subprocess.CompletedProcess(name, int(code), out, err)


def run_synthetic(folder):
    """`python train.py --synthetic` into folder, exactly as a newcomer starts it, its output
    (stderr too) going to a file: the finished process, the output as its stdout."""
    from helpers import HANG_GUARD_S, ROOT

    command = [sys.executable, "train.py", "--synthetic", "--checkpoint-dir", folder]
    with open(os.path.join(folder, "..", "log"), "w+") as log:
        proc = subprocess.run(
            command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, timeout=HANG_GUARD_S
        )
        log.seek(0)
        return subprocess.CompletedProcess(command, proc.returncode, log.read(), "")


@pytest.fixture(scope="session", autouse=True)
def start_synthetic_run(request, tmp_path_factory):
    """Starts the shared --synthetic run as the session starts, if a test reads it, in a thread of
    its own: the tests that do not read it run meanwhile, and the first that does waits for it."""
    wanted = any("synthetic_run" in item.fixturenames for item in request.session.items)
    if not wanted or fcntl is None:  # no lock to wait on: synthetic_run makes it when first asked
        yield
        return
    tmp_path_factory.getbasetemp()  # made here, not by two threads at once
    thread = threading.Thread(
        target=run_once, args=(tmp_path_factory, "synthetic_run", run_synthetic), daemon=True
    )
    thread.start()
    yield
    thread.join()  # no run left behind by the session


@pytest.fixture(scope="session")
def synthetic_run(tmp_path_factory):
    """The shared `python train.py --synthetic` run (run_synthetic): (checkpoint folder, the
    finished process with the output as stdout)."""
    folder, proc = run_once(tmp_path_factory, "synthetic_run", run_synthetic)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return folder, proc


@pytest.fixture(scope="session")
def fast_synthetic_run(synthetic_run, tmp_path_factory):
    """`train.py --synthetic --fast` of the small model, run in process, begun with the shared
    run's feature caches alone: (checkpoint folder, process). Its --fast feature caches serve the
    other --fast runs (copy_caches), whose tests are not about extracting them."""

    def run(folder):
        from helpers import SMALL_RUN, copy_caches, train_in_process

        copy_caches(synthetic_run, folder)
        return train_in_process("--synthetic", "--checkpoint-dir", folder, "--fast", *SMALL_RUN)

    from helpers import assert_ran

    folder, proc = run_once(tmp_path_factory, "fast_synthetic_run", run)
    assert_ran(proc)
    return folder, proc


@pytest.fixture(scope="session")
def interrupted_run(synthetic_run, tmp_path_factory):
    """A `train.py --synthetic` run of three epochs (RESUMED) stopped by SIGINT, as Ctrl-C stops
    it, once its first epoch is saved: (its folder, the process with its output)."""

    def run(folder):
        from helpers import HANG_GUARD_S, RESUMED, copy_caches, last_of, start_python, wait_for

        copy_caches(synthetic_run, folder)
        command = ["train.py", "--num-workers", "0", "--checkpoint-dir", folder, *RESUMED]
        proc = start_python(*command)
        try:
            wait_for(lambda: os.path.exists(last_of(folder)), proc)
            time.sleep(0.5)  # let the checkpoint be written out; the next epoch takes seconds
            proc.send_signal(signal.SIGINT)
            stdout, stderr = proc.communicate(timeout=HANG_GUARD_S)
        finally:
            if proc.poll() is None:  # a hung run is not left behind
                proc.kill()
        return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)

    return run_once(tmp_path_factory, "interrupted_run", run)
