"""tests/import_graph.py: the post's files import nothing of harness/, and no module of the project
reaches itself through its imports, those inside functions included; and the check finds both
faults where they are planted."""

import os
import shutil

from helpers import ROOT, run_script
from import_graph import circles, import_graph, post_imports_of_harness


def test_the_post_files_import_nothing_of_the_program_and_there_is_no_circle():
    graph = import_graph()
    assert {"features", "data", "model", "train", "harness.cli", "harness.fast"} <= graph.keys()
    assert post_imports_of_harness(graph) == []
    assert circles(graph) == []
    assert graph["features"] == graph["data"] == graph["model"] == []


def test_the_check_finds_a_harness_import_and_a_circle_inside_functions(tmp_path):
    for name in ("features.py", "data.py", "model.py", "train.py"):
        shutil.copy(os.path.join(ROOT, name), tmp_path / name)
    shutil.copytree(os.path.join(ROOT, "harness"), tmp_path / "harness")
    with open(tmp_path / "model.py", "a") as f:  # a program concern in the post's file
        f.write("\n\ndef later():\n    from harness.files import save_atomically\n")
    with open(tmp_path / "data.py", "a") as f:  # the package itself
        f.write("\nimport harness\n")
    with open(tmp_path / "harness" / "files.py", "a") as f:  # lock.py imports files.py
        f.write("\n\ndef later():\n    from . import lock\n")
    graph = import_graph(str(tmp_path))
    assert post_imports_of_harness(graph) == [("data", "harness"), ("model", "harness.files")]
    assert {"harness.files", "harness.lock"} in [set(circle) for circle in circles(graph)]


def test_the_script_prints_the_graph_one_line_a_module_and_holds():
    proc = run_script(os.path.join("tests", "import_graph.py"))
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    lines = proc.stdout.splitlines()
    assert {"features: -", "data: -", "model: -"} <= set(lines)
    assert len(lines) == len(import_graph())
    assert lines.index("train: " + ", ".join(import_graph()["train"])) > lines.index("model: -")
