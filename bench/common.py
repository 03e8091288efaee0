"""Shared helpers of the Python benchmarks: interleaved timing, memory probes, machine facts, results files.

Each benchmark script writes its own section, bench/results/<NN>-<name>.md (plus a .json of the raw
numbers), and ``assemble_results`` rebuilds bench/RESULTS.md from every section file present, in
file-name order. A section written by another tool (the C++ bench binary, op targets) only has to
drop its own NN-name.md there; no script rewrites a section it does not own.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import gc
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

BENCH_DIR = pathlib.Path(__file__).resolve().parent
# Where results go: bench/ (the files the README quotes), or for a --quick run (small sizes, to
# check that a script runs) build/bench-quick/, so that a check never replaces them.
OUTPUT_DIR = BENCH_DIR
RESULTS_DIR = BENCH_DIR / "results"
RESULTS_MD = BENCH_DIR / "RESULTS.md"
QUICK_OUTPUT_DIR = BENCH_DIR.parent / "build" / "bench-quick"


def send_outputs_for(quick: bool) -> None:
    """Points output_path, write_section and assemble_results at QUICK_OUTPUT_DIR for a quick run."""
    global OUTPUT_DIR, RESULTS_DIR, RESULTS_MD
    if quick:
        OUTPUT_DIR = QUICK_OUTPUT_DIR
        RESULTS_DIR = OUTPUT_DIR / "results"
        RESULTS_MD = OUTPUT_DIR / "RESULTS.md"
        print(f"--quick: results go to {OUTPUT_DIR}, not bench/", flush=True)


def output_path(name: str) -> pathlib.Path:
    """Where a benchmark writes a file of its own (a plot) beside RESULTS.md."""
    OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    return OUTPUT_DIR / name

GB = 1e9
MiB = 2**20


# ---------------------------------------------------------------------------------------------
# baselines

# What PEFT's BOFT may leave changed in os.environ (peft_adapted).
COMPILER_VARIABLES = ("CC", "CXX")


def peft_adapted(model: torch.nn.Module, config) -> torch.nn.Module:
    """``model`` with PEFT's adapter of ``config`` added: the adapted model itself, not the
    PeftModel wrapper (which only forwards to it), with PEFT's warnings silenced.

    CC and CXX are restored afterwards: PEFT's BOFT sets both to gcc while it tries to build its
    CUDA extension and leaves them set when the build fails (no CUDA), and every process started
    later would inherit them; torch.compile's C++ kernels, linked by gcc, then fail to load (an
    undefined libstdc++ symbol).
    """
    import warnings

    from peft import get_peft_model

    with restored_environment(COMPILER_VARIABLES), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(model, config).get_base_model()


@contextlib.contextmanager
def restored_environment(names):
    """Gives the environment variables ``names`` back their values (or absence) when the block ends."""
    saved = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# ---------------------------------------------------------------------------------------------
# machine


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def loadavg() -> str:
    try:
        return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        return "n/a"


def memory_gib() -> str:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 2**20:.0f}"
    except OSError:
        pass
    return "n/a"


def vector_width() -> str:
    """The SIMD extension goft's CPU kernels run with here (they are built for three)."""
    try:
        import goft._C

        return {64: "AVX-512", 32: "AVX2", 16: "SSE"}.get(goft._C.cpu_lane_bytes(), "unknown")
    except (ImportError, AttributeError):
        return "unknown"


def source_commit() -> str:
    """The checkout's commit, with "+changes" when tracked files differ from it: the code measured.

    GOFT_SOURCE_COMMIT overrides it, for a copy of the tree without its git folder (what a GPU
    machine may get).
    """
    if os.environ.get("GOFT_SOURCE_COMMIT"):
        return os.environ["GOFT_SOURCE_COMMIT"]

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=BENCH_DIR, capture_output=True, text=True, check=True).stdout

    try:
        commit = git("rev-parse", "--short=10", "HEAD").strip()
        # The benchmarks' own outputs (written by the sections run before this one) are not code.
        outputs = [f":(top,exclude){p}" for p in ("bench/results", "bench/RESULTS*.md", "bench/*.png")]
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ":(top)", *outputs).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return commit + ("+changes" if changed else "")


def installed_goft_differs() -> List[str]:
    """The files of python/goft that the goft imported here does not hold as they are in this
    checkout (an install older than the code): a run would then not be of the commit it records."""
    try:
        import goft
    except ImportError:
        return ["all (goft is not importable)"]
    installed = pathlib.Path(goft.__file__).resolve().parent
    source = BENCH_DIR.parent / "python" / "goft"
    return [p.name for p in sorted(source.glob("*.py"))
            if not (installed / p.name).is_file() or (installed / p.name).read_bytes() != p.read_bytes()]


def machine_info() -> Dict[str, str]:
    import importlib.metadata as md

    def version(pkg: str) -> str:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "not installed"

    stale = installed_goft_differs()
    return {
        "commit": source_commit(),
        # Whether the goft that ran is this checkout's Python (its C++ build is not compared).
        "goft_install": f"differs from the checkout in {', '.join(stale)}" if stale else "the checkout's",
        "cpu": cpu_model(),
        "vector": vector_width(),
        "memory_gib": memory_gib(),
        "cores": str(os.cpu_count()),
        "torch": torch.__version__,
        "threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
        "transformers": version("transformers"),
        "peft": version("peft"),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load": loadavg(),
    }


def command_line(script: str, argv: Optional[List[str]]) -> str:
    """How a benchmark was run, with its options, as a section records it."""
    import shlex

    args = sys.argv[1:] if argv is None else list(argv)
    return shlex.join(["python", f"bench/{pathlib.Path(script).name}", *args])


def run_header(info: Dict[str, str], load_after: str, wall_s: float, command: str) -> str:
    """The lines each section starts with: how, where and when its numbers were taken."""
    # .get: sections written before the commit, vector width and memory were recorded.
    return (
        f"`{command}` at commit {info.get('commit', 'unrecorded')} on {info['cpu']} "
        f"({info.get('vector', '?')}), {info['cores']} cores, {info.get('memory_gib', '?')} GiB, "
        f"{info['threads']} torch threads, torch {info['torch']}, {info['date']}; load average "
        f"(1/5/15 min) {info['load']} before, {load_after} after; {wall_s:.0f} s.\n"
    )


# ---------------------------------------------------------------------------------------------
# timing


def time_interleaved(
    fns: Dict[str, Callable[[], object]],
    repeats: int,
    budget_s: float = 4.0,
    slow_s: float = 3.0,
    warmup: int = 3,
) -> Dict[str, List[float]]:
    """Wall times (s) of each callable, run in interleaved rounds so drifts in machine load hit all alike.

    Every callable first runs untimed (allocator, caches, lazy init), ``warmup`` times if that run
    took under a second: the heap takes a few steps to settle, e.g. an adapted nn.Linear(768) took
    page faults on 17-30k fresh pages (+15-35% time) in each of its first 6 steps and on none in
    most steps after; slower callables run once (their page faults weigh little, and warm-up
    time would dominate the benchmark). A callable whose warm-up took more than ``slow_s`` gets one
    timed run after it (more would not fit the time budget; the first, cold run is never a sample).
    The others get ``min(repeats, budget_s / warm-up time)`` samples, at least 3, one per round;
    each round starts at a different callable, and sample i of every callable comes from round i.
    """
    names = list(fns)
    wanted: Dict[str, int] = {}
    samples: Dict[str, List[float]] = {n: [] for n in names}
    for n in names:
        gc.collect()
        t0 = time.perf_counter()
        fns[n]()
        t = time.perf_counter() - t0
        if t < 1.0:
            for _ in range(warmup - 1):
                fns[n]()
        if t > slow_s:
            wanted[n] = 1
        else:
            fit = budget_s / max(t, 1e-6)
            wanted[n] = max(min(3, repeats), repeats if fit >= repeats else int(fit))
    rounds = max(wanted.values()) if wanted else 0
    for r in range(rounds):
        gc.collect()
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            if len(samples[n]) >= wanted[n]:
                continue
            t0 = time.perf_counter()
            fns[n]()
            samples[n].append(time.perf_counter() - t0)
    return samples


def median(xs: List[float]) -> float:
    return statistics.median(xs)


def ratio_in_shared_rounds(samples: List[float], reference: List[float]) -> float:
    """The median of ``samples`` over the median of ``reference``, both over the rounds both were
    timed in (sample i of each comes from round i). A slow callable gets fewer rounds than its
    reference; dividing by the reference's median over all its rounds would set them against
    other rounds' load, and could put the ratio outside the rounds' own range."""
    shared = min(len(samples), len(reference))
    return median(samples[:shared]) / median(reference[:shared])


def round_ratios(samples: List[float], reference: List[float]) -> List[float]:
    """The ratio of ``samples`` to ``reference`` in each round both were timed in (time_interleaved
    times every callable once per round, so sample i of each came from the same round)."""
    return [a / b for a, b in zip(samples, reference)]


def fmt_range(ratios: List[float]) -> str:
    """The lowest and highest of the rounds' ratios: how far one round can stray from the median."""
    return f"{min(ratios):.3f}-{max(ratios):.3f}" if ratios else "n/a"


def counting_faults(fn: Callable[[], object]):
    """fn wrapped to append each call's minor page faults to a list; returns (wrapped, list)."""
    import resource

    counts: List[int] = []

    def wrapped():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        out = fn()
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        return out

    return wrapped, counts


def fault_summary(counts: List[int], timed: int) -> Dict[str, float]:
    """Median minor faults of the last ``timed`` calls (the timed ones; warm-ups come first), and
    how many of them faulted on 1000 pages (4 MiB) or more."""
    last = counts[-timed:]
    return {"faults_median": median(last), "faulting_steps": sum(1 for f in last if f >= 1000)}


def fmt_faults(record: Dict[str, float]) -> str:
    return f"{record['faults_median']:,.0f} ({record['faulting_steps']}/{record['n']})"


# ---------------------------------------------------------------------------------------------
# memory


def saved_for_backward(fn: Callable[[], object], exclude: Optional[List[torch.Tensor]] = None) -> Dict[str, int]:
    """Bytes that autograd saves for backward while ``fn`` runs its forward: unique storages.

    Returns {"total": all unique storages, "activations": those not shared with ``exclude``
    (the module's parameters and buffers), "count": number of unique storages}. ``fn`` must
    return the graph's output (kept alive until the probe is done, then dropped).
    """
    seen: Dict[int, int] = {}

    def pack(t: torch.Tensor):
        # A sparse COO tensor (as the dense baseline's layer matrices) has no storage of its own.
        for part in (t._indices(), t._values()) if t.is_sparse else (t,):
            s = part.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    excluded = {p.untyped_storage().data_ptr() for p in (exclude or [])}
    total = sum(seen.values())
    activations = sum(b for ptr, b in seen.items() if ptr not in excluded)
    return {"total": total, "activations": activations, "count": len(seen)}


def _libc():
    try:
        lib = ctypes.CDLL("libc.so.6")
        lib.mallopt  # noqa: B018  (glibc only)
        return lib
    except (OSError, AttributeError):
        return None


# glibc's mallopt parameter number and the ceiling its dynamic mmap threshold grows to (64-bit).
M_MMAP_THRESHOLD = -3
GLIBC_MMAP_THRESHOLD_MAX = 32 * MiB


def peak_rss_growth(fn: Callable[[], object]) -> Optional[int]:
    """Bytes by which the process's peak RSS rises above its RSS at the start while ``fn`` runs.

    None where the peak cannot be reset (not Linux). glibc serves allocations below its mmap
    threshold (up to 32 MiB) from heap memory that stays resident after free, which hides a
    repeated step's footprint; so during the probe every allocation of 64 KiB or more is mmap-ed
    (mallopt), free heap memory is trimmed first, and the threshold is set back to 32 MiB after.
    Setting it at all ends glibc's adaptive thresholds for the rest of the process, so time
    nothing after a probe: layer_bench and train_bench probe once every timing is done.
    """
    from goft.finetune import PeakRSS  # the same measurement as goft finetune's memory column

    libc = _libc()
    gc.collect()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)
        libc.malloc_trim(0)
    try:
        with PeakRSS() as memory:
            out = fn()
        del out
    finally:
        if libc is not None:
            libc.mallopt(M_MMAP_THRESHOLD, GLIBC_MMAP_THRESHOLD_MAX)
    return memory.growth if memory.exact else None


# ---------------------------------------------------------------------------------------------
# results files


def fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "n/a"
    if abs(n) >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    if abs(n) < 2**20:
        return f"{n / 1024:.1f} KiB"
    return f"{n / MiB:.1f} MiB"


def md_table(header: List[str], rows: List[List[str]], align: Optional[str] = None) -> str:
    """A Markdown table; align is one char per column ('l' or 'r'), right-aligned by default."""
    align = align or "l" + "r" * (len(header) - 1)
    sep = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_section(stem: str, title: str, body: str, data: dict) -> pathlib.Path:
    """Writes bench/results/<stem>.md (## title + body) and <stem>.json, then rebuilds RESULTS.md."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    md = RESULTS_DIR / f"{stem}.md"
    md.write_text(f"## {title}\n\n{body.rstrip()}\n")
    (RESULTS_DIR / f"{stem}.json").write_text(json.dumps(data, indent=1, sort_keys=True, default=str) + "\n")
    assemble_results()
    return md


def assemble_results() -> pathlib.Path:
    """bench/RESULTS.md = a short preface + every bench/results/*.md, in file-name order."""
    sections = sorted(RESULTS_DIR.glob("*.md")) if RESULTS_DIR.is_dir() else []
    parts = [
        "# goft benchmark results\n",
        "Generated by `python bench/run_all.py` from the section files in `bench/results/` "
        "(each benchmark writes its own `NN-name.md`; this page is their concatenation in file-name "
        "order). Do not edit by hand: rerun the benchmark that owns a section. Each section names "
        "the machine, date, torch version, thread count and machine load of its own run.\n",
    ]
    for path in sections:
        parts.append(path.read_text().rstrip() + "\n")
    RESULTS_MD.write_text("\n".join(parts))
    return RESULTS_MD
