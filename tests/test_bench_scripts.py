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


def test_saved_for_backward_counts_what_autograd_keeps():
    # goft keeps x (and its angles); a per-layer autograd implementation one tensor of x's size
    # per layer; the dense chain of the authors' code x and a d x d matrix per layer, some of them
    # sparse (which have no storage of their own and used to stop the probe).
    import torch

    import baselines
    import layer_bench

    d, rows = 64, 256
    x = torch.randn(rows, d, requires_grad=True)
    angles = torch.zeros(d - 1, requires_grad=True)
    x_bytes, layers = x.numel() * 4, len(baselines.layer_slices(d))
    goft_saved = common.saved_for_backward(lambda: goft.rotate(x, angles), exclude=[angles])
    assert goft_saved["activations"] == x_bytes
    per_layer = common.saved_for_backward(lambda: baselines.rotate_per_layer(x, angles), exclude=[angles])
    assert per_layer["activations"] >= layers * x_bytes
    dense = common.saved_for_backward(lambda: baselines.rotate_dense(x, angles), exclude=[angles])
    assert dense["activations"] >= x_bytes + (layers - 1) * d * d * 4
    records = layer_bench.saved_by_baselines(d, rows)
    assert [r["implementation"] for r in records] == list(layer_bench.MEMORY_BASELINES)
    assert [r["saved_activations"] for r in records] == [per_layer["activations"], dense["activations"]]


def test_round_ratios_pair_samples_of_the_same_round():
    calls = []
    samples = common.time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                      repeats=4, warmup=1)
    assert len(samples["a"]) == len(samples["b"]) == 4
    ratios = common.round_ratios(samples["a"], samples["b"])
    assert ratios == [a / b for a, b in zip(samples["a"], samples["b"])]
    assert common.fmt_range([1.25, 0.5, 1.0]) == "0.500-1.250"


def test_a_method_with_fewer_rounds_is_set_against_the_reference_of_those_rounds():
    # BOFT got 3 rounds of LoRA's 10 in one training run; its 3 rounds ran on a slower machine.
    slow_method, reference = [30.0, 33.0, 36.0], [3.0, 3.0, 3.3] + [2.0] * 7
    ratio = common.ratio_in_shared_rounds(slow_method, reference)
    assert ratio == 11.0
    ratios = common.round_ratios(slow_method, reference)
    assert min(ratios) <= ratio <= max(ratios)  # the median over all 10 rounds (2.0) would give 16.5
    assert common.ratio_in_shared_rounds(reference, slow_method) == 1 / 11.0


def test_a_slow_callable_is_timed_after_its_cold_run():
    runs = []

    def slow():
        runs.append(None)

    samples = common.time_interleaved({"slow": slow}, repeats=5, slow_s=-1.0, warmup=1)
    assert len(runs) == 2 and len(samples["slow"]) == 1


def test_a_quick_run_writes_beside_the_results_not_over_them(tmp_path, monkeypatch):
    # --quick shrinks the sizes; its numbers must never replace the files the README quotes.
    for name in ("OUTPUT_DIR", "RESULTS_DIR", "RESULTS_MD"):
        monkeypatch.setattr(common, name, getattr(common, name))
    monkeypatch.setattr(common, "QUICK_OUTPUT_DIR", tmp_path / "quick")
    quoted = {p.name: p.read_bytes() for p in (common.BENCH_DIR / "results").glob("*.*")}
    quoted_md = (common.BENCH_DIR / "RESULTS.md").read_bytes()
    common.send_outputs_for(True)
    # Checked before anything is written: a broken redirect must not overwrite the quoted files.
    assert common.RESULTS_DIR == tmp_path / "quick" / "results" and common.RESULTS_MD.parent == tmp_path / "quick"
    common.write_section("45-host", "Host time per layer step", "a quick run's table", {"quick": True})
    assert common.output_path("layer_bench.png") == tmp_path / "quick" / "layer_bench.png"
    assert (tmp_path / "quick" / "results" / "45-host.md").read_text().endswith("a quick run's table\n")
    assert "a quick run's table" in (tmp_path / "quick" / "RESULTS.md").read_text()
    assert {p.name: p.read_bytes() for p in (common.BENCH_DIR / "results").glob("*.*")} == quoted
    assert (common.BENCH_DIR / "RESULTS.md").read_bytes() == quoted_md


def test_memory_probes_run_after_every_timing(tmp_path, monkeypatch):
    # The peak-RSS probe fixes glibc's mmap threshold for the rest of the process, which changes
    # the page faults (and times) of any step timed after it: the layer and training benchmarks
    # must time every width and model first, then probe.
    import layer_bench
    import train_bench

    monkeypatch.setattr(common, "QUICK_OUTPUT_DIR", tmp_path / "quick")
    for name in ("OUTPUT_DIR", "RESULTS_DIR", "RESULTS_MD"):
        monkeypatch.setattr(common, name, getattr(common, name))
    events = []
    timed, probed = common.time_interleaved, common.peak_rss_growth

    def time_interleaved(fns, *args, **kwargs):
        events.append("time")
        return timed(fns, *args, **kwargs)

    def peak_rss_growth(fn):
        events.append("probe")
        return probed(fn)

    monkeypatch.setattr(common, "time_interleaved", time_interleaved)
    monkeypatch.setattr(common, "peak_rss_growth", peak_rss_growth)
    for script in (layer_bench, train_bench):  # matplotlib is a bench extra, not a test one
        monkeypatch.setattr(script, "plot", lambda *args, **kwargs: None)
    assert layer_bench.main(["--quick", "--dims", "8", "16", "--rows", "8", "--repeats", "1",
                             "--variants", "frozen", "goft"]) == 0
    assert events == ["time"] * 2 + ["probe"] * 4, events
    events.clear()
    assert train_bench.main(["--quick", "--repeats", "1", "--variants", "goft", "lora r=8"]) == 0
    assert events == ["time"] * len(train_bench.MODELS) + ["probe"] * 2 * len(train_bench.MODELS), events
