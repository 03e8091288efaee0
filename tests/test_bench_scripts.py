"""The CPU benchmarks' own code at tiny sizes: a broken script shows here, not in a benchmark run.
The times mean nothing at these sizes; the records and the restored switches are checked."""

import os
import pathlib
import sys

import goft

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "bench"))

import common  # noqa: E402
import host_bench  # noqa: E402


def test_host_bench_records_every_variant():
    compilers = {key: os.environ.get(key) for key in common.COMPILER_VARIABLES}
    records = host_bench.measure(d=8, rows=4, steps=2, repeats=1)
    # PEFT's BOFT, failing to build its CUDA extension, would leave CC=CXX=gcc behind.
    assert {key: os.environ.get(key) for key in compilers} == compilers
    names = [r["variant"] for r in records]
    assert names[0] == "frozen" and records[0]["ratio"] == 1.0
    assert {"goft", "goft+scale", "qgoft", "lora r=8", "oft", "boft", host_bench.WEIGHT_SIDE} <= set(names)
    assert all(r["us_per_step"] > 0 for r in records)
    assert goft.layers.WEIGHT_SIDE is None, "the weight-side variant must restore the switch"
