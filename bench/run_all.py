"""Runs every benchmark (core op targets, op, layer, host time, training step, op profile, CUDA register use) and rebuilds bench/RESULTS.md.

    python bench/run_all.py            # the full run, about 30-35 minutes on an idle 2-core CPU
    python bench/run_all.py --quick    # small sizes, a minute or two: checks that everything runs

Each benchmark runs in its own process (no compile caches or allocator state shared between them),
writes its section to bench/results/ and its plot next to this file; RESULTS.md is then assembled
from every section present, including sections other tools wrote there. Timings on a shared
machine are noisy: the load average is printed before and after and recorded in each section.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import common

BENCHES = {
    "core": "core_bench.py",
    "ops": "ops_bench.py",
    "layer": "layer_bench.py",
    "host": "host_bench.py",
    "train": "train_bench.py",
    "profile": "profile_op.py",
    "cuda-registers": "cuda_registers.py",
}


def write_targets_summary() -> None:
    """bench/results/20-targets.md: the issue-5 targets of every section present, in one table."""
    import json

    import layer_bench
    import train_bench

    rows, sources = [], []
    for stem, module in (("40-layer", layer_bench), ("50-train", train_bench)):
        path = common.RESULTS_DIR / f"{stem}.json"
        if path.exists():
            data = json.loads(path.read_text())
            rows += (module.targets(data["records"], data["pinned_heap"]) if "pinned_heap" in data
                     else module.targets(data["records"]))
            sources.append(f"`{stem}.md` (`{data.get('command', '?')}`, {data['machine']['date']}, "
                           f"load {data['machine']['load']})")
    if not rows:
        return
    body = ("Collected from " + ", ".join(sources) + "; the sections below give the measurements, "
            "and the profile section what bounds them.\n\n")
    body += common.md_table(["target", "measured", "limit", "status"], rows, align="lrrl")
    common.write_section("20-targets", "Issue 5 targets on this CPU", body, {"rows": rows})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, to check that everything runs")
    ap.add_argument("--only", nargs="+", choices=list(BENCHES), default=list(BENCHES))
    args = ap.parse_args(argv)
    common.send_outputs_for(args.quick)
    load = os.getloadavg()[0]
    print(f"load average before: {common.loadavg()} on {os.cpu_count()} cores", flush=True)
    if load > 0.5:
        print("warning: the machine is busy; timings will be noisy (each section records the load)", flush=True)
    t0 = time.perf_counter()
    failed = []
    for name in args.only:
        script = common.BENCH_DIR / BENCHES[name]
        if not script.exists():
            print(f"=== {name}: {script.name} not found, skipped", flush=True)
            continue
        cmd = [sys.executable, str(script)] + (["--quick"] if args.quick else [])
        print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
        t = time.perf_counter()
        rc = subprocess.call(cmd, cwd=common.BENCH_DIR.parent)
        print(f"=== {name}: exit {rc}, {time.perf_counter() - t:.0f} s", flush=True)
        if rc != 0:
            failed.append(name)
    write_targets_summary()
    common.assemble_results()
    print(f"\nwrote {common.RESULTS_MD.relative_to(common.BENCH_DIR.parent)} in {time.perf_counter() - t0:.0f} s "
          f"total; load average after: {common.loadavg()}", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
