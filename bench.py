"""Times the post's (faithful) path against the fast path (train.py --fast) on generated data of the
real shapes, and writes bench.json.

    python bench.py                      # on the CPU
    python bench.py --device cuda        # on a GPU

Measured per path, in this one process with the paths taking turns (the best of --rounds counts): a
training step through train.py's own Trainer and loaders (median after warm-up), the projected epoch
and 100-epoch times, feature extraction in images per second (resize and normalisation included),
evaluation in sets per second; and, each in a process of its own, the peak resident memory of a
path. The FLOP rate of the training step (6 · parameters · tokens per step), set against the
measured peak rate of a large matrix product, says how close each path runs to the floor that the
step's matrix products alone set.

    python bench.py --ablation           # the training step only, each part of the fast path alone
    python bench.py --threads            # each CPU-thread setting, quiet and beside busy processes

--threads times `python train.py --synthetic --retrain` (seconds per epoch, the median of epochs 2
to 6, from the moments its epoch lines arrive) with each way of running the CPU threads, the
settings taking turns, on a quiet machine and beside one and two busy processes that it starts.
"""

from harness import stops

if __name__ == "__main__":
    stops.while_starting()  # Ctrl-C or SIGTERM from the start on: one line, no traceback
    from harness import commands, threads

    threads.wait_briefly()  # before torch loads: how its idle threads wait
    commands.bench_parser(__doc__).parse_args()  # -h, a mistyped flag: answered before torch


import contextlib
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import train
from data import anomaly_datasets
from features import CIFAR100_SIZES, FEATURE_DIM, IMAGE_SIZE, image_transform, resnet34_backbone
from harness import cli, commands, fast, files, folders, results, threads
from harness.runlog import quiet_lightning
from harness.sources import ImageArray
from model import AnomalyPredictor
from train import IO_DIMS

# The post's run (train.py's defaults) on CIFAR-100's shapes: 100 classes, 60 000 images in all.
POST = train.parse_args([])
NUM_CLASSES, ALL_IMAGES = 100, sum(CIFAR100_SIZES.values())
# The post's model has 2.3 M parameters; a step of 64 sets of 10 feeds 640 tokens through them.
POST_MODEL = AnomalyPredictor(**train.model_hparams(POST, IO_DIMS["anomaly"], epoch_steps=1))
PARAMS = sum(p.numel() for p in POST_MODEL.parameters())
STEP_FLOP = 6 * PARAMS * POST.batch_size * POST.set_size  # a step's forward and backward products
PARTS = fast.MODEL_PARTS + ("sampler",)  # the fast path's parts in the training step


class StepTimer(pl.Callback):
    """Wall-clock time between the ends of consecutive training batches: data, step and loop."""

    def __init__(self):
        self.ends = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        synchronize(trainer.strategy.root_device)
        self.ends.append(time.perf_counter())


@functools.cache
def is_view(op_name):
    """Whether the aten operator op_name ("aten::view") only makes a view: its output aliases an
    input and nothing is written."""
    packet = getattr(torch.ops.aten, op_name.removeprefix("aten::"), None)
    for overload in packet.overloads() if packet is not None else ():
        returns = getattr(packet, overload)._schema.returns
        if returns and returns[0].alias_info is not None and not returns[0].alias_info.is_write:
            return True
    return False


def dispatched_ops(events):
    """How many operators the profiled code dispatched: aten operators called by no other aten
    operator (on a GPU, roughly one kernel launch each), views excluded."""

    def called_by_aten(event):
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        return parent is not None

    return sum(
        1
        for event in events
        if event.name.startswith("aten::") and not called_by_aten(event) and not is_view(event.name)
    )


class StepOps(pl.Callback):
    """The operators that one training step (the batch at index `at`) dispatches."""

    def __init__(self, at):
        self.at, self.count, self.profiler, self.silence = at, None, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.at:
            self.silence = native_output_silenced()
            self.silence.__enter__()
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.profiler.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.at:
            self.profiler.__exit__(None, None, None)
            self.silence.__exit__(None, None, None)
            self.count = dispatched_ops(self.profiler.events())


@contextlib.contextmanager
def native_output_silenced():
    """Sends what C++ code writes to stdout and stderr to /dev/null meanwhile: the profiler's
    library (Kineto) logs its start and stop, and on a CPU machine with the CUDA build of torch an
    `ERROR: gpuGetDeviceCount failed`, none of which says anything about the measurement."""
    sys.stdout.flush()
    sys.stderr.flush()
    kept = [os.dup(1), os.dup(2)]
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 1)
        os.dup2(devnull.fileno(), 2)
    try:
        yield
    finally:
        for fd, copy in zip((1, 2), kept, strict=True):
            os.dup2(copy, fd)
            os.close(copy)


def generated_datasets():
    """Set datasets over random features with the post's shapes, split and set size."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(NUM_CLASSES).repeat(CIFAR100_SIZES["train"] // NUM_CLASSES)
    test_labels = torch.arange(NUM_CLASSES).repeat(CIFAR100_SIZES["test"] // NUM_CLASSES)
    train_feats = torch.randn(len(labels), FEATURE_DIM, generator=g)
    test_feats = torch.randn(len(test_labels), FEATURE_DIM, generator=g)
    return anomaly_datasets(train_feats, labels, test_feats, test_labels, POST.set_size)


def time_training(fast_path, device, datasets, steps, warmup, parts=None):
    """(median seconds per training step, steps per epoch, evaluation sets per second, operators the
    step dispatches), through train.py's own loaders and Trainer; the operators are counted in the
    last warm-up step. parts, for --ablation, picks single parts of the fast path:
    "dropout", "attention", "adam" (fused), "sampler" (SetBatches); "no dropout" sets every dropout
    probability to 0, a reference for what the remaining dropout costs, not a run anyone should
    train."""
    parts = set(PARTS if fast_path else ()) if parts is None else set(parts)
    flags = ["--accelerator", device.type] + (["--fast"] if "sampler" in parts else [])
    args = train.parse_args(flags)
    if "no dropout" in parts:
        args.dropout = args.input_dropout = 0.0
    pl.seed_everything(0)
    loaders = train.make_loaders(args, datasets, device)
    hparams = train.model_hparams(args, IO_DIMS["anomaly"], len(loaders["train"]))
    timer, ops = StepTimer(), StepOps(at=warmup - 1)
    with tempfile.TemporaryDirectory() as root_dir:
        trainer = train.make_trainer(
            args,
            root_dir,
            callbacks=[timer, ops],
            devices=[device.index] if device.index is not None else 1,  # cuda:N
            max_steps=warmup + steps,
            limit_val_batches=0,
        )
        model = AnomalyPredictor(**hparams)
        fast.use_fast_path(model, parts & set(fast.MODEL_PARTS), trainer)
        trainer.fit(model, loaders["train"])
    eval_sets_per_s = time_evaluation(model, loaders["val"], device)
    step_s = float(statistics.median(np.diff(timer.ends[warmup:])))
    return step_s, len(loaders["train"]), eval_sets_per_s, ops.count


def ablation(device, steps, warmup):
    """The training step with no part of the fast path, each part alone, and all of them."""
    datasets = generated_datasets()
    rows = (
        [("faithful", ())]
        + [(f"only {part}", (part,)) for part in PARTS]
        + [("all (--fast)", PARTS), ("all, no dropout", PARTS + ("no dropout",))]
    )
    print(f"{'training step':24s}{'ms':>8s}{'of faithful':>14s}")
    times = {}
    for name, parts in rows:
        times[name] = 1000 * time_training(False, device, datasets, steps, warmup, parts)[0]
        print(f"{name:24s}{times[name]:8.1f}{times[name] / times['faithful']:14.2f}")
    floor = 1000 * STEP_FLOP / matmul_rate(device)
    share = floor / times["faithful"]
    print(f"{'matrix products alone':24s}{floor:8.1f}{share:14.2f}  (at the measured peak rate)")
    return times


def synchronize(device):
    """Waits for the GPU's queued work, so that a clock read after it means something."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device):
    """FLOP/s of a large float32 matrix product on device: the most any training step can get out of
    it."""
    a = torch.randn(2048, 2048, device=device)
    a @ a
    rates = []
    for _ in range(3):
        synchronize(device)
        start = time.perf_counter()
        a @ a
        synchronize(device)
        rates.append(2 * 2048**3 / (time.perf_counter() - start))
    return max(rates)


def time_extraction(fast_path, device, backbone, images, min_seconds):
    """(images per second, features of images) of one path. Set-up comes first, untimed: the fast
    path's backbone is prepared, the post's DataLoader (PIL transforms, batch 128, train.py's
    workers: the post's 4, at most one a core) starts its workers, and one batch of the timed size
    warms each up. Then passes over images are timed until they add up to at least min_seconds of
    work."""
    if fast_path:
        model, batch = fast.fast_backbone(backbone, device), fast.fast_batch_size(device)
        fast.extract_features_fast(model, images[:batch], device)
        extract = lambda: fast.extract_features_fast(model, images, device)
    else:
        dataset = ImageArray(images, [0] * len(images), image_transform(IMAGE_SIZE))
        loader = DataLoader(
            dataset,
            128,
            num_workers=cli.DEFAULT_WORKERS,
            persistent_workers=cli.DEFAULT_WORKERS > 0,
            worker_init_fn=stops.ignore_stops,
        )
        with torch.no_grad():  # the workers start, and then stay for every pass
            backbone.to(device)(next(iter(loader))[0].to(device))

        @torch.no_grad()
        def extract():  # features.extract_features's loop, over the loader whose workers stay
            return torch.cat([backbone(x.to(device)).cpu() for x, _ in loader])

    passes, start = 0, time.perf_counter()
    while passes == 0 or time.perf_counter() - start < min_seconds:
        feats = extract()
        synchronize(device)
        passes += 1
    return passes * len(images) / (time.perf_counter() - start), feats


@torch.inference_mode()
def time_evaluation(model, loader, device):
    """Sets per second that model scores from loader, data included, after one warm-up batch."""
    model = model.eval().to(device)
    model.anomaly_logits(next(iter(loader))[0].to(device))
    synchronize(device)
    sets, start = 0, time.perf_counter()
    for img_sets, *_ in loader:
        predicted = model.anomaly_logits(img_sets.to(device)).argmax(dim=-1)
        sets += len(predicted)
    synchronize(device)
    return sets / (time.perf_counter() - start)


def peak_memory(path, device, images):
    """Peak memory in MB of a fresh process that trains, evaluates and extracts along one path:
    {"rss": resident host memory, "gpu": allocated CUDA memory, or None}."""
    workload = f"bench.memory_workload({path == 'fast'}, {str(device)!r}, {images})"
    code = f"import bench, json; print(json.dumps({workload}))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=os.path.dirname(os.path.abspath(__file__)),
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def peak_rss_mb():
    """This process's peak resident memory. VmHWM, not getrusage: a child's ru_maxrss starts from
    its parent's at fork and survives exec, so it would report this benchmark's own size."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def memory_workload(fast_path, device, num_images):
    device = torch.device(device)
    datasets = generated_datasets()
    time_training(fast_path, device, datasets, steps=10, warmup=1)
    torch.manual_seed(0)
    images = np.random.default_rng(0).integers(0, 256, (num_images, 32, 32, 3), dtype=np.uint8)
    time_extraction(fast_path, device, resnet34_backbone(), images, min_seconds=0)
    gpu = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"rss": peak_rss_mb(), "gpu": gpu}


def path_results(rounds, steps_per_epoch, device, num_images, path):
    """One path's figures from its rounds (the best of each), and its peak memory, measured in a
    process of its own, since a process's peak only grows."""
    memory = peak_memory(path, device, num_images)
    step_s = min(r["step_s"] for r in rounds)
    extract_rate, eval_rate = max(r["extract"] for r in rounds), max(r["eval"] for r in rounds)
    epoch_s = step_s * steps_per_epoch
    return {
        "train_step_ms": 1000 * step_s,
        "epoch_s": epoch_s,
        "train_100_epochs_s": epoch_s * 100,
        "train_gflops": STEP_FLOP / step_s / 1e9,
        "extract_images_per_s": extract_rate,
        "eval_sets_per_s": eval_rate,
        "ops_per_step": rounds[0]["ops"],
        # Features of all 60 000 images, 100 epochs, then the three accuracies (60 000 sets).
        "projected_run_s": ALL_IMAGES / extract_rate + epoch_s * 100 + ALL_IMAGES / eval_rate,
        "peak_rss_mb": memory["rss"],
        **({"peak_gpu_mb": memory["gpu"]} if memory["gpu"] is not None else {}),
    }


def print_report(report, keys):
    print(f"{report['device']}, torch {report['torch']}, {report['threads']} threads")
    print(f"{'':24s}{'faithful':>12s}{'fast':>12s}{'fast/faithful':>15s}")
    for key in keys:
        row = report[key]
        print(f"{key:24s}{row['faithful']:12.1f}{row['fast']:12.1f}{row['fast/faithful']:15.2f}")
    print(
        "centred feature cosine similarity fast vs faithful: "
        f"mean {report['feature_cosine_mean']:.6f}, "
        f"worst image {report['feature_cosine_worst']:.6f}"
    )
    floor = report["train_step_floor_ms"]
    print(
        f"the step's matrix products alone at the peak rate of {report['matmul_peak_gflops']:.0f} "
        f"GFLOP/s: {floor:.1f} ms, {floor / report['train_step_ms']['faithful']:.2f} of the "
        "faithful step"
    )


def written_by_bench(path):
    """Whether the file at path is a report of bench.py's, which a new one may replace."""
    try:
        with open(path) as f:
            report = json.load(f)
    except (OSError, ValueError):  # unreadable, or not JSON (UnicodeDecodeError is a ValueError)
        return False
    return isinstance(report, dict) and str(report.get("command")).startswith("python bench.py")


def out_problem(out):
    """Why the report cannot go to the file out, or None: known before a minute of measuring."""
    # abspath drops a trailing separator and makes "" the current folder: look at out as given.
    if not out or out.endswith(os.sep) or (os.altsep and out.endswith(os.altsep)):
        return "give a file name"
    folder = os.path.dirname(os.path.abspath(out))
    if os.path.isdir(out):
        return "that is a folder; give a file name"
    if not os.path.isdir(folder):
        return f"there is no folder {folder}"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"the folder {folder} is not writable"
    if os.path.exists(out) and not written_by_bench(out):
        return "that file was not written by bench.py; give another name"
    return files.name_too_long(out)


def checked_device(p, args):
    """The device to measure on, once every flag is shown usable; argparse's error otherwise,
    before any measuring."""
    if args.steps < 50 or args.warmup < 1 or args.rounds < 1 or args.images < 1:
        p.error("--steps must be at least 50, --warmup, --rounds and --images at least 1")
    if args.images > ALL_IMAGES:  # CIFAR-100's images, 3 KB each: more would only fill memory
        p.error(f"--images must be at most {ALL_IMAGES}, CIFAR-100's count, got {args.images}")
    if not 0 <= args.min_seconds < float("inf"):
        p.error("--min-seconds must be a finite number, 0 or more")
    why = out_problem(args.out)
    if why:
        p.error(f"--out {args.out!r}: {why}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device {args.device}: not a device name; use cpu, cuda or cuda:N")
    if device.type not in ("cpu", "cuda"):
        p.error(f"--device {args.device}: bench.py measures cpu or cuda")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        p.error(
            f"--device {args.device}: PyTorch sees {torch.cuda.device_count()} CUDA devices here"
        )
    return device


# --threads: how train.py's CPU threads run (environment variables), each against one thread.
THREAD_SETTINGS = {
    "default": {},  # as train.py sets them: the usable cores, threads.SPIN_COUNT
    "libgomp's spin (before)": {"GOMP_SPINCOUNT": "300000"},  # libgomp's own default
    "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "OMP_NUM_THREADS=1": {"OMP_NUM_THREADS": "1"},
}
THREAD_EPOCHS = 6  # the first epoch's start-up is left out: the median of the other five
BUSY = "while True: pass"  # a process that keeps a core busy, as a browser or a build does


def epoch_seconds(settings, folder):
    """Seconds per epoch of `python train.py --synthetic --retrain` in folder with settings
    (environment variables): the median time between its epoch lines as they arrive, after the
    first."""
    command = [sys.executable, os.path.join(folders.ROOT, "train.py"), "--synthetic", "--retrain"]
    command += ["--epochs", str(THREAD_EPOCHS), "--checkpoint-dir", folder]
    chosen = ("OMP_NUM_THREADS", "GOMP_SPINCOUNT", "OMP_WAIT_POLICY")  # each setting's own
    env = {k: v for k, v in os.environ.items() if k not in chosen}
    with subprocess.Popen(
        command, env=dict(env, **settings), stdout=subprocess.PIPE, text=True
    ) as run:
        arrived = [time.perf_counter() for line in run.stdout if line.startswith("Epoch ")]
    if run.returncode != 0 or len(arrived) != THREAD_EPOCHS:
        sys.exit(f"error: {' '.join(command)} failed (exit code {run.returncode})")
    return statistics.median(b - a for a, b in zip(arrived, arrived[1:], strict=False))


def thread_table(rounds, busy_counts=(0, 1, 2)):
    """{busy processes: {setting: seconds per epoch}}, the median of rounds turns, printed as a
    table with each setting's time against one thread's beside the same busy processes."""
    table = {}
    with tempfile.TemporaryDirectory() as folder:
        epoch_seconds({}, folder)  # the feature caches, made once
        for busy in busy_counts:
            spinners = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(busy)]
            try:
                times = {name: [] for name in THREAD_SETTINGS}
                for _ in range(rounds):
                    for name, settings in THREAD_SETTINGS.items():
                        times[name].append(epoch_seconds(settings, folder))
                load = os.getloadavg()[0]
            finally:
                for spinner in spinners:
                    spinner.kill()
            table[busy] = {name: statistics.median(t) for name, t in times.items()}
            one = table[busy]["OMP_NUM_THREADS=1"]
            print(f"beside {busy} busy processes (load average {load:.1f}):")
            for name, seconds in table[busy].items():
                print(
                    f"  {name:26s}{seconds:6.2f} s an epoch, {seconds / one:5.2f} of one thread's"
                )
    return table


def main(argv=None):
    p = commands.bench_parser(__doc__)
    args = p.parse_args(argv)
    device = checked_device(p, args)
    quiet_lightning()
    threads.use_cpu_threads("anomaly")  # as train.py chooses them for the set task
    if args.ablation:
        return ablation(device, args.steps, args.warmup)
    if args.threads:
        cpu = results.device_name(torch.device("cpu"))
        print(f"{cpu}, {threads.usable_cores()} usable cores, torch {torch.__version__}")
        return thread_table(args.rounds)
    images = np.random.default_rng(0).integers(0, 256, (args.images, 32, 32, 3), dtype=np.uint8)
    datasets = generated_datasets()
    torch.manual_seed(0)
    backbone = resnet34_backbone()

    # Times in this one process, the two paths taking turns; the best round of each counts, which
    # keeps a noisy machine from favouring either.
    turns = {path: [] for path in ("faithful", "fast")}
    for _ in range(args.rounds):
        for path in turns:
            fast_path = path == "fast"
            timed = time_training(fast_path, device, datasets, args.steps, args.warmup)
            step_s, steps_per_epoch, eval_rate, ops = timed
            extract = time_extraction(fast_path, device, backbone, images, args.min_seconds)
            extract_rate, feats = extract
            turns[path].append(
                dict(step_s=step_s, eval=eval_rate, extract=extract_rate, feats=feats, ops=ops)
            )
    by_path = {
        path: path_results(rounds, steps_per_epoch, device, args.images, path)
        for path, rounds in turns.items()
    }
    # Centred: with random weights every image's raw feature points nearly the same way.
    faithful_feats = turns["faithful"][0]["feats"]
    mean = faithful_feats.mean(dim=0)
    cosine = F.cosine_similarity(faithful_feats - mean, turns["fast"][0]["feats"] - mean)
    report = {
        "device": results.device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "command": " ".join(["python", "bench.py"] + (argv if argv is not None else sys.argv[1:])),
        "date": time.strftime("%Y-%m-%d"),
        "feature_cosine_mean": cosine.mean().item(),
        "feature_cosine_worst": cosine.min().item(),
        "matmul_peak_gflops": matmul_rate(device) / 1e9,
    }
    # The step's matrix products alone, at that peak rate: no path can take less.
    report["train_step_floor_ms"] = STEP_FLOP / report["matmul_peak_gflops"] / 1e6
    for key in by_path["faithful"]:
        faithful, faster = by_path["faithful"][key], by_path["fast"][key]
        report[key] = {"faithful": faithful, "fast": faster, "fast/faithful": faster / faithful}
    print_report(report, by_path["faithful"])
    files.save_json(args.out, report)
    print(f"written to {args.out}")
    return report


if __name__ == "__main__":
    stops.run_main(main, "no results were written.")
