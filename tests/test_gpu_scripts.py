"""The GPU scripts' Python (bench/gpu_bench.py, bench/gpu_profile.py) run on the CPU at small
sizes, with a wall-clock timer standing in for CUDA events, so that a broken script shows here
and not in a short GPU run. The times mean nothing on the CPU; the tables' shape
and the rows they must have are what is checked. The same holds for the CUDA tests' own code
(tests/test_cuda.py on the CPU op), through pytest and through bench/run_cuda_tests.py."""

import os
import pathlib
import re
import subprocess
import sys
import time

import pytest
import torch

import goft

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_bench  # noqa: E402
import gpu_profile  # noqa: E402
import gpu_sanitize  # noqa: E402

OVERRIDES = ("GOFT_CUDA_FALLBACK", "GOFT_CUDA_CHUNKS", "GOFT_CUDA_ROWS", "GOFT_CUDA_CTA_THREADS",
             "GOFT_CUDA_STRICT", "GOFT_CUDA_STAGE")


def wall_ms(fn, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return 1000 * (time.perf_counter() - start) / repeats


@pytest.fixture
def on_cpu(monkeypatch):
    monkeypatch.setattr(gpu_bench, "DEVICE", "cpu")
    monkeypatch.setattr(gpu_bench, "cuda_time_ms", wall_ms)
    for name in OVERRIDES:
        monkeypatch.delenv(name, raising=False)


def table_rows(text, first_cell):
    header = next(line for line in text.splitlines() if line.startswith(f"| {first_cell} |"))
    lines = text.splitlines()
    start = lines.index(header) + 2
    rows = []
    for line in lines[start:]:
        if not line.startswith("| "):
            break
        rows.append(line)
    columns = header.count("|")
    assert all(row.count("|") == columns for row in rows), f"ragged table under {header!r}"
    return rows


def test_gpu_bench_tables(on_cpu):
    op = gpu_bench.op_rows(32, 64, 1)
    layer = gpu_bench.layer_rows(128, 64, 1)
    wide = gpu_bench.wide_rows(1, 1)
    text = gpu_bench.markdown(op, layer, wide, 32, 64, 1, "CPU test")
    op_names = [row.split(" | ")[0][2:] for row in table_rows(text, "pass")]
    assert "angle gradients from x and grad_x (rotate_angle_grads)" in op_names
    assert len(op_names) == 9  # the copy and eight passes
    layer_names = [row.split(" | ")[0][2:] for row in table_rows(text, "layer")]
    assert layer_names[:2] == ["frozen nn.Linear alone", "with goft (GivensLinear, strict)"]
    assert "with goft (GivensLinear, x rotated: GOFT_WEIGHT_SIDE=0)" in layer_names
    assert "with goft.rotated_linear (weight rotated, strict)" in layer_names
    assert "Target goft <= 1.10x frozen:" in text
    frozen = table_rows(text, "layer")[0].split(" | ")
    assert frozen[2] == "1.000x" and frozen[3] == "1.000-1.000x |", "the frozen row's ratio is 1 in every round"
    wide_rows = table_rows(text, "dtype")
    assert len(wide_rows) == 2 * 2 * len(gpu_bench.WIDE_DIMS)
    for row in wide_rows:  # the general fallback is a backward column
        cells = row.split(" | ")
        assert (cells[5] == "-") == (cells[2] == "forward"), row
    assert goft.layers.WEIGHT_SIDE is None, "the x-rotated row must restore the switch"
    assert "GOFT_CUDA_FALLBACK" not in os.environ and "GOFT_CUDA_STRICT" not in os.environ

    assert "Target goft faster than LoRA r=8:" in text


def test_gpu_bench_keeps_sections_measured_before_a_failure(on_cpu, tmp_path):
    """A section that raises (a kernel path that never ran on a GPU) leaves the file with the
    sections measured before it, says which failed, and the later sections still run."""
    out = tmp_path / "RESULTS_GPU.md"

    def broken_layers():
        raise RuntimeError("a layer that cannot run")

    measure = {"op": lambda: gpu_bench.op_rows(32, 64, 1), "layer": broken_layers,
               "wide": lambda: gpu_bench.wide_rows(1, 1)}
    failed = gpu_bench.measure_and_write(
        measure, lambda got: gpu_bench.markdown(got["op"], got["layer"], got["wide"], 32, 64, 1, "CPU test"), out)
    assert failed == ["layer"]
    text = out.read_text()
    assert len(table_rows(text, "pass")) == 9 and table_rows(text, "layer") == []
    assert len(table_rows(text, "dtype")) == 2 * 2 * len(gpu_bench.WIDE_DIMS)
    assert "**The layer section failed**" in text and "Target goft" not in text


def test_gpu_profile_sweep(on_cpu, capsys):
    gpu_profile.sweep(16, 64, torch.bfloat16, 1)
    text = capsys.readouterr().out
    rows = table_rows(text, "chunks")
    assert len(rows) == 6 * 4
    assert not any("error" in row for row in rows)
    assert "angle grads, us" in text
    assert not any(name in os.environ for name in OVERRIDES)


def test_gpu_profile_staging(on_cpu, capsys):
    gpu_profile.staging(16, 64, torch.bfloat16, 1)
    rows = table_rows(capsys.readouterr().out, "pass")
    assert [row.split(" | ")[0][2:] for row in rows] == ["backward", "angle grads"]
    assert not any(name in os.environ for name in OVERRIDES)


def test_gpu_profile_layer_breakdown(on_cpu, capsys):
    gpu_profile.layer_breakdown(32, 64)
    text = capsys.readouterr().out
    assert "steps: frozen nn.Linear" in text and "steps: GivensLinear" in text


def test_gpu_sanitize_runs_every_path(capsys, monkeypatch):
    """bench/gpu_sanitize.py on the CPU op: every case runs, the staged strict kernels also
    unstaged and d = 1000 also on the fallbacks, the overrides are undone, and a non-finite result
    fails the run."""
    for name in OVERRIDES:
        monkeypatch.delenv(name, raising=False)
    assert gpu_sanitize.main(["--device", "cpu", "--dims", "5", "1000", "--dtypes", "float32", "bfloat16"]) == 0
    lines = capsys.readouterr().out.splitlines()
    cases = lines[:-1]
    # 2 widths x 2 dtypes x 2 transposes x 3 variants, angles also unstaged, d = 1000 also on the fallbacks
    assert len(cases) == 24 + 8 + 12
    assert sum("GOFT_CUDA_STAGE=0" in c for c in cases) == 8
    assert sum("GOFT_CUDA_FALLBACK=1" in c for c in cases) == 12 and all("d=1000" in c for c in cases
                                                                           if "FALLBACK" in c)
    assert lines[-1].startswith("gpu_sanitize.py: 0 case(s) with non-finite results")
    assert not any(name in os.environ for name in OVERRIDES)

    real_rotate = goft.rotate
    monkeypatch.setattr(goft, "rotate", lambda x, *args: real_rotate(x, *args) * float("nan"))
    assert gpu_sanitize.main(["--device", "cpu", "--dims", "5", "--dtypes", "float32"]) == 1
    assert "NOT FINITE" in capsys.readouterr().out


# The tests of tests/test_cuda.py that check behaviour only CUDA has (skip_off_gpu there).
CUDA_ONLY_TESTS = 5


@pytest.mark.parametrize("runner", ["pytest", "run_cuda_tests.py"])
def test_cuda_tests_run_on_the_cpu(runner):
    """tests/test_cuda.py with GOFT_CUDA_TESTS_DEVICE=cpu: every test but the CUDA-only ones runs
    on the CPU op and passes, through pytest and through gpu_check.sh's runner for images without
    pytest, so that neither meets a broken test for the first time on a GPU."""
    env = {**os.environ, "GOFT_CUDA_TESTS_DEVICE": "cpu"}
    if runner == "pytest":
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py"]
    else:
        cmd = [sys.executable, "bench/run_cuda_tests.py"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-6000:]
    summary = done.stdout.strip().splitlines()[-1]  # both end with "N passed, ..."
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped)", summary)}
    assert counts.get("failed", 0) == 0 and counts.get("skipped", 0) == CUDA_ONLY_TESTS, summary
    assert counts["passed"] > 600, summary
