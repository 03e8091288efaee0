"""Runs the quick start's demo command once and records what it reported, with the machine.

    python bench/demo_quickstart.py [--out bench/results/demo_quickstart.json]

Runs `python -m goft demo --no-progress` (the README's first command, writing into a temporary
folder instead of runs/demo) in a fresh process, times the whole command from the outside, and
writes the demo's own metrics.json together with the command, its wall-clock time, the commit and
the machine (bench/common.py's machine_info) to the results file the README quotes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(common.RESULTS_DIR / "demo_quickstart.json"))
    args = parser.parse_args()
    stale = common.installed_goft_differs()
    if stale:
        sys.exit(f"demo_quickstart.py: the installed goft differs from this checkout in {stale}; reinstall it "
                 "(python -m pip install --no-build-isolation --no-deps .) so that the run is of this commit")
    machine = common.machine_info()
    del machine["threads"]  # this process's; the demo's own are in metrics["result"]["threads"]
    with tempfile.TemporaryDirectory(prefix="goft-demo-") as folder:
        command = [sys.executable, "-m", "goft", "demo", "--no-progress", "--output-dir", folder]
        started = time.perf_counter()
        finished = subprocess.run(command, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        print(finished.stdout, end="")
        if finished.returncode != 0:
            print(finished.stderr, file=sys.stderr)
            sys.exit(f"demo_quickstart.py: the demo failed (exit status {finished.returncode})")
        metrics = json.loads((Path(folder) / "metrics.json").read_text())
    # The demo's own line with its time from loading the model to the end, as printed.
    report = [line for line in finished.stdout.splitlines() if line.startswith("time ")]
    metrics["run"] = {
        "command": "python -m goft demo --no-progress --output-dir <temporary folder>",
        "command_seconds": round(seconds, 1),
        "demo_time_line": report[-1].strip() if report else None,
        "written_by": "python bench/demo_quickstart.py",
        **machine,
    }
    Path(args.out).write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"written to {args.out} (the whole command: {seconds:.1f} s)")


if __name__ == "__main__":
    main()
