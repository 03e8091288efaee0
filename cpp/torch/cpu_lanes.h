// Which SIMD width the CPU kernels use in this process (goft/cpu/lanes.h): the CPU's own
// (cpu::native_lane_bytes: 64 with AVX-512, 32 with AVX2, else 16) unless the environment
// variable GOFT_CPU_LANE_BYTES=16|32|64 overrides it (tests run every width on one machine).
#pragma once

namespace goft {

int cpu_lane_bytes();

}  // namespace goft
