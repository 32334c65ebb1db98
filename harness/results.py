"""What a run reports: its accuracies, printed, and results.json, which records them with what was
tested, the run's settings, the device and its CPU threads, the library versions and the seconds
each stage took.
"""

import contextlib
import platform

import numpy as np
import pytorch_lightning as pl
import torch
import torchvision

from harness.files import save_json
from harness.folders import record_file


def device_name(device):
    """The GPU's name, or the CPU's as the platform reports it: what results are measured on."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):  # Linux names the model; platform.processor() often not
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def results_record(result, args, device, seconds, **record):
    """What results.json holds: the accuracies (result), what was tested (record: trained,
    checkpoint, ...), the run's settings, the device, its CPU threads and library versions, and the
    seconds."""
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pytorch_lightning": pl.__version__,
        "numpy": np.__version__,
    }
    return dict(
        result,
        **record,
        settings=vars(args),
        device=device_name(device),
        cpu_threads=torch.get_num_threads(),  # their number changes the arithmetic (threads.py)
        versions=versions,
        seconds=seconds,
    )


def report(result, args, device, seconds, root_dir, **tested):
    """Prints the accuracies of result and writes the run's record (results_record) into the task
    folder root_dir: results.json, or evaluation.json beside the record of the training that made
    an evaluated model (folders.record_file); a fast dev run, a one-batch check, writes nothing.
    Returns the record."""
    for split in ("train", "val", "test"):
        if f"{split}_acc" in result:
            print(f"{split.capitalize() + ' accuracy:':16s}{100.0 * result[f'{split}_acc']:4.2f}%")
    record = results_record(result, args, device, seconds, **tested)
    if args.fast_dev_run:  # it must not replace a real run's results
        print("Fast dev run: results not saved.")
        return record
    path = record_file(root_dir, evaluated=not (record["trained"] or args.pretrained))
    save_json(path, record)
    print(f"Results written to {path}")
    return record
