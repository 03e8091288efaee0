#!/usr/bin/env bash
# On a GPU machine (no network needed): build goft with its CUDA kernels, run the GPU benchmark
# (twice, to show its run-to-run spread), the CUDA tests, the layout sweep of
# bench/gpu_profile.py, compute-sanitizer's synccheck, racecheck and memcheck over every kernel
# path (bench/gpu_sanitize.py) and, where ncu is installed, an Nsight Compute pass over one call of
# each fused kernel; prints short tables and writes bench/RESULTS_GPU.md. Every step runs within
# what is left of a 540 s budget (below); v9's run took about 3 minutes on an H100, before the
# sanitizer (at most 75 s a tool) and the last two ncu passes were added. The build compiles for
# this GPU's architecture only. Logs and results also go to $GPU_CHECK_OUT (default build/gpu_check).
#
#   bash bench/gpu_check.sh            # build + benchmark + tests + sweep + sanitizer + ncu
#   GOFT_SKIP_BUILD=1 bash bench/gpu_check.sh   # reuse the installed build
#   GOFT_SKIP_NCU=1 bash bench/gpu_check.sh     # without the Nsight Compute pass
#   GOFT_SKIP_SANITIZER=1 bash bench/gpu_check.sh   # without compute-sanitizer
#   GOFT_SOURCE_COMMIT=abc1234 bash ...         # a copy of the tree without .git: the commit measured
#   GOFT_CHECK_BUDGET=540 bash ...              # seconds for the whole check (default 540)
#
# Through the device tool, so that the logs come back and the commit is recorded:
#   GOFT_SOURCE_COMMIT=<commit> GPU_CHECK_OUT=$OUT bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# GPU images often have python3 and no python.
PY="${PYTHON:-$(command -v python3 || command -v python)}"
LOGS="${GPU_CHECK_OUT:-build/gpu_check}"
mkdir -p "$LOGS"
t0=$SECONDS
stamp() { echo "== [$((SECONDS - t0)) s] $*"; }
# The whole check must end inside one call of the device tool (600 s at most), even when a kernel
# hangs: every step runs under a timeout cut to what is left of GOFT_CHECK_BUDGET, less the time
# kept back for the steps after it that must run (the second benchmark run writes the results).
BUDGET="${GOFT_CHECK_BUDGET:-540}"
exec 3>&1
within() {  # within MAX_S KEEP_S command...: timeout min(MAX_S, left - KEEP_S), or skip (status 124)
  local max=$1 keep=$2 left=$((BUDGET - (SECONDS - t0)))
  shift 2
  local limit=$((left - keep < max ? left - keep : max))
  if ((limit < 20)); then
    echo "gpu_check.sh: skipped, ${left} s of the ${BUDGET} s budget left: $*" >&3
    return 124
  fi
  timeout "$limit" "$@"
}

stamp "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader || true
"$PY" - <<'EOF'
import sys, torch
print(f"{sys.executable}: torch {torch.__version__}, CUDA {torch.version.cuda}")
if not torch.cuda.is_available():
    sys.exit("gpu_check.sh: torch sees no CUDA device")
print(torch.cuda.get_device_name(0), "capability %d.%d" % torch.cuda.get_device_capability(0))
EOF

if [[ "${GOFT_SKIP_BUILD:-0}" != "1" ]]; then
  stamp "build (pip install --no-build-isolation .)"
  arch=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability(0))")
  export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$arch}"
  export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
  export CMAKE_ARGS="${CMAKE_ARGS:-} -DGOFT_CUDA=ON"
  log="$LOGS/build.log"
  if ! within 240 150 "$PY" -m pip install --no-build-isolation --no-deps -v . > "$log" 2>&1; then
    tail -n 80 "$log"
    echo "gpu_check.sh: build failed (full log: $log)"
    exit 1
  fi
  grep -E "goft: CUDA kernels|Added CUDA NVCC flags" "$log" || true
fi
"$PY" - <<'EOF'
import sys
import goft
from goft import _C
print("goft", goft.__version__, "from", goft.__file__, "| CUDA kernels:", _C.with_cuda)
if not _C.with_cuda:
    sys.exit("gpu_check.sh: goft was built without its CUDA kernels")
EOF

# The benchmark first: it is short, and a kernel that breaks the CUDA context there still leaves
# the tests (their own process) to say which case fails.
set +e
stamp "GPU benchmark, run 1 of 2 (bench/gpu_bench.py)"
within 120 150 "$PY" bench/gpu_bench.py --out "$LOGS/RESULTS_GPU.run1.md" > "$LOGS/bench.run1.log" 2>&1
bench1_rc=$?
tail -n 3 "$LOGS/bench.run1.log"

stamp "CUDA tests (tests/test_cuda.py)"
if "$PY" -c "import pytest" 2> /dev/null; then
  timeout_opt=()
  # pytest-timeout registers itself when installed; naming it with -p again is an error.
  if "$PY" -c "import pytest_timeout" 2> /dev/null; then timeout_opt=(--timeout=120); fi
  within 200 150 "$PY" -m pytest -q -rfE --maxfail=40 --durations=8 -p no:cacheprovider ${timeout_opt[@]+"${timeout_opt[@]}"} \
    tests/test_cuda.py > "$LOGS/tests.log" 2>&1
  tests_rc=$?
else
  # No pytest in the image: run the same test functions with their parameters, in one process.
  within 200 150 "$PY" bench/run_cuda_tests.py > "$LOGS/tests.log" 2>&1
  tests_rc=$?
fi
tail -n 40 "$LOGS/tests.log"

# Tuning data for bench/GPU_NOTES.md: every layout the planner can be forced to, and the kernels
# of one forward and backward (not a results file; its exit status does not count).
stamp "layout sweep (bench/gpu_profile.py, full output in $LOGS/profile.txt)"
within 120 150 "$PY" bench/gpu_profile.py > "$LOGS/profile.txt" 2>&1
grep -A 4 "staged next rows" "$LOGS/profile.txt"
grep -A 27 "layout sweep" "$LOGS/profile.txt" | head -n 56

stamp "GPU benchmark, run 2 of 2"
within 120 10 "$PY" bench/gpu_bench.py --out bench/RESULTS_GPU.md > "$LOGS/bench.run2.log" 2>&1
bench2_rc=$?
cp bench/RESULTS_GPU.md "$LOGS/" 2> /dev/null
cat "$LOGS/bench.run2.log"

# compute-sanitizer (part of the CUDA toolkit), where installed: what the CPU emulator cannot
# check, on the GPU itself: barriers and shuffles that some threads miss (synccheck),
# shared-memory hazards as the hardware orders them (racecheck), accesses out of bounds or
# misaligned (memcheck, with torch's caching allocator off so that an access past a tensor leaves
# its allocation). Every kernel path once on small shapes (bench/gpu_sanitize.py); the exit status
# does not count, the summary lines say what was found.
SANITIZER="${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)}"
if [[ -x "$SANITIZER" && "${GOFT_SKIP_SANITIZER:-0}" != "1" ]]; then
  for tool in synccheck racecheck memcheck; do
    stamp "compute-sanitizer --tool $tool (full log in $LOGS/sanitize_$tool.txt)"
    dims=(200 1000 4096 11008)
    [[ "$tool" == racecheck ]] && dims=(200 1000 4096)  # the slowest tool: no fallback-width rows
    uncached=()  # torch reads the variable's presence, whatever its value
    [[ "$tool" == memcheck ]] && uncached=(env PYTORCH_NO_CUDA_MEMORY_CACHING=1)
    within 75 10 ${uncached[@]+"${uncached[@]}"} "$SANITIZER" --tool "$tool" --error-exitcode 9 \
      --print-limit 20 "$PY" bench/gpu_sanitize.py --dims "${dims[@]}" > "$LOGS/sanitize_$tool.txt" 2>&1
    echo "compute-sanitizer --tool $tool: exit status $? (9: errors found, 124: out of time)"
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|gpu_sanitize.py:|Error|Hazard" "$LOGS/sanitize_$tool.txt" | head -n 12
  done
fi

# Where the fused kernels' time goes (forward, backward, rotate_angle_grads at the target shape):
# Nsight Compute's throughput, occupancy, scheduler and stall sections, when ncu is installed.
# Last, and its exit status does not count: the results above stand without it.
NCU="${NCU:-$(command -v ncu || echo /usr/local/cuda/bin/ncu)}"
if [[ -x "$NCU" && "${GOFT_SKIP_NCU:-0}" != "1" ]]; then
  stamp "ncu of one call of each pass (full report in $LOGS/ncu.txt)"
  within 150 10 "$NCU" --clock-control none -k regex:fused_rotate --section SpeedOfLight \
    --section Occupancy --section SchedulerStats --section WarpStateStats --section LaunchStats \
    "$PY" bench/gpu_profile.py --once > "$LOGS/ncu.txt" 2>&1
  grep -E "fused_rotate|Duration|Registers Per|Achieved Occupancy|Issued Warp Per|Eligible Warps|DRAM Throughput" \
    "$LOGS/ncu.txt" | head -n 40
  # What the warps wait on, per issued instruction (the Warp State section's breakdown), and the
  # instructions executed: a second pass, so that a metric this ncu lacks loses only this part.
  stamp "ncu stall reasons (full report in $LOGS/ncu_stalls.txt)"
  within 150 10 "$NCU" --clock-control none -k regex:fused_rotate --metrics \
    'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,smsp__inst_executed.sum' \
    "$PY" bench/gpu_profile.py --once > "$LOGS/ncu_stalls.txt" 2>&1
  grep -E "fused_rotate|inst_executed|stalled_(long_scoreboard|short_scoreboard|barrier|mio_throttle|wait|lg_throttle|not_selected|math|branch|no_instruction|dispatch)" \
    "$LOGS/ncu_stalls.txt" | sed -E 's/smsp__average_warps_issue_stalled_//; s/_per_issue_active.ratio//' | head -n 45
  # Memory traffic per pass: DRAM bytes against the tensors' size, and the L2 sectors read, which
  # also count the warps' own fetches of the warp layers' inputs (v10's lead values).
  stamp "ncu memory traffic (full report in $LOGS/ncu_traffic.txt)"
  within 120 10 "$NCU" --clock-control none -k regex:fused_rotate --metrics \
    'dram__bytes_read.sum,dram__bytes_write.sum,lts__t_sectors_op_read.sum,lts__t_sectors_op_write.sum' \
    "$PY" bench/gpu_profile.py --once > "$LOGS/ncu_traffic.txt" 2>&1
  grep -E "fused_rotate|dram__bytes|lts__t_sectors" "$LOGS/ncu_traffic.txt" | head -n 30
  # On-chip traffic per pass: local memory (the strict kernels' register spills, v11) and
  # shared-memory wavefronts and bank conflicts (block loads, exchanges, accumulators).
  stamp "ncu local and shared memory (full report in $LOGS/ncu_onchip.txt)"
  within 90 10 "$NCU" --clock-control none -k regex:fused_rotate --metrics \
    'l1tex__t_sectors_pipe_lsu_mem_local_op_ld.sum,l1tex__t_sectors_pipe_lsu_mem_local_op_st.sum,l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum,l1tex__data_pipe_lsu_wavefronts_mem_shared_op_st.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum' \
    "$PY" bench/gpu_profile.py --once > "$LOGS/ncu_onchip.txt" 2>&1
  grep -E "fused_rotate|l1tex__" "$LOGS/ncu_onchip.txt" | head -n 40
fi
set -e

stamp "done: benchmark exit status ${bench1_rc}, ${bench2_rc}; tests exit status ${tests_rc}"
[[ "$bench1_rc" == 0 && "$bench2_rc" == 0 ]] || exit 1
exit "$tests_rc"
