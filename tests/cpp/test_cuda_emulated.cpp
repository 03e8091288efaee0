// Runs the bodies of goft's CUDA kernels (goft/cuda/row_kernels.h) on the host, one std::thread
// per GPU thread with real barriers and emulated warp shuffles, and compares them with the CPU
// kernels (goft/cpu/rotate.h). It checks the index logic of every launch layout (chunk counts,
// row groups, shared or global placement, vector or scalar rows) without a GPU.
//
// Forward outputs and grad_x must match the CPU kernels bitwise (same operations in the same
// order per row); parameter gradients are summed in a different order and compared with a
// tolerance. Problems with angles also run the strict backward kernels (FusedTraits::kStrict),
// whose angle gradients are compared with the CPU's block gradients mapped to angles (blocks.h).
// Exit status 0 when every case passes.
//
// Built with ThreadSanitizer (goft_cuda_emulated_tsan), it also checks the kernels' ordering
// under a GPU's weaker guarantees, where a wrong result alone would not show a race: the blocks
// of a launch run at once (races on global memory between blocks), and warp shuffles exchange
// values without ordering memory (__shfl_sync is not documented to), so a shared-memory hand-off
// between lanes must be ordered by a barrier. cp.async copies land only at their wait in both
// builds (async_copy16).
//
//   goft_cuda_emulated [--quick] [--list] [--filter=TERM[|TERM...]]
//   goft_cuda_emulated --race-canary=shuffle|barriers|blocks
//
// --filter runs only the kernel cases whose name matches one of the terms, a term being one
// substring or several joined by '&' that must all occur (the planner and slot checks always
// run); a filter that matches no kernel case is an error (exit 2). --race-canary runs a kernel
// with a known race (race_canary). --list prints the names of the kernel cases it would run.
#include <algorithm>
#include <atomic>
#include <barrier>
#include <csignal>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <sys/mman.h>
#include <unistd.h>

#include "goft/blocks.h"
#include "goft/cpu/rotate.h"
#include "goft/cuda/plan.h"
#include "goft/cuda/row_kernels.h"
#include "goft/params.h"
#include "goft/schedule.h"

namespace {

using goft::AngleParameterisation;
using goft::PairSchedule;
using namespace goft::cuda;

// ---------------------------------------------------------------------------------------------
// The emulated GPU.

#if defined(__SANITIZE_THREAD__)
#define GOFT_EMULATOR_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define GOFT_EMULATOR_TSAN 1
#endif
#endif

#if defined(GOFT_EMULATOR_TSAN)
#include <sanitizer/tsan_interface.h>  // __tsan_acquire, __tsan_release
// ThreadSanitizer's annotations (exported by libtsan): between IgnoreSync begin and end, the
// synchronisation a thread performs creates no happens-before edge; the ignored reads and writes
// are those of the barrier's own bookkeeping.
extern "C" void AnnotateIgnoreSyncBegin(const char* file, int line);
extern "C" void AnnotateIgnoreSyncEnd(const char* file, int line);
extern "C" void AnnotateIgnoreReadsBegin(const char* file, int line);
extern "C" void AnnotateIgnoreReadsEnd(const char* file, int line);
extern "C" void AnnotateIgnoreWritesBegin(const char* file, int line);
extern "C" void AnnotateIgnoreWritesEnd(const char* file, int line);
// The blocks of a launch run at once, as on a GPU.
constexpr bool kConcurrentBlocks = true;
#else
// One block after another: no race between blocks can show without ThreadSanitizer, and a
// launch's threads at once would only add to the switching.
constexpr bool kConcurrentBlocks = false;
#endif

struct BlockShared {
  explicit BlockShared(int threads) : cta(threads), slots(threads) {
    for (int w = 0; w < threads / 32; ++w) warps.push_back(std::make_unique<std::barrier<>>(32));
  }
  std::barrier<> cta;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<double> slots;  // one shuffle value per thread (float and double are exact)
  // Under ThreadSanitizer, the addresses a block barrier releases and acquires (EmuThreads::sync),
  // alternating: a thread can be one barrier ahead of another, never two.
  char barrier_marks[2] = {};
};

// Waits at `barrier` so that ThreadSanitizer sees no ordering from it: libstdc++'s std::barrier
// waits on process-wide state shared by all barriers, through which it would otherwise see
// unrelated blocks (or warps) ordering each other and miss their races.
inline void wait_unordered(std::barrier<>& barrier) {
#if defined(GOFT_EMULATOR_TSAN)
  AnnotateIgnoreSyncBegin(__FILE__, __LINE__);
  AnnotateIgnoreReadsBegin(__FILE__, __LINE__);
  AnnotateIgnoreWritesBegin(__FILE__, __LINE__);
  barrier.arrive_and_wait();
  AnnotateIgnoreWritesEnd(__FILE__, __LINE__);
  AnnotateIgnoreReadsEnd(__FILE__, __LINE__);
  AnnotateIgnoreSyncEnd(__FILE__, __LINE__);
#else
  barrier.arrive_and_wait();
#endif
}

struct EmuThreads {
  int tid;
  int threads;
  int64_t block;
  int64_t blocks;
  BlockShared* shared;
  mutable int64_t barriers_passed = 0;
  int thread() const { return tid; }
  int num_threads() const { return threads; }
  int64_t cta() const { return block; }
  int64_t num_ctas() const { return blocks; }
  // __syncthreads: orders the block's memory accesses before it with those after it, in this
  // block only (under ThreadSanitizer every thread releases before and acquires after it).
  void sync() const {
#if defined(GOFT_EMULATOR_TSAN)
    char* mark = &shared->barrier_marks[barriers_passed++ & 1];
    __tsan_release(mark);
    wait_unordered(shared->cta);
    __tsan_acquire(mark);
#else
    shared->cta.arrive_and_wait();
#endif
  }
  template <typename V>
  V shfl_xor(V v, int mask) const {
    return shfl(v, (tid % 32) ^ mask);
  }
  // The lanes meet twice at the warp's barrier: after all have put their value out, and after all
  // have read theirs, before a slot is written again. The slots are relaxed atomics, so that under
  // ThreadSanitizer, where the meetings order nothing, exchanging values is no race either.
  template <typename V>
  V shfl(V v, int src_lane) const {
    const int warp = tid / 32;
    std::atomic_ref<double>(shared->slots[tid]).store(static_cast<double>(v),
                                                      std::memory_order_relaxed);
    warp_meet(warp);
    const double r = std::atomic_ref<double>(shared->slots[warp * 32 + src_lane])
                         .load(std::memory_order_relaxed);
    warp_meet(warp);
    return static_cast<V>(r);
  }

 private:
  // The lanes of a warp wait for each other, without ordering memory.
  void warp_meet(int warp) const { wait_unordered(*shared->warps[warp]); }
};

// One block's state: its barriers and shuffle slots, and its shared memory, filled with NaN so
// that a read before a write shows up in the results. Past the smem_bytes the launch gives (the
// planner's size), a guard band that must stay untouched: a kernel whose own layout outgrew the
// planner's would write there.
template <typename Acc>
struct EmuBlock {
  EmuBlock(int threads, int64_t smem_bytes)
      : shared(threads),
        given(static_cast<size_t>(smem_bytes / sizeof(Acc))),
        smem(given + 64, std::numeric_limits<Acc>::quiet_NaN()) {}
  bool guard_intact() const {
    const Acc nan = std::numeric_limits<Acc>::quiet_NaN();
    for (size_t i = given; i < smem.size(); ++i) {
      if (std::memcmp(&smem[i], &nan, sizeof(Acc)) != 0) return false;
    }
    return true;
  }
  BlockShared shared;
  size_t given;
  std::vector<Acc> smem;
};

// Runs body(threads, smem) for every thread of every block: blocks at once under
// ThreadSanitizer (kConcurrentBlocks), else one after another.
template <typename Acc, typename Body>
void launch(int grid, int threads, int64_t smem_bytes, Body body) {
  if (threads % 32 != 0) {
    std::fprintf(stderr, "emulator: block of %d threads is not whole warps\n", threads);
    std::exit(2);
  }
  const int at_once = kConcurrentBlocks ? grid : 1;
  for (int first = 0; first < grid; first += at_once) {
    const int count = std::min(at_once, grid - first);
    std::vector<std::unique_ptr<EmuBlock<Acc>>> blocks;
    std::vector<std::thread> pool;
    pool.reserve(static_cast<size_t>(count) * threads);
    for (int i = 0; i < count; ++i) {
      blocks.push_back(std::make_unique<EmuBlock<Acc>>(threads, smem_bytes));
      EmuBlock<Acc>* block = blocks.back().get();
      for (int t = 0; t < threads; ++t) {
        pool.emplace_back([&body, block, t, threads, b = first + i, grid] {
          EmuThreads th{t, threads, b, grid, &block->shared};
          body(th, block->smem.data());
        });
      }
    }
    for (auto& th : pool) th.join();
    for (int i = 0; i < count; ++i) {
      if (!blocks[i]->guard_intact()) {
        std::fprintf(stderr, "emulator: block %d wrote shared memory past the %lld bytes given\n",
                     first + i, static_cast<long long>(smem_bytes));
        std::exit(3);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Test problems.

template <typename T>
struct Problem {
  using Acc = typename AccOf<T>::type;
  int64_t rows = 0, dim = 0, stride = 0;
  bool transpose = false, with_scale = false, strict = false;
  std::vector<T> x, grad_out;   // rows * stride
  std::vector<Acc> blocks;      // (d - 1, 4), natural form
  std::vector<double> angles;   // (d - 1,) when strict: blocks = angle_to_block(angle_of(...))
  AngleParameterisation angle_map = AngleParameterisation::kRaw;  // strict problems only
  std::vector<Acc> scale;       // (d,)
};

template <typename T>
T from_double(double v) {
  return FromAcc<T>::convert(static_cast<typename AccOf<T>::type>(v));
}

template <typename T>
Problem<T> make_problem(int64_t rows, int64_t dim, int64_t stride, bool transpose, bool scale,
                        bool strict, unsigned seed) {
  Problem<T> p;
  p.rows = rows;
  p.dim = dim;
  p.stride = stride;
  p.transpose = transpose;
  p.with_scale = scale;
  p.strict = strict;
  // Strict problems alternate between the two parameterisations (stage_slot, angle_param_grad).
  if (strict && (seed / 2) % 2 == 1) p.angle_map = AngleParameterisation::kPiTanh;
  std::mt19937 gen(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  p.x.assign(rows * stride, from_double<T>(0));
  p.grad_out.assign(rows * stride, from_double<T>(0));
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < dim; ++i) {
      p.x[r * stride + i] = from_double<T>(normal(gen));
      p.grad_out[r * stride + i] = from_double<T>(normal(gen));
    }
  }
  const int64_t pairs = dim > 0 ? dim - 1 : 0;
  p.blocks.resize(4 * pairs);
  for (int64_t k = 0; k < pairs; ++k) {
    if (strict) {
      p.angles.push_back(normal(gen));
      goft::angle_to_block(goft::angle_of(p.angles.back(), p.angle_map), p.blocks.data() + 4 * k);
    } else {
      for (int i = 0; i < 4; ++i) p.blocks[4 * k + i] = (i == 0 || i == 3 ? 1.0 : 0.0) + 0.3 * normal(gen);
    }
  }
  p.scale.resize(dim);
  for (auto& s : p.scale) s = 1.0 + 0.2 * normal(gen);
  return p;
}

template <typename T>
struct Results {
  using Acc = typename AccOf<T>::type;
  std::vector<T> out;             // forward output (rows * stride), or grad_x
  std::vector<Acc> block_grads;   // (d - 1, 4) summed (quasi kernels)
  std::vector<double> angle_grads;  // (d - 1,) (strict kernels; from block_grads for the CPU)
  std::vector<Acc> scale_grads;   // (d,)
  std::string overrun;            // set when a kernel wrote outside the rows or its buffers
};

// Buffers the emulated kernels write get NaN past their end (kGuard elements) and, for rows,
// in the padding between rows; all of it must be untouched after the launch.
constexpr size_t kGuard = 64;

template <typename V>
bool holds_fill(const std::vector<V>& v, size_t from, size_t to, const V& fill) {
  for (size_t i = from; i < to && i < v.size(); ++i) {
    if (std::memcmp(&v[i], &fill, sizeof(V)) != 0) return false;
  }
  return true;
}

// Where a launch wrote outside what it owns: row padding, past the rows, past a buffer.
template <typename T, typename Acc>
std::string find_overrun(const Problem<T>& p, const std::vector<T>& out,
                         const std::vector<std::pair<const char*, const std::vector<Acc>*>>& bufs,
                         const std::vector<size_t>& used) {
  const T fill_t = from_double<T>(std::nan(""));
  for (int64_t r = 0; r < p.rows; ++r) {
    if (!holds_fill(out, r * p.stride + p.dim, (r + 1) * p.stride, fill_t)) {
      return "wrote into the padding after row " + std::to_string(r);
    }
  }
  if (!holds_fill(out, p.rows * p.stride, out.size(), fill_t)) return "wrote past the last row";
  const Acc fill = std::numeric_limits<Acc>::quiet_NaN();
  for (size_t b = 0; b < bufs.size(); ++b) {
    if (!holds_fill(*bufs[b].second, used[b], bufs[b].second->size(), fill)) {
      return std::string("wrote past the ") + bufs[b].first;
    }
  }
  return "";
}

template <typename T>
Results<T> cpu_forward(const Problem<T>& p) {
  using Acc = typename AccOf<T>::type;
  Results<T> r;
  r.out.assign(p.rows * p.stride, from_double<T>(0));
  goft::RotateArgs<T, Acc> a;
  a.rows = p.rows;
  a.dim = p.dim;
  a.x = p.x.data();
  a.x_row_stride = p.stride;
  a.out = r.out.data();
  a.out_row_stride = p.stride;
  a.blocks = p.blocks.data();
  a.scale = p.with_scale ? p.scale.data() : nullptr;
  a.transpose = p.transpose;
  const PairSchedule s = goft::make_schedule(p.dim);
  std::vector<Acc> scratch(goft::cpu::rotate_scratch_size(p.dim));
  goft::cpu::rotate_rows(a, s, 0, p.rows, scratch.data());
  return r;
}

template <typename T>
Results<T> cpu_backward(const Problem<T>& p) {
  using Acc = typename AccOf<T>::type;
  Results<T> r;
  r.out.assign(p.rows * p.stride, from_double<T>(0));
  const int64_t pairs = p.dim - 1;
  const int64_t chunks = goft::grad_chunk_count(p.rows, p.dim);
  std::vector<Acc> bp(chunks * pairs * 4), sp(chunks * p.dim);
  goft::RotateBackwardArgs<T, Acc> a;
  a.rows = p.rows;
  a.dim = p.dim;
  a.grad_out = p.grad_out.data();
  a.grad_out_row_stride = p.stride;
  a.x = p.x.data();
  a.x_row_stride = p.stride;
  a.grad_x = r.out.data();
  a.grad_x_row_stride = p.stride;
  a.blocks = p.blocks.data();
  a.scale = p.with_scale ? p.scale.data() : nullptr;
  a.transpose = p.transpose;
  a.num_chunks = chunks;
  a.block_grad_partials = bp.data();
  a.scale_grad_partials = p.with_scale ? sp.data() : nullptr;
  const PairSchedule s = goft::make_schedule(p.dim);
  std::vector<Acc> scratch(goft::cpu::rotate_backward_scratch_size(p.dim));
  for (int64_t c = 0; c < chunks; ++c) goft::cpu::rotate_backward_chunk(a, s, c, scratch.data());
  r.block_grads.resize(4 * pairs);
  goft::reduce_partials(bp.data(), chunks, 4 * pairs, 0, 4 * pairs, r.block_grads.data());
  if (p.strict) {
    r.angle_grads.resize(pairs);
    goft::block_grads_to_param_grads(r.block_grads.data(), p.transpose, p.angles.data(), false,
                                     p.angle_map, 0, pairs, r.angle_grads.data());
  }
  if (p.with_scale) {
    r.scale_grads.resize(p.dim);
    goft::reduce_partials(sp.data(), chunks, p.dim, 0, p.dim, r.scale_grads.data());
  }
  return r;
}

// The launcher's fixed-order sums of a backward's partials, into r: angle gradients (strict
// kernels: one partial per pair of the blocks as applied, negated for the transposed op, which
// applies angle -t, then through the parameterisation) or block gradients, and the scale's.
template <typename T>
void sum_emulated_partials(const Problem<T>& p, bool strict,
                           const std::vector<typename AccOf<T>::type>& bp,
                           const std::vector<typename AccOf<T>::type>& sp, int64_t partials,
                           Results<T>* r) {
  const int64_t pairs = p.dim - 1;
  if (strict) {
    r->angle_grads.resize(pairs);
    for (int64_t i = 0; i < pairs; ++i) {
      r->angle_grads[i] = angle_param_grad(sum_partials(bp.data(), pairs, 0, partials, i),
                                           p.transpose, p.angles[i], p.angle_map);
    }
  } else {
    r->block_grads.resize(4 * pairs);
    for (int64_t i = 0; i < 4 * pairs; ++i) {
      r->block_grads[i] = sum_partials(bp.data(), 4 * pairs, 0, partials, i);
    }
  }
  if (p.with_scale) {
    r->scale_grads.resize(p.dim);
    for (int64_t i = 0; i < p.dim; ++i) r->scale_grads[i] = sum_partials(sp.data(), p.dim, 0, partials, i);
  }
}

// A copy of a kernel's input whose end lies at most 15 bytes before a page that may not be read
// or written, so that an access past the input stops the emulator at once (on a GPU it can fault
// at the end of an allocation, or read another tensor). The copy starts 16-byte aligned, as the
// original (std::vector's) storage is, so the kernels take the same vector or scalar paths.
template <typename V>
class GuardedCopy {
 public:
  GuardedCopy(const V* data, size_t count) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    const size_t bytes = (count * sizeof(V) + 15) / 16 * 16;
    const size_t pages = (bytes + page - 1) / page * page;
    size_ = pages + page;
    void* base = mmap(nullptr, size_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED || mprotect(static_cast<char*>(base) + pages, page, PROT_NONE) != 0) {
      std::fprintf(stderr, "emulator: cannot map a guarded buffer of %zu bytes\n", bytes);
      std::exit(2);
    }
    base_ = base;
    copy_ = reinterpret_cast<V*>(static_cast<char*>(base) + pages - bytes);
    if (count > 0) std::memcpy(copy_, data, count * sizeof(V));
  }
  GuardedCopy(const GuardedCopy&) = delete;
  GuardedCopy& operator=(const GuardedCopy&) = delete;
  ~GuardedCopy() { munmap(base_, size_); }
  V* data() const { return copy_; }

 private:
  void* base_ = nullptr;
  size_t size_ = 0;
  V* copy_ = nullptr;
};

// The launch the CUDA launcher would make for this layout, run on the emulator (the strict
// backward kernels when l.strict). x_is_output: the strict backward gets the forward's output
// (as the CPU computes it, rounded to T) in place of x.
template <typename T, int kChunks, int kRows, bool kStrict>
Results<T> fused_run(const Problem<T>& p, const FusedLayout& l, bool backward, int grid,
                     int64_t num_chunks, bool x_is_output = false) {
  using Acc = typename AccOf<T>::type;
  using K = FusedTraits<T, kChunks, false, kRows>;
  using KB = FusedTraits<T, kChunks, true, 1, kStrict>;
  const int log_elts = K::kLogElts;
  Results<T> r;
  r.out.assign(p.rows * p.stride + kGuard, from_double<T>(std::nan("")));
  FusedParams<T, Acc> fp = make_fused_params<T, Acc>(p.rows, p.dim, p.transpose, l);
  // The store as stage_store_kernel builds it, from angles (in double, as the op may get them)
  // or from blocks.
  std::vector<Acc> store(4 * l.num_slots);
  for (int64_t slot = 0; slot < l.num_slots; ++slot) {
    if (p.strict) {
      stage_slot(p.angles.data(), false, p.angle_map, p.transpose, fp.schedule, log_elts, l.vcap,
                 slot, store.data());
    } else {
      stage_slot(p.blocks.data(), true, AngleParameterisation::kRaw, p.transpose, fp.schedule,
                 log_elts, l.vcap, slot, store.data());
    }
  }
  const GuardedCopy<T> x(p.x.data(), p.x.size()), grad_out(p.grad_out.data(), p.grad_out.size());
  const GuardedCopy<Acc> guarded_store(store.data(), 4 * l.num_slots);
  fp.x = x.data();
  fp.x_stride = p.stride;
  fp.x_vec = rows_vectorizable(x.data(), p.stride, p.rows, p.dim);
  fp.store = guarded_store.data();
  // Problems with padded rows also read the scale from a misaligned copy: the scalar path.
  std::vector<Acc> shifted_scale(p.scale.size() + 1);
  std::copy(p.scale.begin(), p.scale.end(), shifted_scale.begin() + 1);
  const bool shifted = p.stride != p.dim;
  const GuardedCopy<Acc> scale(shifted ? shifted_scale.data() : p.scale.data(),
                               shifted ? shifted_scale.size() : p.scale.size());
  fp.scale = p.with_scale ? scale.data() + (shifted ? 1 : 0) : nullptr;
  fp.scale_vec = scale_vectorizable(fp.scale);
  if (!backward) {
    fp.out = r.out.data();
    fp.out_stride = p.stride;
    fp.out_vec = rows_vectorizable(r.out.data(), p.stride, p.rows, p.dim);
    launch<Acc>(grid, l.cta_threads, l.smem_bytes, [&](const EmuThreads& th, Acc* smem) {
      if (p.transpose) {
        fused_rotate<K, true>(fp, th, smem);
      } else {
        fused_rotate<K, false>(fp, th, smem);
      }
    });
    r.overrun = find_overrun<T, Acc>(p, r.out, {}, {});
    return r;
  }
  const int64_t partials = num_chunks * l.rows_per_cta;
  const int64_t pairs = p.dim - 1;
  const size_t bp_used = partials * pairs * (kStrict ? 1 : 4), sp_used = partials * p.dim;
  const size_t ws_used = grid * l.grad_workspace_per_cta;
  std::vector<Acc> bp(bp_used + kGuard, std::numeric_limits<Acc>::quiet_NaN());
  std::vector<Acc> sp(sp_used + kGuard, std::numeric_limits<Acc>::quiet_NaN());
  std::vector<Acc> ws(ws_used + kGuard, std::numeric_limits<Acc>::quiet_NaN());
  const std::vector<T> forward_out = x_is_output ? cpu_forward(p).out : std::vector<T>();
  const GuardedCopy<T> y(forward_out.data(), forward_out.size());
  if (x_is_output) {
    fp.x = y.data();
    fp.x_vec = rows_vectorizable(y.data(), p.stride, p.rows, p.dim);
    fp.x_is_output = true;
  }
  fp.grad_out = grad_out.data();
  fp.grad_out_stride = p.stride;
  fp.grad_out_vec = rows_vectorizable(grad_out.data(), p.stride, p.rows, p.dim);
  fp.out = r.out.data();
  fp.out_stride = p.stride;
  fp.out_vec = rows_vectorizable(r.out.data(), p.stride, p.rows, p.dim);
  fp.num_chunks = num_chunks;
  fp.block_partials = bp.data();
  fp.scale_partials = p.with_scale ? sp.data() : nullptr;
  fp.grad_workspace = ws.data();
  launch<Acc>(grid, l.cta_threads, l.smem_bytes, [&](const EmuThreads& th, Acc* smem) {
    if (p.transpose) {
      fused_rotate_backward<KB, true>(fp, th, smem);
    } else {
      fused_rotate_backward<KB, false>(fp, th, smem);
    }
  });
  r.overrun = find_overrun<T, Acc>(p, r.out, {{"partials", &bp}, {"scale partials", &sp},
                                              {"gradient workspace", &ws}},
                                   {bp_used, sp_used, ws_used});
  sum_emulated_partials(p, kStrict, bp, sp, partials, &r);
  return r;
}

// strict (backward, angle problems): the strict fallback, from the forward's output when
// x_is_output (no scale), as the launcher runs it for angles.
template <typename T>
Results<T> fallback_run(const Problem<T>& p, bool backward, int threads, int grid,
                        int64_t num_chunks, bool scratch_in_smem, bool strict = false,
                        bool x_is_output = false) {
  using Acc = typename AccOf<T>::type;
  Results<T> r;
  r.out.assign(p.rows * p.stride + kGuard, from_double<T>(std::nan("")));
  FallbackParams<T, Acc> fp;
  fp.rows = p.rows;
  fp.dim = p.dim;
  fp.schedule = goft::make_schedule(p.dim);
  fp.transpose = p.transpose;
  const std::vector<T> x_rows = x_is_output ? cpu_forward(p).out : p.x;
  const GuardedCopy<T> x(x_rows.data(), p.x.size());  // the rows, without a result's guard band
  const GuardedCopy<T> grad_out(p.grad_out.data(), p.grad_out.size());
  const GuardedCopy<Acc> blocks(p.blocks.data(), p.blocks.size());
  // The strict fallback's rotations, as params_to_rotations_kernel builds them.
  std::vector<Acc> cos_sin(strict ? 2 * p.angles.size() : 0);
  for (size_t k = 0; k < cos_sin.size() / 2; ++k) {
    goft::angle_to_rotation(goft::angle_of(p.angles[k], p.angle_map), cos_sin.data() + 2 * k);
  }
  const GuardedCopy<Acc> rotations(cos_sin.data(), cos_sin.size());
  const GuardedCopy<Acc> scale(p.scale.data(), p.scale.size());
  fp.x = x.data();
  fp.x_is_output = x_is_output;
  fp.x_stride = p.stride;
  fp.out = r.out.data();
  fp.out_stride = p.stride;
  fp.grad_out = grad_out.data();
  fp.grad_out_stride = p.stride;
  fp.blocks = strict ? nullptr : blocks.data();
  fp.rotations = strict ? rotations.data() : nullptr;
  fp.scale = p.with_scale ? scale.data() : nullptr;
  fp.scratch_in_smem = scratch_in_smem;
  const FallbackPass pass = !backward ? FallbackPass::kForward
                            : strict  ? FallbackPass::kStrictBackward
                                      : FallbackPass::kBackward;
  const int64_t scratch = fallback_scratch_size(p.dim, pass, p.with_scale);
  const size_t ws_used = scratch_in_smem ? 0 : grid * scratch;
  std::vector<Acc> ws(ws_used + kGuard, std::numeric_limits<Acc>::quiet_NaN());
  fp.scratch_workspace = ws.data();
  const int64_t smem_bytes = scratch_in_smem ? scratch * static_cast<int64_t>(sizeof(Acc)) : 0;
  const int64_t pairs = p.dim - 1;
  const size_t bp_used = num_chunks * pairs * (strict ? 1 : 4), sp_used = num_chunks * p.dim;
  std::vector<Acc> bp(bp_used + kGuard, std::numeric_limits<Acc>::quiet_NaN());
  std::vector<Acc> sp(sp_used + kGuard, std::numeric_limits<Acc>::quiet_NaN());
  fp.num_chunks = num_chunks;
  fp.block_partials = bp.data();
  fp.scale_partials = p.with_scale ? sp.data() : nullptr;
  launch<Acc>(grid, threads, smem_bytes, [&](const EmuThreads& th, Acc* smem) {
    if (strict) {
      if (p.transpose) {
        fallback_rotate_backward_strict<T, Acc, true>(fp, th, smem);
      } else {
        fallback_rotate_backward_strict<T, Acc, false>(fp, th, smem);
      }
    } else if (backward) {
      if (p.transpose) {
        fallback_rotate_backward<T, Acc, true>(fp, th, smem);
      } else {
        fallback_rotate_backward<T, Acc, false>(fp, th, smem);
      }
    } else if (p.transpose) {
      fallback_rotate<T, Acc, true>(fp, th, smem);
    } else {
      fallback_rotate<T, Acc, false>(fp, th, smem);
    }
  });
  r.overrun = find_overrun<T, Acc>(p, r.out, {{"partials", &bp}, {"scale partials", &sp},
                                              {"scratch workspace", &ws}},
                                   {bp_used, sp_used, ws_used});
  if (backward) sum_emulated_partials(p, strict, bp, sp, num_chunks, &r);
  return r;
}

// ---------------------------------------------------------------------------------------------
// Comparison.

int g_failures = 0;
int g_cases = 0;
int g_kernel_cases = 0;  // of g_cases, those that ran kernels (the rest: planner and slot checks)
// --filter's terms, each a list of substrings that must all occur; empty: every case.
std::vector<std::vector<std::string>> g_filters;

// --list: print the selected kernel cases' names instead of running them.
bool g_list_only = false;
int g_listed = 0;

bool filter_matches(const std::string& name) {
  if (g_filters.empty()) return true;
  for (const std::vector<std::string>& term : g_filters) {
    const bool all = std::all_of(term.begin(), term.end(), [&name](const std::string& part) {
      return name.find(part) != std::string::npos;
    });
    if (all) return true;
  }
  return false;
}

// Whether to run the kernel case of this name: selected by --filter, and not only listed.
bool case_selected(const std::string& name) {
  if (!filter_matches(name)) return false;
  if (g_list_only) {
    std::printf("%s\n", name.c_str());
    ++g_listed;
    return false;
  }
  return true;
}

// "a&b|c" -> {{a, b}, {c}}; empty pieces are dropped.
std::vector<std::vector<std::string>> parse_filter(const std::string& text) {
  const auto split = [](const std::string& s, char sep) {
    std::vector<std::string> parts;
    size_t begin = 0;
    for (size_t end; (end = s.find(sep, begin)) != std::string::npos; begin = end + 1) {
      if (end > begin) parts.push_back(s.substr(begin, end - begin));
    }
    if (begin < s.size()) parts.push_back(s.substr(begin));
    return parts;
  };
  std::vector<std::vector<std::string>> terms;
  for (const std::string& term : split(text, '|')) {
    std::vector<std::string> parts = split(term, '&');
    if (!parts.empty()) terms.push_back(std::move(parts));
  }
  return terms;
}

template <typename T>
bool same_rows(const Problem<T>& p, const std::vector<T>& a, const std::vector<T>& b,
               std::string* why) {
  for (int64_t r = 0; r < p.rows; ++r) {
    for (int64_t i = 0; i < p.dim; ++i) {
      const double va = to_acc(a[r * p.stride + i]), vb = to_acc(b[r * p.stride + i]);
      if (!(va == vb)) {
        *why = "row " + std::to_string(r) + " feature " + std::to_string(i) + ": " +
               std::to_string(va) + " vs " + std::to_string(vb);
        return false;
      }
    }
  }
  return true;
}

template <typename Acc>
bool close(const std::vector<Acc>& a, const std::vector<Acc>& b, double tol, std::string* why) {
  if (a.size() != b.size()) {
    *why = "size " + std::to_string(a.size()) + " vs " + std::to_string(b.size());
    return false;
  }
  double scale = 1.0;
  for (Acc v : b) scale = std::max(scale, std::fabs(static_cast<double>(v)));
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = std::fabs(static_cast<double>(a[i]) - static_cast<double>(b[i]));
    if (!(d <= tol * scale)) {
      *why = "entry " + std::to_string(i) + ": " + std::to_string(a[i]) + " vs " + std::to_string(b[i]);
      return false;
    }
  }
  return true;
}

// tol: relative tolerance of the parameter gradients (0: what float and double accumulation
// allow for the same inputs).
template <typename T>
void check(const std::string& name, const Problem<T>& p, const Results<T>& got,
           const Results<T>& want, bool backward, bool strict, double tol = 0) {
  using Acc = typename AccOf<T>::type;
  ++g_cases;
  ++g_kernel_cases;
  std::string why = got.overrun;
  bool ok = why.empty() && same_rows(p, got.out, want.out, &why);
  if (ok && backward) {
    if (tol == 0) tol = sizeof(Acc) == 8 ? 1e-11 : 2e-5;
    ok = strict ? close(got.angle_grads, want.angle_grads, tol, &why)
                : close(got.block_grads, want.block_grads, tol, &why);
    if (ok && p.with_scale) ok = close(got.scale_grads, want.scale_grads, tol, &why);
  }
  if (!ok) {
    ++g_failures;
    std::printf("FAIL %s: %s\n", name.c_str(), why.c_str());
  }
}

template <typename T>
const char* type_name() {
  if (sizeof(T) == 8) return "float64";
  if (sizeof(T) == 4) return "float32";
  return std::is_same<T, __half>::value ? "float16" : "bfloat16";
}

// A case's pass, for its name: "forward", "backward", "backward strict" or "backward strict
// from output".
std::string pass_name(bool backward, bool strict, bool x_is_output) {
  if (!backward) return "forward";
  return x_is_output ? "backward strict from output" : strict ? "backward strict" : "backward";
}

// The tolerance of the parameter gradients of a strict backward from the output (x_is_output):
// the kernel starts from the forward's output rounded to T, so its angle gradients match the
// reference to T's precision only (grad_x does not depend on x and must match exactly); 0
// otherwise (check's default).
template <typename T>
double from_output_tolerance(bool x_is_output) {
  if (!x_is_output) return 0;
  return sizeof(T) == 8 ? 1e-9 : sizeof(T) == 4 ? 2e-4 : 5e-2;
}

// x_is_output (strict backward without a scale): the kernel starts from the forward's output
// (from_output_tolerance).
template <typename T, int kChunks, int kRows, bool kStrict>
void fused_layout_case(const Problem<T>& p, bool backward, int max_threads, int64_t smem_limit,
                       int grid, int64_t num_chunks, const char* label, bool x_is_output = false) {
  using Acc = typename AccOf<T>::type;
  FusedVariant v;
  v.chunks = kChunks;
  v.rows_per_group = kRows;
  v.max_threads = max_threads;
  FusedLayout l;
  if (!choose_fused_layout(p.dim, FusedTraits<T, kChunks, false>::kElts, sizeof(Acc), backward,
                           kStrict, p.with_scale, &v, 1, smem_limit, &l)) {
    return;  // this variant cannot hold the row
  }
  // Kernels that stage their next rows also run without (GOFT_CUDA_STAGE=0), which loads the
  // rows and the warp layers' lead values (FusedTraits::kLeads) directly.
  const bool staged = l.stage_rows;
  for (int stage = staged ? 1 : 0; stage >= 0; --stage) {
    l.stage_rows = stage == 1;
    char name[256];
    std::snprintf(name, sizeof(name),
                  "fused %s %s d=%lld rows=%lld stride=%lld C=%d R=%d G=%d rp=%d store_smem=%d "
                  "grads_smem=%d stage=%d transpose=%d scale=%d grid=%d chunks=%lld %s",
                  pass_name(backward, kStrict, x_is_output).c_str(), type_name<T>(),
                  (long long)p.dim, (long long)p.rows, (long long)p.stride, l.chunks,
                  l.rows_per_group, l.group_threads, l.rows_per_cta, l.store_in_smem,
                  l.grads_in_smem, l.stage_rows, p.transpose, p.with_scale, grid,
                  (long long)num_chunks, label);
    if (!case_selected(name)) continue;
    const Results<T> got =
        fused_run<T, kChunks, kRows, kStrict>(p, l, backward, grid, num_chunks, x_is_output);
    const Results<T> want = backward ? cpu_backward(p) : cpu_forward(p);
    check(name, p, got, want, backward, kStrict, from_output_tolerance<T>(x_is_output));
  }
}

// A layout case with the kernels the launcher could pick for this problem: in backward with
// angles, both the quasi and the strict kernels, and the strict ones from the output.
template <typename T, int kChunks, int kRows = 1>
void fused_case(const Problem<T>& p, bool backward, int max_threads, int64_t smem_limit, int grid,
                int64_t num_chunks, const char* label) {
  if (backward && kRows > 1) return;  // several rows per group: forward only
  fused_layout_case<T, kChunks, kRows, false>(p, backward, max_threads, smem_limit, grid,
                                              num_chunks, label);
  if (backward && p.strict) {
    fused_layout_case<T, kChunks, 1, true>(p, backward, max_threads, smem_limit, grid,
                                           num_chunks, label);
    if (!p.with_scale) {
      fused_layout_case<T, kChunks, 1, true>(p, backward, max_threads, smem_limit, grid,
                                             num_chunks, label, true);
    }
  }
}

// A fallback case; in backward with angles also the strict fallback, and without a scale the
// strict fallback from the output (from_output_tolerance, as for the fused kernels).
template <typename T>
void fallback_case(const Problem<T>& p, bool backward, int threads, int grid, int64_t chunks,
                   bool smem) {
  const Results<T> want = backward ? cpu_backward(p) : cpu_forward(p);
  const int kinds = backward && p.strict ? (p.with_scale ? 2 : 3) : 1;
  for (int kind = 0; kind < kinds; ++kind) {
    const bool strict = kind >= 1, x_is_output = kind == 2;
    char name[256];
    std::snprintf(name, sizeof(name),
                  "fallback %s %s d=%lld rows=%lld threads=%d grid=%d chunks=%lld smem=%d "
                  "transpose=%d scale=%d",
                  pass_name(backward, strict, x_is_output).c_str(), type_name<T>(),
                  (long long)p.dim, (long long)p.rows, threads, grid, (long long)chunks, smem,
                  p.transpose, p.with_scale);
    if (!case_selected(name)) continue;
    const Results<T> got = fallback_run(p, backward, threads, grid, chunks, smem, strict, x_is_output);
    check(name, p, got, want, backward, strict, from_output_tolerance<T>(x_is_output));
  }
}

template <typename T>
void run_type(const std::vector<int64_t>& dims, bool quick) {
  constexpr int64_t kBig = int64_t{1} << 30;
  unsigned seed = 1;
  for (const int64_t d : dims) {
    for (int variant = 0; variant < (quick ? 2 : 4); ++variant) {
      const bool transpose = variant & 1;
      const bool scale = variant >= 2 || d % 3 == 0;
      const bool strict = d % 2 == 0;
      const int64_t rows = d >= 2048 ? 3 : 7;
      // Aligned rows, and rows one element apart (scalar path whenever d > 1).
      const Problem<T> p = make_problem<T>(rows, d, d, transpose, scale, strict, seed++);
      const Problem<T> q = make_problem<T>(rows, d, d + 1, transpose, !scale, !strict, seed++);
      for (int backward = 0; backward < 2; ++backward) {
        fused_case<T, 1>(p, backward, 1024, kBig, 2, 3, "");
        fused_case<T, 2>(q, backward, 1024, kBig, 1, 2, "");
        fused_case<T, 3>(p, backward, 1024, kBig, 3, 4, "");
        fused_case<T, 4>(q, backward, 1024, kBig, 2, 5, "");
        // Two rows per group; the row counts are odd, so a group's second row can be past the end.
        fused_case<T, 1, 2>(p, backward, 1024, kBig, 2, 3, "");
        fused_case<T, 1, 2>(q, backward, 1024, kBig, 3, 3, "");
        if (!quick) {
          // No room in shared memory: blocks (and gradient accumulators) in global memory.
          fused_case<T, 1>(q, backward, 1024, 0, 2, 3, "global");
          fused_case<T, 1, 2>(p, backward, 1024, 0, 1, 3, "global");
          fused_case<T, 2>(p, backward, 512, 4096, 1, 1, "tight");
          fused_case<T, 3>(q, backward, 256, 0, 2, 2, "global");
        }
        fallback_case<T>(p, backward, 64, 2, 3, true);
        if (!quick) fallback_case<T>(q, backward, 128, 1, 2, false);
        // Wide rows as the launcher runs them: 1024 threads per block.
        if (d >= 2048) fallback_case<T>(p, backward, 1024, 2, 3, true);
      }
    }
  }
}

// The planner's choice among the compiled variants (fused_variant_shape) on an H100/H200-like
// device: 227 KB of shared memory per block (228 KB per SM, 1 KB of it reserved per block), the
// kernels' launch bounds as their thread limits. A strict backward holding at most 32 bytes of
// the row per thread is compiled for two blocks per SM (FusedTraits::kMinBlocksPerSm), so its
// shared memory must allow two as well; the strict kernels' small accumulators keep their stores
// on chip.
void planner_case(const char* name, int64_t dim, int elts, bool backward, bool strict,
                  bool scale_grad, const FusedTuning& tuning, int want_chunks, int want_rows,
                  bool want_staged = false) {
  ++g_cases;
  FusedVariant variants[kMaxFusedVariants];
  for (int i = 0; i < num_fused_variants(backward); ++i) {
    variants[i] = fused_variant_shape(i);
    variants[i].max_threads = backward ? 512 : 1024;
  }
  FusedLayout l;
  const bool fused = choose_fused_layout(dim, elts, 4, backward, strict, scale_grad, variants,
                                         num_fused_variants(backward), 227 * 1024, &l, tuning);
  const int want_blocks = strict && l.chunks * elts * 4 <= 32 ? 2 : 1;
  const bool blocks_fit = want_blocks * (l.smem_bytes + 1024) <= 228 * 1024;
  if (!fused || l.chunks != want_chunks || l.rows_per_group != want_rows || l.strict != strict ||
      !blocks_fit || (strict && !fused_on_chip(l, backward)) || (want_staged && !l.stage_rows)) {
    ++g_failures;
    std::printf("FAIL planner %s: fused=%d chunks=%d rows=%d strict=%d smem=%lld on_chip=%d "
                "staged=%d, want chunks=%d rows=%d staged=%d, %d block(s) per SM\n",
                name, fused, l.chunks, l.rows_per_group, l.strict, (long long)l.smem_bytes,
                fused_on_chip(l, backward), l.stage_rows, want_chunks, want_rows, want_staged,
                want_blocks);
  }
}

void run_planner() {
  FusedTuning any, one_row, two_chunks;
  one_row.rows_per_group = 1;
  two_chunks.chunks = 2;
  // bf16 (8 elements per vector): d = 4096 is 512 vectors, one chunk of 512 threads.
  planner_case("bf16 d=4096 forward", 4096, 8, false, false, false, any, 1, 2);
  planner_case("bf16 d=4096 backward", 4096, 8, true, false, false, any, 1, 1);
  // The strict kernels stage their next rows and lead chunks at the target shape, with a scale
  // gradient too.
  planner_case("bf16 d=4096 backward strict", 4096, 8, true, true, false, any, 1, 1, true);
  planner_case("bf16 d=4096 backward strict, scale", 4096, 8, true, true, true, any, 1, 1, true);
  planner_case("bf16 d=4096 forward, GOFT_CUDA_ROWS=1", 4096, 8, false, false, false, one_row, 1,
               1);
  planner_case("bf16 d=4096 forward, GOFT_CUDA_CHUNKS=2", 4096, 8, false, false, false,
               two_chunks, 2, 1);
  // float32 d = 8192: 2048 vectors need two chunks of 1024 threads (forward) or four of 512.
  planner_case("f32 d=8192 forward", 8192, 4, false, false, false, any, 2, 1);
  planner_case("f32 d=8192 backward", 8192, 4, true, false, false, any, 4, 1);
  planner_case("f32 d=8192 backward strict", 8192, 4, true, true, false, any, 4, 1);
  // float32 d = 4096: 1024 vectors, two chunks of 512 threads; 32 bytes of row per thread.
  planner_case("f32 d=4096 backward strict, scale", 4096, 4, true, true, true, any, 2, 1);
}

// slot_pair (the staging kernel's map from a store slot to its pair) inverts block_slot, and
// every slot no pair uses maps to -1, for each vector width and widths around the boundaries.
void run_slots() {
  for (int log_elts = 1; log_elts <= 3; ++log_elts) {
    for (int64_t d = 1; d <= 300; d += (d < 70 ? 1 : 37)) {
      ++g_cases;
      const PairSchedule s = goft::make_schedule(d);
      const int64_t elts = int64_t{1} << log_elts;
      const int64_t vcap = pow2_ceil((d + elts - 1) / elts) * (d % 3 == 0 ? 2 : 1);
      const int64_t slots = fused_num_slots(s, log_elts, vcap);
      std::vector<int64_t> owner(slots, -1);
      bool ok = true;
      for (int64_t k = 0; k < s.num_pairs(); ++k) owner[block_slot(s, log_elts, vcap, k)] = k;
      for (int64_t slot = 0; slot < slots && ok; ++slot) {
        if (slot_pair(s, log_elts, vcap, slot) != owner[slot]) {
          ok = false;
          ++g_failures;
          std::printf("FAIL slot_pair d=%lld elts=%lld vcap=%lld slot=%lld: %lld, want %lld\n",
                      (long long)d, (long long)elts, (long long)vcap, (long long)slot,
                      (long long)slot_pair(s, log_elts, vcap, slot), (long long)owner[slot]);
        }
      }
    }
  }
}

}  // namespace

// A kernel that reads or writes past a guarded input (GuardedCopy) lands here.
extern "C" void on_segfault(int) {
  static const char message[] =
      "emulator: segmentation fault: a kernel accessed memory past one of its buffers\n";
  (void)!write(2, message, sizeof(message) - 1);
  _exit(4);
}

// Kernels with a race the GPU would have, to show that a ThreadSanitizer build reports it (CI
// expects its exit status, TSAN_OPTIONS=exitcode=66): "shuffle", lanes that hand values over in
// shared memory with only a shuffle between the write and the read (a GPU needs __syncwarp
// there); "barriers", a block that writes a global element before its barrier and another that
// reads it after its own (a barrier orders its block only); "blocks", two blocks that write the
// same global element. Without ThreadSanitizer they run and exit 0.
int race_canary(const std::string& kind) {
  if (kind == "shuffle") {
    launch<float>(1, 64, 64 * sizeof(float), [](const EmuThreads& th, float* smem) {
      const int t = th.thread();
      smem[t] = static_cast<float>(t);
      (void)th.shfl_xor(0.0f, 1);
      if (smem[t ^ 1] != static_cast<float>(t ^ 1)) std::printf("shuffle canary: stale value\n");
    });
  } else if (kind == "barriers") {
    std::vector<float> global(1, 0.0f);
    launch<float>(6, 32, 0, [&global](const EmuThreads& th, float*) {
      if (th.cta() == 0 && th.thread() == 0) global[0] = 1.0f;
      th.sync();
      if (th.cta() == 5 && th.thread() == 0 && global[0] > 2.0f) std::printf("barriers canary\n");
    });
  } else if (kind == "blocks") {
    std::vector<float> global(1, 0.0f);
    launch<float>(2, 32, 0, [&global](const EmuThreads& th, float*) {
      if (th.thread() == 0) global[0] = static_cast<float>(th.cta());
    });
  } else {
    std::fprintf(stderr, "--race-canary: expected shuffle, barriers or blocks, got '%s'\n",
                 kind.c_str());
    return 2;
  }
  std::printf("race canary '%s' ran\n", kind.c_str());
  return 0;
}

int main(int argc, char** argv) {
  std::signal(SIGSEGV, on_segfault);
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--quick") {
      quick = true;
    } else if (arg == "--list") {
      g_list_only = true;
    } else if (arg.rfind("--race-canary=", 0) == 0) {
      return race_canary(arg.substr(14));
    } else if (arg.rfind("--filter=", 0) == 0) {
      g_filters = parse_filter(arg.substr(9));
    } else {
      std::fprintf(stderr,
                   "usage: %s [--quick] [--list] [--filter=SUBSTRING[&SUBSTRING...][|...]]\n"
                   "       %s --race-canary=shuffle|barriers|blocks\n",
                   argv[0], argv[0]);
      return 2;
    }
  }
  if (!g_list_only) {
    run_slots();
    run_planner();
  }
  // --quick (CI): fewer widths, each layout still covered (sub-warp, one warp, several warps,
  // chunk layers, odd widths, padding in the last vector).
  const std::vector<int64_t> small =
      quick ? std::vector<int64_t>{1, 2, 3, 5, 8, 12, 17, 33, 100, 257, 1000}
            : std::vector<int64_t>{1, 2, 3, 4, 5, 7, 8, 9, 12, 16, 17, 31, 33, 63, 64, 65, 100, 127, 129, 255, 257, 768, 1000};
  const std::vector<int64_t> large = quick ? std::vector<int64_t>{3072} : std::vector<int64_t>{2049, 3072, 4096};
  run_type<float>(small, quick);
  run_type<double>(small, quick);
  run_type<__nv_bfloat16>(small, quick);
  run_type<__half>(small, true);
  run_type<__nv_bfloat16>(large, true);
  // float32 d = 4096 in one chunk is a group of 32 warps (G = 1024), the widest the kernels take.
  run_type<float>(quick ? std::vector<int64_t>{4096} : large, true);
  if (g_list_only) {
    std::printf("%d kernel case(s)\n", g_listed);
  } else {
    std::printf("%d of %d emulated cases passed (%d of them kernel cases, %d planner and slot checks)\n",
                g_cases - g_failures, g_cases, g_kernel_cases, g_cases - g_kernel_cases);
  }
  if (!g_filters.empty() && g_kernel_cases + g_listed == 0) {
    std::fprintf(stderr, "--filter matched no kernel case\n");
    return 2;
  }
  return g_failures == 0 ? 0 : 1;
}
