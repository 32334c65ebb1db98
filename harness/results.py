"""What results.json records of a run: the accuracies, what was tested, the run's settings, the
device and its CPU threads, the library versions and the seconds each stage took.
"""

import contextlib
import platform

import numpy as np
import pytorch_lightning as pl
import torch
import torchvision


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
