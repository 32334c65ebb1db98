"""Find the odd one out among your own pictures with the trained set-anomaly model.

    python predict.py photos/ --pretrained      # the tutorial author's trained model: no training
    python predict.py photos/                   # every image file in the folder, sorted by name
    python predict.py a.jpg b.jpg c.png         # or the files themselves; two or more
    python predict.py photos/ --json            # the same, as JSON for scripts
    python predict.py photos/ --figure odd.png  # the images, probabilities and attention maps
    python predict.py --set-sizes 2 5 10 20     # accuracy on the test features, per set size

Each image goes through the transform and the ImageNet ResNet34 of the training features
(features.py), the set through the AnomalyPredictor that `python train.py` saved, or with
--pretrained the one the tutorial's author trained (downloaded once and verified, as `python
train.py --pretrained` does). The model was trained on sets of 10, but its attention fixes no set
size: any set of two or more images works.
"""

from harness import stops

if __name__ == "__main__":
    stops.while_starting()  # Ctrl-C or SIGTERM from the start on: one line, no traceback
    from harness import commands, threads

    threads.wait_briefly()  # before torch loads: how its idle threads wait
    commands.predict_parser(__doc__).parse_args()  # -h, a mistyped flag: answered before torch


import contextlib
import json
import os
import shlex
import stat
import sys

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader

import features
from data import SetAnomalyDataset
from harness import caches, commands, pretrained, sources, synthetic
from harness.checkpoints import load_model
from harness.files import name_too_long
from harness.folders import ROOT, model_file, run_dir
from harness.preflight import pick_device
from harness.sources import MissingResources
from harness.verdict import CLEAR_RATIO, at_chance, is_clear, percent_texts
from model import AnomalyPredictor
from train import CHECKPOINT_PATH, IO_DIMS

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".ppm", ".tif", ".tiff", ".webp")


def image_files(paths):
    """The files to look at: those given, in their order, or every image file of one folder."""
    if len(paths) == 1 and os.path.isdir(paths[0]):
        files = sorted(
            os.path.join(paths[0], f)
            for f in os.listdir(paths[0])
            if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(paths[0], f))
        )
        if not files:
            kinds = ", ".join(IMAGE_EXTENSIONS)
            sys.exit(f"error: the folder {paths[0]} holds no image files ({kinds}).")
        return files
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        sys.exit(f"error: no such file or folder: {', '.join(missing)}")
    folders = [p for p in paths if os.path.isdir(p)]
    if folders:
        sys.exit(f"error: give one folder alone, or image files: {', '.join(folders)} is a folder.")
    return list(paths)


class Unreadable(Exception):
    """A file that is no image load_image can read; the message says why."""


def eight_bit(image):
    """image with 8 bits a channel. PIL's convert("RGB") clips 16-bit and 32-bit greys at 255 and
    floats at 1 (a 16-bit picture turns white, a float one black), so these are scaled first as a
    viewer shows them: integers from 0..65535 (0..their maximum where it is larger), floats from
    0..1, their usual range, or where they leave it, from their least to their greatest value."""
    if image.mode != "F" and not image.mode.startswith("I"):
        return image
    values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = values.min(), values.max()
    if image.mode != "F":
        low, high = 0.0, max(high, 65535.0)
    elif low >= 0 and high <= 1:
        low, high = 0.0, 1.0
    scaled = (values - low) * 255 / max(high - low, np.finfo(np.float64).tiny)
    return Image.fromarray(np.clip(scaled, 0, 255).round().astype(np.uint8), "L")


def load_image(path):
    """The image at path as CIFAR-100 holds its images: 32×32 RGB, upright as a viewer shows it
    (its EXIF orientation applied). Transparent parts become white, grey and palette images RGB,
    16-bit and float ones 8-bit; the largest centred square is shrunk to 32×32, so the training
    features' image transform then sees what it saw in training. Raises Unreadable saying why
    where path is no image it can read."""
    try:
        # A named pipe or a device would make open or read wait, maybe forever: regular files only,
        # opened without blocking in case one is swapped in after this check.
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise Unreadable("not a regular file")
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
        with os.fdopen(fd, "rb") as file, Image.open(file) as image:
            image.load()
            # A phone stores a portrait photo as taken and tags the turn that shows it upright
            # (EXIF orientation): turned as every viewer turns it, for the model and the figure.
            image = eight_bit(ImageOps.exif_transpose(image))
            if image.mode in ("RGBA", "LA", "PA") or (
                image.mode == "P" and "transparency" in image.info
            ):
                rgba = image.convert("RGBA")
                image = Image.new("RGB", rgba.size, (255, 255, 255))
                image.paste(rgba, mask=rgba.getchannel("A"))
            image = image.convert("RGB")
    except Unreadable:
        raise
    except Exception as error:  # PIL meets a corrupt file with about any: SyntaxError, EOFError…
        raise Unreadable(type(error).__name__) from None
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((32, 32), Image.BICUBIC)


def load_images(files):
    """[N, 32, 32, 3] uint8, as CIFAR-100's .data, of files; exits naming every one it cannot read,
    so that one run tells the user all there is to remove."""
    images, unreadable = [], []
    for f in files:
        try:
            images.append(np.asarray(load_image(f)))
        except Unreadable as why:
            unreadable.append((f, why))
    if len(unreadable) == 1:
        f, why = unreadable[0]
        sys.exit(f"error: {f} is not a readable image ({why}). Remove it or give other files.")
    if unreadable:
        named = ", ".join(f"{f} ({why})" for f, why in unreadable)
        sys.exit(
            f"error: {len(unreadable)} of the {len(files)} files are not readable images: {named}. "
            "Remove them or give other files."
        )
    return np.stack(images)


def train_hint(args, *flags):
    """The train.py command that makes what this run of predict.py reads, in backquotes."""
    flags = ("--pretrained",) * args.pretrained + flags
    command = commands.train_command(
        *flags, synthetic=args.synthetic, checkpoint_dir=args.checkpoint_dir,
        default_dir=CHECKPOINT_PATH,
    )  # fmt: skip
    return f"`{command}`"


def refuse_unusable_model(args):
    """Exits: the model's weights, each finite (load_model refuses others), overflow as they are
    multiplied (one of 3e38, say) and give probabilities that are not numbers."""
    sys.exit(
        "error: the model gives no usable probabilities (its weights overflow to inf or NaN); "
        f"{train_hint(args, '--retrain')} trains it anew."
    )


def synthetic_hint(args):
    """Where no model was trained on CIFAR-100 but `python train.py --synthetic` left one: a
    sentence that points to it."""
    model = model_file(run_dir(args.checkpoint_dir, synthetic=True))
    if args.synthetic or args.ckpt or not os.path.isfile(model):
        return ""
    command = commands.train_command(
        synthetic=True, checkpoint_dir=args.checkpoint_dir, default_dir=CHECKPOINT_PATH
    )
    return f" The model of `{command}` is at {os.path.abspath(model)}: add --synthetic to use it."


def script_folder_hint(args):
    """Run from another folder, a relative --checkpoint-dir (the default, say) misses the models
    beside predict.py: a sentence that names the one there, if any (that of --synthetic where the
    other is missing), and the flags that reach it."""
    folder = os.path.normpath(os.path.join(ROOT, args.checkpoint_dir))
    if args.ckpt or folder == os.path.abspath(args.checkpoint_dir):  # absolute, or run from ROOT
        return ""
    for of_synthetic in dict.fromkeys([args.synthetic, True]):
        model = model_file(run_dir(folder, of_synthetic))
        if os.path.isfile(model):
            flags = "--synthetic " * (of_synthetic and not args.synthetic)
            flags += f"--checkpoint-dir {shlex.quote(folder)}"
            return f" There is one beside predict.py, {model}: add {flags} to use it."
    return ""


def model_hints(args):
    """The sentences that point to a model elsewhere, for the message that there is none: the
    one beside predict.py or of --synthetic, if any; and the tutorial author's (--pretrained)."""
    published = (
        " Or add --pretrained: the tutorial author's trained model, downloaded once (about 9 MB)."
    )
    return synthetic_hint(args) + script_folder_hint(args) + published * (not args.synthetic)


def set_model_and_backbone(args, ckpt, device, backbone=True):
    """(the set model, the backbone or None without backbone) that this run uses: with --pretrained
    the tutorial author's model and the ImageNet ResNet34, with --synthetic those of `python
    train.py --synthetic`, otherwise train.py's model and the ImageNet ResNet34. Exits with a
    message where one cannot be had; with --pretrained naming each missing file at once."""
    if args.pretrained:
        return published_model_and_backbone(args, device, backbone)
    model = load_set_model(ckpt, device, train_hint(args), model_hints(args))
    if not backbone:
        return model, None
    get_backbone = synthetic.synthetic_backbone if args.synthetic else sources.imagenet_resnet34
    try:
        return model, get_backbone()
    except MissingResources as error:
        sys.exit(f"error: {error}")


def published_model_and_backbone(args, device, backbone=True):
    """(the tutorial author's set model, the ImageNet ResNet34 or None without backbone), each
    downloaded once and verified, as train.py --pretrained does; offline, exits naming each file
    that is missing and where it goes."""
    missing, published, resnet = [], None, None
    try:
        published = pretrained.fetch_published(args.checkpoint_dir, "anomaly")
    except MissingResources as error:
        missing += error.items
    if backbone:
        try:
            resnet = sources.imagenet_resnet34()
        except MissingResources as error:
            missing += error.items
    if missing:
        sys.exit(f"error: {MissingResources(missing, needs='predict.py --pretrained')}")
    model = pretrained.load_published(published, AnomalyPredictor, IO_DIMS["anomaly"])
    return model.to(device), resnet


def load_set_model(path, device, command="`python train.py`", other=""):
    """The AnomalyPredictor saved at path; exits with a message if it is missing or unusable.
    command: the train.py command that makes the model; other: a hint to a model that is there."""
    if os.path.isdir(path):
        sys.exit(f"error: --ckpt {path} is a folder; give the SetAnomalyDetect.ckpt file in it.")
    if not os.path.isfile(path):
        sys.exit(
            f"error: no trained model at {os.path.abspath(path)}. {command} trains one and saves "
            f"it there, or point --ckpt at a SetAnomalyDetect.ckpt.{other}"
        )
    try:
        return load_model(path, AnomalyPredictor, IO_DIMS["anomaly"], device)[0]
    except ValueError as error:
        sys.exit(f"error: {error}; use the SetAnomalyDetect.ckpt that {command} writes.")


@torch.no_grad()
def predict(model, backbone, images, device, image_size=features.IMAGE_SIZE, maps=True):
    """(probabilities [N] that each of images [N, 32, 32, 3] uint8 is the odd one out, attention
    maps: layers × [Head, N, N], or None without maps: they take N² numbers a head and a layer)."""
    dataset = sources.ImageArray(images, [0] * len(images), features.image_transform(image_size))
    feats = features.extract_features(
        backbone, dataset, device, batch_size=32, num_workers=0, desc="images"
    )
    x = feats[None].to(device)  # one set: [1, N, 512]
    probs = model.anomaly_logits(x)[0].softmax(dim=0).cpu().numpy()
    if not maps:
        return probs, None
    maps = model.get_attention_maps(x, add_positional_encoding=False)
    return probs, [m[0].cpu().numpy() for m in maps]


MOST_IN_A_FIGURE = 100  # pictures a figure shows legibly: 10 rows of 10, maps of 100 positions


def free_bytes(device):
    """Bytes of memory free for the computation on device: the GPU's, or the machine's (Linux's
    MemAvailable); None where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def refuse_too_large(count, model, device):
    """Exits before the model runs if one set of count pictures needs more memory than device has
    free: each layer's attention holds heads × count² numbers, about three times over while it is
    computed (logits, softmax, dropout's copy), float32."""
    free, heads = free_bytes(device), model.hparams.num_heads
    if free is None or 3 * 4 * heads * count**2 <= free:
        return
    most = int((free / (3 * 4 * heads)) ** 0.5)
    sys.exit(
        f"error: a set of {count} pictures needs {3 * 4 * heads * count**2 / 2**30:.1f} GB for its "
        f"attention, and {free / 2**30:.1f} GB are free here: give at most {most} pictures."
    )


@torch.no_grad()
def set_size_accuracy(model, feats, labels, set_size, device):
    """Accuracy of model on the post's fixed evaluation sets of set_size from feats and labels; nan
    where the model's logits are not all finite numbers, as argmax would pick among them anyway."""
    sets = SetAnomalyDataset(feats, labels, set_size=set_size, train=False)
    right = 0
    for img_sets, _, label in DataLoader(sets, batch_size=256):
        logits = model.anomaly_logits(img_sets.to(device))
        if not torch.isfinite(logits).all():
            return float("nan")
        right += (logits.argmax(dim=-1).cpu() == label).sum().item()
    return right / len(labels)


def set_size_accuracies(args, run_folder, model, device, out=None):
    """{set size: accuracy} of model on the cached test features, printed; exits without them."""
    meta = synthetic.synthetic_meta("test") if args.synthetic else caches.cifar100_meta("test")
    classes = synthetic.SYNTHETIC["num_classes"] if args.synthetic else features.CIFAR100_CLASSES
    command = train_hint(args)
    cache = caches.cached_test_features(run_folder, meta, classes, f"{command} rebuilds it")
    if cache is None:
        sys.exit(f"error: no valid test feature cache in {run_folder}; {command} makes it.")
    try:
        accuracies = {n: set_size_accuracy(model, *cache, n, device) for n in args.set_sizes}
    except ValueError as error:
        sys.exit(f"error: {error}")
    if not np.isfinite(list(accuracies.values())).all():
        refuse_unusable_model(args)
    if args.json:
        print(json.dumps(accuracies), file=out or sys.stdout)
    else:
        for n, acc in accuracies.items():
            print(f"set size {n:3d}: accuracy {100 * acc:6.2f}% (chance {100 / n:6.2f}%)")
    return accuracies


def check_figure(p, args, files=()):
    """Refuses, with argparse's error, a --figure that cannot be a new PNG file: with --set-sizes,
    empty, under a file, a folder, not .png; given files, one that would replace a picture or join
    a folder's pictures."""
    figure = args.figure
    if figure is not None and args.set_sizes:
        p.error("--figure draws a prediction for images; --set-sizes makes none")
    if figure == "":
        p.error("--figure needs a file name ending in .png")
    if not figure:
        return
    if os.path.isfile(os.path.dirname(os.path.abspath(figure))):
        p.error(f"--figure {figure}: {os.path.dirname(figure)} is a file, not a folder")
    if os.path.isdir(figure):
        p.error(f"--figure {figure} is a folder: name the PNG file, e.g. --figure odd.png")
    if not figure.lower().endswith(".png"):
        p.error(f"--figure writes a PNG image: give a name ending in .png, not {figure}")
    path = os.path.abspath(figure)
    if path in map(os.path.abspath, files) or (
        files
        and os.path.isdir(args.images[0])
        and os.path.dirname(path) == os.path.abspath(args.images[0])
    ):
        p.error(f"--figure {figure} would write over or among the pictures; put it elsewhere")


def refuse_unwritable_figure(figure):
    """Exits unless figure can be written as a new file, found out before any work: it must not be
    there yet, and its folder must be and be writable. Named as the user gave them, never as the
    temporary file that the figure is written to first."""
    folder = os.path.dirname(figure) or "."
    if os.path.lexists(figure):
        sys.exit(f"error: --figure {figure} already exists; remove it or choose another name.")
    if not os.path.isdir(folder):
        sys.exit(f"error: --figure {figure}: there is no folder {folder}; make it or choose one.")
    if not os.access(folder, os.W_OK | os.X_OK):
        sys.exit(f"error: --figure {figure}: no permission to write in {folder}; choose another.")
    why = name_too_long(figure)
    if why:
        sys.exit(f"error: --figure {figure}: {why}; choose a shorter one.")


def verdict(files, probs, clear, chance):
    """What a run finds, as --json prints it and main returns it: each file's probability (probs),
    the most likely file, and whether it is clearly the odd one out (is_clear; predicted_index and
    predicted_file are None otherwise) or the model scores at chance (at_chance)."""
    likely = int(np.argmax(probs))
    odd = likely if clear else None
    return dict(
        files=files,
        probabilities=probs,
        most_likely_index=likely,
        most_likely_file=files[likely],
        clear=clear,
        predicted_index=odd,
        predicted_file=None if odd is None else files[odd],
        at_chance=chance,
    )


def print_verdict(result, shown, json_out=None):
    """Each file's probability, most likely first, then the odd one out; or that the model cannot
    tell the pictures apart; or that none is clearly the odd one. With json_out, result (verdict's)
    as JSON there. shown: the probabilities as text."""
    if json_out:
        probabilities = [float(q) for q in result["probabilities"]]
        print(json.dumps(dict(result, probabilities=probabilities), indent=2), file=json_out)
        return
    files, probs, likely = result["files"], result["probabilities"], result["most_likely_index"]
    order = np.argsort(-probs, kind="stable")
    width = max(map(len, shown))  # 9.9704% under 10.1080%, aligned
    print("Probability of being the odd one out:")
    for i in order:
        print(f"{shown[i]:>{width}s}  {files[i]}")
    if result["clear"]:
        print(f"Odd one out: {files[likely]} ({shown[likely]})")
    elif result["at_chance"]:
        n = len(files)
        print(
            f"The model cannot tell these pictures apart: each gets about 1/{n} ({100 / n:.2f}%), "
            f"the most likely ({shown[likely]}) not {CLEAR_RATIO:g} times as likely as the least "
            f"({shown[order[-1]]})."
        )
    else:
        print(
            f"No clear odd one out: the most likely, {files[likely]} ({shown[likely]}), is not "
            f"{CLEAR_RATIO:g} times as likely as the next ({shown[order[1]]})."
        )


def main(argv=None):
    p = commands.predict_parser(__doc__)
    args = p.parse_args(argv)
    args.checkpoint_dir = args.checkpoint_dir or CHECKPOINT_PATH  # train.py's
    out = sys.stdout
    # With --json stdout holds the JSON alone: every note (a cache rebuilt, say) goes to stderr.
    with contextlib.redirect_stdout(sys.stderr if args.json else out):
        return predict_or_measure(p, args, out)


def predict_or_measure(p, args, out):
    """What main does: the odd one out of args.images, or with --set-sizes the accuracies; the
    JSON of --json is printed to out."""
    if args.pretrained and (args.synthetic or args.ckpt):
        p.error("--pretrained uses the tutorial author's model with the ImageNet ResNet34: "
                "give it without --synthetic and --ckpt")  # fmt: skip
    run_folder = run_dir(args.checkpoint_dir, args.synthetic)
    ckpt = args.ckpt or model_file(run_folder)
    check_figure(p, args)
    device = pick_device("auto")
    if args.set_sizes:
        if args.images:
            p.error("--set-sizes measures on the test features; give no images with it")
        model = set_model_and_backbone(args, ckpt, device, backbone=False)[0]
        return set_size_accuracies(args, run_folder, model, device, out)

    if not args.images:
        p.error("give the pictures to look at: two or more files, or a folder, e.g. "
                "`python predict.py my_photos/`")  # fmt: skip
    files = image_files(args.images)
    if args.figure:
        check_figure(p, args, files)
        refuse_unwritable_figure(args.figure)
        if len(files) > MOST_IN_A_FIGURE:
            p.error(f"--figure shows at most {MOST_IN_A_FIGURE} pictures; {len(files)} given")
    if len(files) < 2:
        sys.exit(f"error: an odd one out needs at least two images; got {len(files)}.")
    images = load_images(files)
    model, backbone = set_model_and_backbone(args, ckpt, device)
    image_size = synthetic.SYNTHETIC["image_size"] if args.synthetic else features.IMAGE_SIZE
    refuse_too_large(len(images), model, device)
    probs, maps = predict(model, backbone, images, device, image_size, maps=bool(args.figure))
    if not np.isfinite(probs).all():
        refuse_unusable_model(args)
    names = [os.path.basename(f) for f in files]
    odd = int(np.argmax(probs))

    clear, chance, shown = is_clear(probs), at_chance(probs), percent_texts(probs)
    if args.figure:
        import visualize  # matplotlib only when a figure is asked for

        heading = "Odd one out" if clear else "No clear odd one out; most likely"
        title = f"{heading}: {names[odd]} ({shown[odd]})"
        visualize.plot_set_prediction(args.figure, images / 255, probs, maps, title, names, clear)
    result = verdict(files, probs, clear, chance)
    print_verdict(result, shown, out if args.json else None)
    if args.figure:  # after the table; with --json on stderr, as stdout is redirected there
        print(f"Figure written to {args.figure}")
        if any(visualize.drawable(name) != name for name in names):
            print(
                "No font here draws some characters of the file names: the figure writes them "
                "as codes (\\u732b). A CJK font (Noto Sans CJK, WenQuanYi) draws them."
            )
    return result


if __name__ == "__main__":
    stops.run_main(main, "nothing was written.")
