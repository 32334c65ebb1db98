"""harness/threads.py: the CPU threads of a run, how many and how long an idle one spins; each
command sets the spin before torch loads, and the spin changes no result."""

import os

import pytest
import torch

from harness import threads
from helpers import run_code


def test_threads_follow_the_work_unless_omp_num_threads_chooses(monkeypatch):
    monkeypatch.setattr(threads, "usable_cores", lambda: 8)
    assert threads.cpu_threads("reverse") == threads.cpu_threads("seq2seq") == 1
    # The set task takes the usable cores, shared between its processes.
    assert [threads.cpu_threads("anomaly", devices) for devices in (1, 2, 3, 16)] == [8, 4, 2, 1]
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # the suite sets it (conftest.py)
        threads.use_cpu_threads("anomaly", devices=2)
        assert torch.get_num_threads() == 4
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        torch.set_num_threads(3)  # as torch reads OMP_NUM_THREADS when it loads
        threads.use_cpu_threads("reverse")
        assert torch.get_num_threads() == 3  # the user's choice stands
    finally:
        torch.set_num_threads(before)


def test_the_spin_is_set_unless_the_user_chose_a_wait(monkeypatch):
    for name in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY"):
        monkeypatch.delenv(name, raising=False)
    threads.wait_briefly()
    assert os.environ["GOMP_SPINCOUNT"] == str(threads.SPIN_COUNT)
    for chosen in ({"GOMP_SPINCOUNT": "5"}, {"OMP_WAIT_POLICY": "ACTIVE"}):
        monkeypatch.delenv("GOMP_SPINCOUNT")
        for name, value in chosen.items():
            monkeypatch.setenv(name, value)
        threads.wait_briefly()
        assert os.environ.get("GOMP_SPINCOUNT") == chosen.get("GOMP_SPINCOUNT")
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)


# A command started as a user starts it, stopped as it imports torch: what GOMP_SPINCOUNT was then.
AS_TORCH_LOADS = """
import importlib.abc, os, runpy, sys
class Stop(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch":
            print(os.environ.get("GOMP_SPINCOUNT"))
            os._exit(0)
sys.meta_path.insert(0, Stop())
sys.argv = sys.argv[1:]
os.environ.pop("GOMP_SPINCOUNT", None)
os.environ.pop("OMP_WAIT_POLICY", None)
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("script", ["train.py", "predict.py", "visualize.py", "bench.py"])
def test_each_command_sets_the_spin_before_torch_loads(script):
    proc = run_code(AS_TORCH_LOADS, script)
    assert proc.stdout == f"{threads.SPIN_COUNT}\n", proc.stderr


# Ten training steps on two threads of a linear layer and a LayerNorm, whose weight and bias
# gradients PyTorch sums by thread: a checksum of the weights, exact.
TRAIN_STEPS = """
import torch
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(512, 256), torch.nn.LayerNorm(256))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
for _ in range(10):
    loss = model(torch.randn(640, 512)).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
print(torch.get_num_threads(), sum(p.double().sum().item() for p in model.parameters()).hex())
"""


def test_the_spin_changes_no_result():
    results = []
    for spin in ("0", "300000"):  # sleep at once; libgomp's own default
        env = dict(os.environ, OMP_NUM_THREADS="2", GOMP_SPINCOUNT=spin)
        results.append(run_code(TRAIN_STEPS, env=env).stdout)
    assert results[0] == results[1] and results[0].startswith("2 ")
