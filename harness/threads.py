"""The CPU threads a run computes with: how many, and how long an idle one waits before it sleeps.
Only the standard library at import: wait_briefly must run before torch loads, since PyTorch's
OpenMP (GNU libgomp on Linux) reads its settings once, as it loads.
"""

import os


def usable_cores():
    """The CPU cores this process may run on (its affinity: a container's or taskset's share)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


# How long an idle OpenMP thread spins before it sleeps, in libgomp's count of pause instructions
# (300 took 7 µs on a 2-core AMD EPYC). A training step runs about 600 parallel regions, each
# split between the threads. libgomp's own default, 300 000 spins (7 ms there), keeps a thread
# spinning on a core that its partner, descheduled for another process, needs: beside one busy
# process an epoch took 2.1 times as long as with one thread. Sleeping at once (spin 0, as
# OMP_WAIT_POLICY=PASSIVE) makes every region wake a thread, about 50 µs each. A spin this short
# covers most of the gaps between regions on a quiet machine and gives a busy core back at once.
# BENCHMARKS.md, "A shared machine: CPU threads", has the measurements.
SPIN_COUNT = 300


def wait_briefly():
    """Sets the spin of PyTorch's idle threads to SPIN_COUNT, unless GOMP_SPINCOUNT or
    OMP_WAIT_POLICY says otherwise. Called by each command before torch loads. It changes no
    result: how long a thread waits is not what it computes."""
    if not {"GOMP_SPINCOUNT", "OMP_WAIT_POLICY"} & os.environ.keys():
        os.environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)


def cpu_threads(task, devices=1):
    """The CPU threads a run computes with: one for the sequence tasks, whose tiny steps gain next
    to nothing from a second; the set task keeps the usable cores, shared between the run's
    processes. Chosen by the work, not by the load of the moment: the thread count changes the
    arithmetic (LayerNorm's gradients are summed by thread), and the same command must train the
    same model on every run."""
    return 1 if task != "anomaly" else max(1, usable_cores() // devices)


def use_cpu_threads(task, devices=1):
    """Sets torch's CPU threads to cpu_threads(task, devices), unless OMP_NUM_THREADS chooses."""
    import torch  # loaded by the script already

    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(cpu_threads(task, devices))
