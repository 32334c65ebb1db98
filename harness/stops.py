"""How a command stops early: Ctrl-C or SIGTERM at any moment, from its first milliseconds to its
last, or a file it cannot write, each as one line and a non-zero exit code, never a traceback.
Only the standard library here, and nothing imported before the signals are caught, so that a
script sets this up before the large libraries load (which takes seconds).
"""

import contextlib
import os
import signal
import sys

SAID = []  # whether this process has said why it stopped: one line, never two


def say_interrupted(note):
    """The one line of a stop, "Interrupted; " and note, on stderr: once a process."""
    if not SAID:
        SAID.append(note)
        print(f"\nInterrupted; {note}", file=sys.stderr, flush=True)


def stop_while_starting(signum, frame):
    print("\nInterrupted while starting; nothing was written.", file=sys.stderr, flush=True)
    os._exit(128 + signum)


def while_starting():
    """Until run_main: Ctrl-C or SIGTERM ends the process with one line and 128 + the signal. And
    for good: a torchvision built for another torch is one line, not a traceback from its import."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop_while_starting)
    sys.excepthook = one_line_errors


def ignore_stops(*_):
    """A DataLoader worker's worker_init_fn: Ctrl-C and SIGTERM reach every process of a terminal's
    or a scheduler's group, and a worker they killed would be reported as a crash; the main
    process alone stops, and ends its workers itself."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


def one_line_errors(kind, error, traceback):
    """sys.excepthook: a Ctrl-C that came before its handler was in place (the first milliseconds)
    as while_starting's line; the error that a torchvision of another build than torch's raises
    when it loads (e.g. `operator torchvision::nms does not exist`, from a CPU torch beside a CUDA
    torchvision) as one line with both versions and the fix; any other error as Python shows it."""
    if issubclass(kind, KeyboardInterrupt):
        stop_while_starting(signal.SIGINT, None)
    if not (issubclass(kind, RuntimeError) and "torchvision::" in str(error)):
        return sys.__excepthook__(kind, error, traceback)
    from importlib.metadata import version

    print(
        f"error: torchvision {version('torchvision')} does not fit torch {version('torch')} "
        f"({str(error).strip().splitlines()[0]}). Install the two together: pip install "
        "--force-reinstall torch torchvision (add --index-url "
        "https://download.pytorch.org/whl/cpu for the CPU build).",
        file=sys.stderr,
    )


def run_main(main, note):
    """Runs a script's main() as a user's command. Ctrl-C and SIGTERM stop it alike, as a
    KeyboardInterrupt: one line (RunLog's during training, otherwise "Interrupted; " and note) and
    the exit code 128 + the signal's number, 130 or 143. A file that cannot be written is one line,
    exit code 1. Then the process ends at once (end)."""
    try:
        run_and_report(main, note)
    except SystemExit as stop:
        code = stop.code
    else:
        code = 0
    if isinstance(code, str):
        print(code, file=sys.stderr)
    end(1 if isinstance(code, str) else code or 0)


def end(code):
    """Ends the process with code once its atexit functions ran (the run's locks go) and its
    output is flushed, without the interpreter's own finalization: there Python gives the signals
    back to the system, and a SIGTERM in its seconds of module teardown killed the command without
    a word."""
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe, a closed stream
            stream.flush()
    os._exit(code)


def run_and_report(main, note):
    """run_main's work: main(), each way it stops said in one line."""
    import threading

    from harness.files import WRITE_ERRNOS, WriteError, free_mb  # loaded by the script already

    stopped = []

    def stop(signum, frame):
        stopped.append(signum)
        raise KeyboardInterrupt

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)
    threading.excepthook = thread_errors
    try:
        main()
    except KeyboardInterrupt as interrupt:  # a stop raised with a note of its own says that one
        say_interrupted(interrupt.args[0] if interrupt.args else note)
    except SystemExit:
        if not stopped:  # an error's own line
            raise
        say_interrupted(note)  # Lightning's exit after a stop: RunLog's line, or this one
    except WriteError as error:
        sys.exit(f"error: {error}")
    except RuntimeError as error:
        # A process that Lightning's DDP started (LOCAL_RANK 1, 2, ...) whose first process was
        # killed: gloo reports the lost connection as an error of its own. The first one speaks.
        rank = os.environ.get("LOCAL_RANK", "0")
        if rank == "0" or not rank.isdigit():
            raise
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else "stopped"
        sys.exit(f"error: process {rank} of the run stops: its first process is gone ({first}).")
    except OSError as error:  # a write of Lightning's (a checkpoint) on a full disk, say
        where = os.fsdecode(error.filename2 or error.filename or "") or None  # bytes, or str
        if (
            isinstance(error, FileNotFoundError)
            and where
            and not os.path.isdir(os.path.dirname(os.path.abspath(where)))
        ):  # its folder was there when the run began: removed meanwhile
            sys.exit(f"error: cannot write {where}: its folder was removed while the command ran.")
        if error.errno not in WRITE_ERRNOS:
            raise
        if error.filename2 and os.path.isfile(error.filename2):
            os.remove(error.filename2)  # the end of a copy cut short: never to be trusted
        free = free_mb(os.path.dirname(os.path.abspath(where)) if where else ".")
        sys.exit(
            f"error: cannot write {where or 'a file'} ({error.strerror}; {free:.0f} MB free there)"
        )
    finally:
        # main is over and its files are whole: a stop from now on (in what Python runs as it
        # exits, say) ends the process at once, in one line.
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, stop_while_ending)
    if stopped:
        sys.exit(128 + stopped[0])
    if THREAD_ERRORS:
        sys.exit(f"error: {THREAD_ERRORS[0]}")


THREAD_ERRORS = []  # the writes that failed in other threads than the main one


def thread_errors(args):
    """threading.excepthook: a write that fails in a library's thread (TensorBoard's log writer,
    when the run's folder is removed or made read-only) is kept for run_main to report in one line,
    unless the main thread's own next write fails and says it; any other error as Python shows
    it."""
    if not issubclass(args.exc_type, OSError):
        return sys.__excepthook__(args.exc_type, args.exc_value, args.exc_traceback)
    error = args.exc_value
    where = os.fsdecode(error.filename) if error.filename else "a file"
    THREAD_ERRORS.append(f"cannot write {where} ({error.strerror or error})")


def stop_while_ending(signum, frame):
    print("\nInterrupted as it ended; every file is whole.", file=sys.stderr, flush=True)
    os._exit(128 + signum)
