"""bench/gpu.py's CPU-side logic: the table and its verdicts, a failing row that does not stop the
run, the one-line refusal without a GPU, and a --smoke run of every row at tiny shapes."""
import importlib.util
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, bench


def test_without_a_gpu_it_says_so_in_one_line_and_exits_2():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    r = subprocess.run([sys.executable, "bench/gpu.py"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == "error: bench/gpu.py needs a CUDA GPU (this machine has none); --smoke runs its logic on CPU\n"


def test_the_table_gives_each_row_a_verdict_and_a_failing_check_does_not_stop_the_others():
    gpu = bench("gpu")
    t = gpu.Table()

    def fine(t, section):
        t.add(section, "fast enough", "3 ms", "< 5 ms", 3 < 5)
        t.add(section, "too slow", "9 ms", "< 5 ms", 9 < 5)
        t.add(section, "a figure", "42 tok/s")

    def broken(t):
        t.add("b", "first row", "1", "1", True)
        raise RuntimeError("CUDA out of memory\nmore detail")

    t.run("a", fine, "a")
    t.run("b", broken)
    t.run("c", fine, "c")
    verdicts = [(r[0], r[4]) for r in t.rows]
    assert verdicts == [("a", "PASS"), ("a", "FAIL"), ("a", "INFO"), ("b", "PASS"), ("b", "ERROR"),
                        ("c", "PASS"), ("c", "FAIL"), ("c", "INFO")]
    error = t.rows[4]
    assert error[1].startswith("RuntimeError at test_gpu_bench.py:") and error[2] == "CUDA out of memory"
    text = t.render()
    assert text.splitlines()[0].split() == ["section", "what", "measured", "target", "verdict"]
    assert text.splitlines()[-1] == "3 passed, 2 failed, 1 errors"


def test_smoke_run_fills_every_section_of_the_table():
    r = subprocess.run([sys.executable, "bench/gpu.py", "--smoke"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    table = r.stdout[r.stdout.index("\nsection "):]  # each row is printed as it comes, then the table
    rows = table.strip().splitlines()[1:-1]  # between the header and the count of verdicts
    sections = {line.split("  ")[0] for line in rows}
    assert {"kernels", "loss", "train", "targets", "hf", "long", "70b", "fsdp", "smollm2"} <= sections, r.stdout
    assert "ERROR" not in r.stdout, r.stdout
    assert sum(line.startswith("kernels") for line in rows) == 8
    runs = [line for line in rows if line.startswith("train ")]
    assert len(runs) == 8 and all("tok/s (" in line for line in runs), runs  # {lora, qlora} x recompute x compiled
    assert sum(line.startswith("70b") for line in rows) == 2
    assert sum(line.startswith("fsdp") and line.rstrip().endswith("PASS") for line in rows) == 3  # sharded = plain DP
    if importlib.util.find_spec("transformers") and importlib.util.find_spec("peft"):  # the fresh-process rows ran
        theirs = [line for line in rows if line.startswith("hf") and ", lora, recompute full" in line]
        assert len(theirs) == 1 and "tok/s (" in theirs[0], theirs
