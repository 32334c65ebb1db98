"""harness/caches.py: a split's cache made once and reused; a cache that is cut off, of another
format or made differently, reported in one line and rebuilt; room checked before any extraction;
offline, every missing download named (sources.py)."""

import os
import types

import pytest
import torch
import torch.nn as nn

import features
from harness import files
from harness.caches import cache_meta, cached_features, check_free_space, cifar100_features
from harness.sources import MissingResources
from helpers import ImagesAndLabels, spoil_truncate


class CountingSources:
    """open_sources for cached_features that counts its calls and serves tiny images through a tiny
    backbone."""

    def __init__(self, n=6):
        self.calls, self.n = 0, n

    def __call__(self):
        self.calls += 1
        torch.manual_seed(0)
        backbone = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, features.FEATURE_DIM)).eval()
        g = torch.Generator().manual_seed(1)
        data = {
            s: ImagesAndLabels(
                torch.randn(self.n, 3, 4, 4, generator=g), [i % 3 for i in range(self.n)]
            )
            for s in ("train", "test")
        }
        return data, backbone


def metas(n=6, weights="w"):
    return {s: cache_meta("toy", s, n, weights, 4) for s in ("train", "test")}


def extract(tmp_path, sources, meta=None):
    return cached_features(
        str(tmp_path), meta or metas(), 3, sources, torch.device("cpu"), num_workers=0
    )


def test_cache_is_computed_once_then_reused(tmp_path):
    sources = CountingSources()
    first = extract(tmp_path, sources)
    assert sources.calls == 1
    assert sorted(os.listdir(tmp_path)) == ["test_set_features.tar", "train_set_features.tar"]
    second = extract(tmp_path, sources)
    assert sources.calls == 1  # the backbone was not touched again
    for split in ("train", "test"):
        torch.testing.assert_close(first[split][0], second[split][0])
        assert second[split][1].tolist() == [0, 1, 2, 0, 1, 2]
        assert first[split][0].shape == (6, 512)


def spoil_bare_tensor(path):
    torch.save(torch.zeros(6, 512), path)  # what the post's code writes


def spoil_shape(path):
    cache = torch.load(path)
    cache["features"] = cache["features"][:, :100]
    torch.save(cache, path)


def spoiler(**change):
    """A spoiler that changes the cache's features or labels by change: {key: function of it}."""

    def spoil(path):
        cache = torch.load(path)
        for key, how in change.items():
            cache[key] = how(cache[key])
        torch.save(cache, path)

    return spoil


NOT_ITS_CLASSES = "labels that are not its 3 classes of 2 images each"


@pytest.mark.parametrize(
    "spoil, message",
    [
        (spoil_truncate, "cannot be read"),
        (spoil_bare_tensor, "bare tensor"),
        (spoil_shape, "does not hold 6 features"),
        (spoiler(features=lambda f: f.half()), "features of torch.float16, not torch.float32"),
        (spoiler(features=lambda f: f * float("nan")), "3072 features that are NaN or infinite"),
        (spoiler(labels=lambda y: y.float()), "labels that are not whole numbers"),
        (spoiler(labels=lambda y: y * 0), NOT_ITS_CLASSES),
        (spoiler(labels=lambda y: y * 10**6), NOT_ITS_CLASSES),
        (spoiler(labels=lambda y: y - 1), NOT_ITS_CLASSES),
        # Classes of equal size, but more of them than the data set has (0 1 2 3 4 5)...
        (spoiler(labels=lambda y: torch.arange(6)), NOT_ITS_CLASSES),
        # ... or one class relabelled as another that is not there (0 1 3 0 1 3).
        (spoiler(labels=lambda y: torch.where(y == 2, 3, y)), NOT_ITS_CLASSES),
    ],
)
def test_a_bad_cache_is_reported_and_rebuilt(tmp_path, capsys, spoil, message):
    sources = CountingSources()
    good = extract(tmp_path, sources)
    spoil(tmp_path / "train_set_features.tar")
    capsys.readouterr()
    rebuilt = extract(tmp_path, sources)
    out = capsys.readouterr().out
    assert message in out and "train_set_features.tar" in out
    assert max(map(len, out.splitlines())) < 300  # one short line, however large the fault
    about_test = [line for line in out.splitlines() if "test_set_features.tar" in line]
    assert [line.split(" from ")[0] for line in about_test] == ["Loaded the test features"]
    assert sources.calls == 2
    torch.testing.assert_close(rebuilt["train"][0], good["train"][0])
    extract(tmp_path, sources)
    assert sources.calls == 2  # the rebuilt cache is trusted again


def test_a_cache_made_differently_is_rebuilt(tmp_path, capsys):
    sources = CountingSources()
    extract(tmp_path, sources)
    extract(tmp_path, sources, metas(weights="other weights"))
    assert sources.calls == 2 and "made differently" in capsys.readouterr().out


def test_extraction_needs_room_for_its_cache(tmp_path, monkeypatch):
    one_mb_free = types.SimpleNamespace(free=2**20)
    monkeypatch.setattr(files.shutil, "disk_usage", lambda _: one_mb_free)
    sources = CountingSources(n=600)  # 600 features of 2 KiB each: 1.4 MB with a tenth to spare
    with pytest.raises(ValueError, match=r"train feature cache needs 1 MB and .* has 1 MB free"):
        cached_features(str(tmp_path), metas(n=600), 3, sources, torch.device("cpu"), num_workers=0)
    assert sources.calls == 0  # refused before the images and weights were even opened


def test_offline_names_everything_missing(tmp_path, monkeypatch):
    # A proxy on a closed local port makes every download fail at once, whatever the network.
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(MissingResources) as error:
        cifar100_features(
            str(tmp_path / "data"), str(tmp_path / "cache"), torch.device("cpu"), num_workers=0
        )
    message = str(error.value)
    assert "CIFAR-100" in message and str(tmp_path / "data" / "cifar-100-python") in message
    assert "ResNet34 weights" in message
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "resnet34-b627a593.pth") in message


@pytest.mark.parametrize("spare_bytes, refused", [(-1, True), (0, False)])
def test_the_room_a_cache_needs_is_its_numbers_and_labels_with_a_tenth_to_spare(
    tmp_path, monkeypatch, spare_bytes, refused
):
    n = 1000
    need = n * (512 * 4 + 8) * 1.1  # 4 bytes a float32 number, 8 an int64 label
    free = types.SimpleNamespace(free=need + spare_bytes)
    monkeypatch.setattr(files.shutil, "disk_usage", lambda _: free)
    if refused:
        with pytest.raises(ValueError, match="needs 2 MB"):
            check_free_space(str(tmp_path), n, "train")
    else:
        check_free_space(str(tmp_path), n, "train")


def test_the_other_paths_caches_are_named_only_where_they_are(tmp_path, capsys):
    sources = CountingSources()
    extract(tmp_path, sources)  # the post's caches of both splits
    assert "differ slightly" not in capsys.readouterr().out  # no --fast caches there
    fast_test = tmp_path / "test_set_features_fast.tar"  # as --fast would leave one, of test alone
    fast_test.write_bytes((tmp_path / "test_set_features.tar").read_bytes())
    extract(tmp_path, sources)
    note = capsys.readouterr().out.splitlines()[-1]
    assert note == (
        f"These are the post's features; --fast's, in {fast_test}, differ slightly, as may "
        "accuracies."
    )
