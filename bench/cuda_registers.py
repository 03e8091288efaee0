"""Registers and spills of goft's CUDA kernels, as ptxas reports them; no GPU needed.

Compiles each kernel source (cpp/cuda/*.cu, torch-free) with nvcc -Xptxas -v for one GPU
architecture and writes a section of bench/RESULTS.md: per fused kernel variant (element type,
chunks per thread, forward or backward, transposed or not) the registers per thread, the bytes of
spill stores and loads, and the stack frame. The fused kernels hold a row in registers, so a
variant that spills moves part of its row through local memory on every layer: these are the
variants to time against the fallback kernels on a GPU (bench/gpu_bench.py does).

    python bench/cuda_registers.py [--arch 90] [--quick]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time

import common

SOURCES = ["float", "double", "bfloat16", "half"]  # cpp/cuda/rotate_<name>.cu
# The flags of the extension's CUDA build (CMakeLists.txt), at full optimisation.
NVCC_FLAGS = ["-std=c++17", "-O3", "--expt-relaxed-constexpr", "--expt-extended-lambda", "-Xptxas", "-v"]
ENTRY = re.compile(r"Compiling entry function '(\w+)' for 'sm_(\d+)'")
STATS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
REGS = re.compile(r"Used (\d+) registers")
# Demangled fused kernels:
# goft::cuda::fused_rotate[_backward]_kernel<goft::cuda::FusedTraits<T, chunks, bwd, rows, strict>, transposed,
# on_chip>
FUSED = re.compile(r"(fused_rotate(?:_backward)?_kernel)<goft::cuda::FusedTraits<(\w+), (\d), (?:true|false), (\d), "
                   r"(true|false)>, (true|false), (true|false)>")
ELEMENT_BYTES = {"float": 4, "double": 8, "__nv_bfloat16": 2, "__half": 2}
TYPE_NAMES = {"float": "float32", "double": "float64", "__nv_bfloat16": "bfloat16", "__half": "float16"}


def ptxas_report(source: str, arch: str, workdir: str) -> str:
    cmd = ["nvcc", *NVCC_FLAGS, f"-arch=sm_{arch}", "-I", str(common.BENCH_DIR.parent / "cpp" / "include"),
           "-c", str(common.BENCH_DIR.parent / "cpp" / "cuda" / f"rotate_{source}.cu"), "-o", f"{workdir}/{source}.o"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"cuda_registers.py: nvcc failed on rotate_{source}.cu:\n{done.stderr[-3000:]}")
    return done.stdout + done.stderr


def demangle(names: list[str]) -> list[str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if tool is None:
        sys.exit("cuda_registers.py: needs c++filt (binutils) or cu++filt (CUDA) to read kernel names")
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def parse(report: str) -> list[dict]:
    """One record per fused kernel entry in ptxas's report."""
    entries = []
    for block in re.split(r"(?=ptxas info\s*: Compiling entry function)", report):
        entry = ENTRY.search(block)
        stats, regs = STATS.search(block), REGS.search(block)
        if entry and stats and regs:
            entries.append((entry.group(1), int(regs.group(1)), *map(int, stats.groups())))
    records = []
    for (mangled, regs, stack, spill_st, spill_ld), name in zip(entries, demangle([e[0] for e in entries])):
        m = FUSED.search(name)
        if m is None:
            continue  # staging, reduction and fallback kernels: they hold no row in registers
        kernel, element, chunks, rows, strict, transposed, on_chip = m.groups()
        elts = 16 // ELEMENT_BYTES[element]
        pass_ = ("backward strict" if strict == "true" else "backward") if "backward" in kernel else "forward"
        records.append(dict(dtype=TYPE_NAMES[element], pass_=pass_,
                            chunks=int(chunks), rows=int(rows), transposed=transposed == "true",
                            on_chip=on_chip == "true", features=int(rows) * int(chunks) * elts, registers=regs, spill_stores=spill_st,
                            spill_loads=spill_ld, stack=stack))
    return records


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="90", help="compute capability without the dot (default 90: H100/H200)")
    ap.add_argument("--quick", action="store_true", help="bfloat16 only")
    args = ap.parse_args(argv)
    common.send_outputs_for(args.quick)
    if shutil.which("nvcc") is None:
        print("cuda_registers.py: nvcc not found; section skipped")
        return 0
    t0 = time.perf_counter()
    records = []
    with tempfile.TemporaryDirectory() as workdir:
        for source in ["bfloat16"] if args.quick else SOURCES:
            records += parse(ptxas_report(source, args.arch, workdir))
    if not records:
        sys.exit("cuda_registers.py: found no fused kernels in ptxas's report (did the kernel names change?)")
    passes = ["forward", "backward", "backward strict"]
    records.sort(key=lambda r: (r["dtype"], passes.index(r["pass_"]), r["chunks"], r["rows"], r["transposed"],
                                not r["on_chip"]))
    nvcc_version = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    rows = [[r["dtype"], r["pass_"], r["chunks"], r["rows"], "yes" if r["transposed"] else "no",
             "shared" if r["on_chip"] else "global", r["features"], r["registers"],
             r["spill_stores"], r["spill_loads"], r["stack"]] for r in records]
    spilling = [r for r in records if r["spill_stores"] + r["spill_loads"] > 0]
    worst = max(records, key=lambda r: r["spill_stores"] + r["spill_loads"])
    body = (
        f"`python bench/cuda_registers.py --arch {args.arch}` at commit {common.source_commit()}, "
        f"{common.machine_info()['date']}: nvcc "
        f"{' '.join(NVCC_FLAGS)} -arch=sm_{args.arch} ({nvcc_version}), {time.perf_counter() - t0:.0f} s. Static resource use from ptxas, not a GPU "
        "measurement. Forward kernels are bounded to 64 registers per thread (1024-thread blocks), "
        "backward ones to 128 (512 threads). `backward strict` kernels run for angle parameters: they rebuild "
        "each layer's input from its output instead of keeping it (FusedTraits::kStrict); those whose "
        "thread holds at most 32 bytes of the row in the accumulation type (one bf16/fp16 chunk, up to two "
        "float32 or float64 ones) are "
        "bounded to 64 registers, for two 512-thread blocks per SM. "
        "`features` is the row slice a thread holds: chunks x "
        "16-byte vectors for each of the `rows` a thread group transforms together; plan.h picks the "
        "variant per row width at run time. `store` is where the "
        "kernel variant keeps the blocks (and backward's gradient accumulators): shared memory, or "
        "global memory for rows whose store does not fit on chip.\n\n"
        + common.md_table(["dtype", "pass", "chunks", "rows", "transposed", "store", "features / thread",
                           "registers", "spill stores, B", "spill loads, B", "stack, B"], rows,
                          align="llrrllrrrrr")
        + f"\n{len(spilling)} of {len(records)} variants spill; the most: {worst['dtype']} {worst['pass_']}, "
        f"{worst['chunks']} chunks, {worst['rows']} row(s), {'shared' if worst['on_chip'] else 'global'} store ({worst['spill_stores']} B stored, {worst['spill_loads']} B loaded per "
        "thread). Whether a spilling variant still beats the fallback kernel for its widths is for a GPU "
        "to say: bench/gpu_bench.py times both (bench/RESULTS_GPU.md).\n"
    )
    common.write_section("70-cuda-registers", f"CUDA kernels' registers and spills (sm_{args.arch}, ptxas)", body,
                         {"arch": args.arch, "records": records})
    print(common.md_table(["dtype", "pass", "chunks", "rows", "transposed", "store", "features", "regs", "spill st",
                           "spill ld", "stack"], rows, align="llrrllrrrrr"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
