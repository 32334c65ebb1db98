"""bench.py: it counts operators, not views; it refuses what it cannot measure before measuring
anything; and it replaces only the reports it wrote itself."""

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bench
from features import extract_features, image_transform
from harness import commands
from harness.sources import ImageArray
from helpers import ROOT, run_code


def test_dispatched_ops_counts_operators_not_views():
    x = torch.randn(4, 4)
    with torch.profiler.profile() as profiler:
        y = x.view(16).add(1).reshape(4, 4).t()  # one operator, add, and three views
        F.linear(y, x)  # one operator, whatever it calls inside
    assert bench.dispatched_ops(profiler.events()) == 2


@pytest.mark.parametrize(
    "argv",
    [
        ["--device", "foo"],
        ["--device", "mps"],
        ["--device", "cuda:99"],
        ["--images", "0"],
        ["--out", "/"],
        ["--out", ""],
        ["--out", "{tmp}"],  # a folder
        ["--out", "{tmp}/missing/"],  # a folder's name: os.path.abspath drops the slash
        ["--out", "{tmp}/new.json/"],
        ["--out", "{tmp}/missing/bench.json"],
        ["--out", os.path.join(ROOT, "README.md")],  # a file bench.py did not write
        ["--min-seconds", "inf"],
    ],
)
def test_bench_refuses_what_it_cannot_measure_before_measuring(argv, tmp_path, monkeypatch, capsys):
    def measure():
        raise AssertionError("bench.py began to measure")

    monkeypatch.setattr(bench, "generated_datasets", measure)  # the first step of every measuring
    with open(os.path.join(ROOT, "README.md"), "rb") as f:
        readme = f.read()
    with pytest.raises(SystemExit) as exit_info:
        bench.main([arg.format(tmp=tmp_path) for arg in argv])
    assert exit_info.value.code == 2 and "error: " in capsys.readouterr().err
    with open(os.path.join(ROOT, "README.md"), "rb") as f:
        assert f.read() == readme
    assert os.listdir(tmp_path) == []


def test_bench_refuses_a_folder_it_cannot_write_before_measuring(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "generated_datasets", lambda: pytest.fail("measuring began"))
    folder = tmp_path / "read_only"
    folder.mkdir(mode=0o555)
    if os.access(folder, os.W_OK):
        pytest.skip("this user writes into read-only folders (root)")
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--out", str(folder / "bench.json")])
    assert exit_info.value.code == 2 and "is not writable" in capsys.readouterr().err


def test_bench_replaces_only_its_own_reports(tmp_path):
    own, other = tmp_path / "bench.json", tmp_path / "notes.json"
    own.write_text(json.dumps({"command": "python bench.py --device cpu"}))
    other.write_text(json.dumps({"command": "something else"}))
    assert bench.written_by_bench(own) and not bench.written_by_bench(other)
    assert not bench.written_by_bench(tmp_path / "missing.json")


def test_counting_a_steps_operators_prints_nothing():
    # The profiler's library logs its start and stop, and on a CPU machine with the CUDA build of
    # torch an ERROR line: none of it may reach the report.
    code = (
        "import torch, bench; ops = bench.StepOps(at=0); "
        "ops.on_train_batch_start(None, None, None, 0); torch.ones(3).add(1); "
        "ops.on_train_batch_end(None, None, None, None, 0); print(ops.count)"
    )
    proc = run_code(code)
    assert proc.returncode == 0 and proc.stderr == "" and proc.stdout == "2\n"  # ones, add


def test_extraction_starts_no_more_workers_than_cores(recwarn):
    images = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 224 * 224, 4)).eval()
    rate, feats = bench.time_extraction(False, torch.device("cpu"), backbone, images, 0)
    assert rate > 0
    # What it timed is what features.extract_features computes.
    dataset = ImageArray(images, [0, 0], image_transform())
    expected = extract_features(backbone, dataset, torch.device("cpu"), num_workers=0)
    torch.testing.assert_close(feats, expected)
    assert not [w for w in recwarn if "worker processes" in str(w.message)]


def test_the_report_shows_each_row_and_the_floor_against_the_faithful_step(capsys):
    rows = ["train_step_ms"]
    row = {"faithful": 2.0, "fast": 1.0, "fast/faithful": 0.5}
    report = dict(device="cpu", torch="2", threads=2, train_step_ms=row, train_step_floor_ms=0.5,
                  matmul_peak_gflops=100, feature_cosine_mean=0.9995,
                  feature_cosine_worst=0.999)  # fmt: skip
    bench.print_report(report, rows)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "cpu, torch 2, 2 threads"
    assert lines[2].split() == ["train_step_ms", "2.0", "1.0", "0.50"]
    assert lines[3].endswith("mean 0.999500, worst image 0.999000")
    assert lines[4].endswith("100 GFLOP/s: 0.5 ms, 0.25 of the faithful step")  # 0.5 ms of 2


def test_help_states_each_flags_limits(capsys):
    with pytest.raises(SystemExit):
        commands.bench_parser(bench.__doc__).parse_args(["-h"])
    text = " ".join(capsys.readouterr().out.split())
    assert "at least 50" in text and "0 or more" in text and text.count("at least 1") >= 2
    assert "1 to 60000" in text


@pytest.mark.parametrize(
    "flags, said",
    [(["--images", "100000000000"], "--images must be at most 60000, CIFAR-100's count"),
     (["--out", "b" * 250 + ".json"], "its name is too long: at most")],
)  # fmt: skip
def test_what_could_never_be_measured_or_kept_is_refused_before_measuring(flags, said, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(flags)
    assert exit_info.value.code == 2 and said in capsys.readouterr().err
