// Standalone microbenchmark of the core CPU kernels (no Python, no torch): forward and backward
// time and bandwidth for several d, next to a memcpy of the same bytes measured in the same run.
#include <omp.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "goft/blocks.h"
#include "goft/cpu/lanes.h"
#include "goft/cpu/rotate.h"
#include "goft/params.h"
#include "goft/schedule.h"

namespace {

using Clock = std::chrono::steady_clock;

// Median wall times in milliseconds of `repeats` rounds that each run every fn once, in order,
// after one warm-up round. Interleaved, so that a slow spell of a shared machine falls on every
// kernel of a round instead of on the one timed while it lasted.
template <size_t N>
std::array<double, N> interleaved_median_ms(int repeats, const std::array<std::function<void()>, N>& fns) {
  for (const auto& fn : fns) fn();
  std::array<std::vector<double>, N> times;
  for (int i = 0; i < repeats; ++i) {
    for (size_t k = 0; k < N; ++k) {
      const auto start = Clock::now();
      fns[k]();
      times[k].push_back(std::chrono::duration<double, std::milli>(Clock::now() - start).count());
    }
  }
  std::array<double, N> medians;
  for (size_t k = 0; k < N; ++k) {
    std::sort(times[k].begin(), times[k].end());
    medians[k] = times[k][times[k].size() / 2];
  }
  return medians;
}

struct Options {
  std::vector<int64_t> dims = {768, 4096, 11008};
  int64_t rows = 8192;
  int repeats = 7;
  int lane_bytes = 0;  // 0: what the torch op picks on this CPU (goft::cpu::native_lane_bytes)
};

Options parse(int argc, char** argv) {
  Options options;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "bench: %s needs a value\n", arg.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (arg == "--rows") {
      options.rows = std::stoll(value());
    } else if (arg == "--repeats") {
      options.repeats = std::stoi(value());
    } else if (arg == "--lanes") {
      options.lane_bytes = std::stoi(value());
      if (options.lane_bytes != 16 && options.lane_bytes != 32 && options.lane_bytes != 64) {
        std::fprintf(stderr, "bench: --lanes must be 16, 32 or 64\n");
        std::exit(2);
      }
    } else if (arg == "--dims") {
      options.dims.clear();
      std::string list = value();
      for (size_t pos = 0; pos < list.size();) {
        const size_t comma = std::min(list.find(',', pos), list.size());
        options.dims.push_back(std::stoll(list.substr(pos, comma - pos)));
        pos = comma + 1;
      }
    } else {
      std::fprintf(stderr,
                   "usage: bench [--rows N] [--dims 768,4096,11008] [--repeats R] [--lanes 16|32|64]\n"
                   "Times the fused GOFT kernels (float32) against memcpy on %d OpenMP threads.\n",
                   omp_get_max_threads());
      std::exit(arg == "--help" || arg == "-h" ? 0 : 2);
    }
  }
  if (options.rows < 1 || options.repeats < 1 || options.dims.empty()) {
    std::fprintf(stderr, "bench: --rows and --repeats must be >= 1 and --dims non-empty\n");
    std::exit(2);
  }
  return options;
}

}  // namespace

double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double worst = 0;
  for (size_t i = 0; i < a.size(); ++i) worst = std::max(worst, static_cast<double>(std::fabs(a[i] - b[i])));
  return worst;
}

// Times of the fused kernels with tiles of a fixed size, for one d (the second table).
struct TileTimes {
  int64_t dim = 0;
  int automatic = 0;  // goft::cpu::tile_rows for this d
  double forward_ms[3] = {}, backward_ms[3] = {};
};

template <int Bytes>
int run(const Options& options) {
  std::printf("goft core bench: float32, %lld rows, %d threads, median of %d interleaved rounds; 'simple' is the\n"
              "portable per-row reference kernel, 'fused' the SIMD path the torch op uses\n"
              "(%d-byte lanes; this CPU's own width is %d).\n",
              static_cast<long long>(options.rows), omp_get_max_threads(), options.repeats, Bytes,
              goft::cpu::native_lane_bytes());
  std::printf("%7s %9s | %9s %9s %8s %8s | %9s %9s %8s %8s | %9s\n", "d", "memcpy ms", "fwd simple",
              "fwd fused", "GB/s", "x copy", "bwd simple", "bwd fused", "GB/s", "x copy", "max |diff|");
  std::mt19937 rng(0);
  std::normal_distribution<float> normal;
  std::vector<TileTimes> tile_table;
  for (const int64_t d : options.dims) {
    const int64_t rows = options.rows, n = rows * d, pairs = d - 1;
    std::vector<float> x(n), y(n), y_ref(n), g(n), gx(n), gx_ref(n);
    for (auto& v : x) v = normal(rng);
    for (auto& v : g) v = normal(rng);
    std::vector<float> angles(pairs), blocks(4 * pairs), scale(d);
    for (auto& v : angles) v = 0.1f * normal(rng);
    for (auto& v : scale) v = 1.0f + 0.1f * normal(rng);
    goft::params_to_blocks(angles.data(), false, goft::AngleParameterisation::kRaw, pairs,
                           blocks.data());
    const goft::PairSchedule schedule = goft::make_schedule(d);
    std::vector<float> coefficients(goft::cpu::fine_coefficients_size<float, Bytes>(d));
    std::vector<float> scale_padded(d + 16);
    const goft::cpu::LaneCall<float, Bytes> call = goft::cpu::prepare_lane_call<Bytes>(
        schedule, blocks.data(), scale.data(), coefficients.data(), scale_padded.data());

    goft::RotateArgs<float, float> fwd;
    fwd.rows = rows;
    fwd.dim = d;
    fwd.x = x.data();
    fwd.x_row_stride = d;
    fwd.out = y.data();
    fwd.out_row_stride = d;
    fwd.blocks = blocks.data();
    fwd.scale = scale.data();
    goft::RotateArgs<float, float> fwd_ref = fwd;
    fwd_ref.out = y_ref.data();

    const int64_t chunks = goft::grad_chunk_count(rows, d);
    std::vector<float> partials(chunks * 4 * pairs), partials_ref(chunks * 4 * pairs);
    std::vector<float> scale_partials(chunks * d), scale_partials_ref(chunks * d);
    goft::RotateBackwardArgs<float, float> bwd;
    bwd.rows = rows;
    bwd.dim = d;
    bwd.grad_out = g.data();
    bwd.grad_out_row_stride = d;
    bwd.x = x.data();
    bwd.x_row_stride = d;
    bwd.grad_x = gx.data();
    bwd.grad_x_row_stride = d;
    bwd.blocks = blocks.data();
    bwd.scale = scale.data();
    bwd.num_chunks = chunks;
    bwd.block_grad_partials = partials.data();
    bwd.scale_grad_partials = scale_partials.data();
    goft::RotateBackwardArgs<float, float> bwd_ref = bwd;
    bwd_ref.grad_x = gx_ref.data();
    bwd_ref.block_grad_partials = partials_ref.data();
    bwd_ref.scale_grad_partials = scale_partials_ref.data();

    const std::function<void()> copy = [&] {
#pragma omp parallel for schedule(static)
      for (int64_t r = 0; r < rows; ++r) std::memcpy(y.data() + r * d, x.data() + r * d, d * sizeof(float));
    };
    const std::function<void()> fwd_simple = [&] {
#pragma omp parallel
      {
        std::vector<float> scratch(goft::cpu::rotate_scratch_size(d));
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; ++r) goft::cpu::rotate_rows(fwd_ref, schedule, r, r + 1, scratch.data());
      }
    };
    const std::function<void()> bwd_simple = [&] {
#pragma omp parallel
      {
        std::vector<float> scratch(goft::cpu::rotate_backward_scratch_size(d));
#pragma omp for schedule(static)
        for (int64_t c = 0; c < chunks; ++c) goft::cpu::rotate_backward_chunk(bwd_ref, schedule, c, scratch.data());
      }
    };
    // The fused kernels with tiles of a fixed number of rows, or (0) the number they pick for d.
    const int64_t tile = goft::cpu::kMaxTileRows;
    auto fwd_tiles = [&](auto rows_constant) -> std::function<void()> {
      return [&, rows_constant] {
#pragma omp parallel
        {
          std::vector<float> scratch(goft::cpu::rotate_tile_scratch_size<float, Bytes>(d));
#pragma omp for schedule(static)
          for (int64_t r = 0; r < rows; r += tile) {
            goft::cpu::rotate_rows_fast<float, float, Bytes, decltype(rows_constant)::value>(
                fwd, call, r, std::min(rows, r + tile), scratch.data());
          }
        }
      };
    };
    auto bwd_tiles = [&](auto rows_constant) -> std::function<void()> {
      return [&, rows_constant] {
#pragma omp parallel
        {
          std::vector<float> scratch(goft::cpu::backward_chunk_scratch_size<float, Bytes>(d));
#pragma omp for schedule(static)
          for (int64_t c = 0; c < chunks; ++c) {
            goft::cpu::rotate_backward_chunks_fast<float, float, Bytes, decltype(rows_constant)::value>(
                bwd, call, c, c + 1, scratch.data());
          }
        }
      };
    };
    const std::function<void()> fwd_fused = fwd_tiles(std::integral_constant<int, 0>());
    const std::function<void()> bwd_fused = bwd_tiles(std::integral_constant<int, 0>());
    const std::array<std::function<void()>, 6> tiled = {
        fwd_tiles(std::integral_constant<int, 2>()), fwd_tiles(std::integral_constant<int, 4>()),
        fwd_tiles(std::integral_constant<int, 8>()), bwd_tiles(std::integral_constant<int, 2>()),
        bwd_tiles(std::integral_constant<int, 4>()), bwd_tiles(std::integral_constant<int, 8>())};
    // The copy writes y, which the forward kernels then overwrite; the comparison below reads the
    // outputs of the last round, in which every kernel ran after the copy (the fixed-tile kernels
    // are checked one by one after it).
    const auto times = interleaved_median_ms<11>(
        options.repeats, {copy, fwd_simple, fwd_fused, bwd_simple, bwd_fused, tiled[0], tiled[1],
                          tiled[2], tiled[3], tiled[4], tiled[5]});
    const double copy_ms = times[0], fwd_simple_ms = times[1], fwd_ms = times[2];
    const double bwd_simple_ms = times[3], bwd_ms = times[4];
    TileTimes tile_times;
    tile_times.dim = d;
    tile_times.automatic = goft::cpu::tile_rows<Bytes, float>(d);
    for (int k = 0; k < 3; ++k) {
      tile_times.forward_ms[k] = times[5 + k];
      tile_times.backward_ms[k] = times[8 + k];
    }
    tile_table.push_back(tile_times);
    // The two kernels must agree; a bench that times a wrong kernel is worthless.
    double diff = std::max({max_abs_diff(y, y_ref), max_abs_diff(gx, gx_ref),
                            max_abs_diff(partials, partials_ref),
                            max_abs_diff(scale_partials, scale_partials_ref)});
    for (int k = 0; k < 3; ++k) {
      tiled[k]();
      tiled[3 + k]();
      diff = std::max({diff, max_abs_diff(y, y_ref), max_abs_diff(gx, gx_ref),
                       max_abs_diff(partials, partials_ref),
                       max_abs_diff(scale_partials, scale_partials_ref)});
    }
    // Bytes each must move at least: copy and forward read x and write y; backward reads x and
    // grad_out and writes grad_x.
    const double bytes2 = 2.0 * n * sizeof(float), bytes3 = 3.0 * n * sizeof(float);
    std::printf("%7lld %9.2f | %9.2f %9.2f %8.1f %7.2fx | %9.2f %9.2f %8.1f %7.2fx | %9.1e\n",
                static_cast<long long>(d), copy_ms, fwd_simple_ms, fwd_ms, bytes2 / fwd_ms / 1e6,
                fwd_ms / copy_ms, bwd_simple_ms, bwd_ms, bytes3 / bwd_ms / 1e6, bwd_ms / copy_ms, diff);
    if (!(diff < 1e-3)) {
      std::fprintf(stderr, "bench: fused and simple kernels disagree by %g for d=%lld\n", diff,
                   static_cast<long long>(d));
      return 1;
    }
  }
  std::printf("\nfused kernels with tiles of a fixed number of rows, ms (auto: the rows the kernels pick at\n"
              "this d and lane width; a row of a multiple of 4 KiB gets 2 below 64-byte lanes):\n");
  std::printf("%7s %5s | %8s %8s %8s | %8s %8s %8s\n", "d", "auto", "fwd 2", "fwd 4", "fwd 8", "bwd 2",
              "bwd 4", "bwd 8");
  for (const TileTimes& t : tile_table) {
    std::printf("%7lld %5d | %8.2f %8.2f %8.2f | %8.2f %8.2f %8.2f\n", static_cast<long long>(t.dim),
                t.automatic, t.forward_ms[0], t.forward_ms[1], t.forward_ms[2], t.backward_ms[0],
                t.backward_ms[1], t.backward_ms[2]);
  }
  return 0;
}

int main(int argc, char** argv) {
  const Options options = parse(argc, argv);
  const int bytes = options.lane_bytes != 0 ? options.lane_bytes : goft::cpu::native_lane_bytes();
  return goft::cpu::with_lane_bytes(bytes, [&](auto width) { return run<decltype(width)::value>(options); });
}
