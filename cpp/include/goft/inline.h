// GOFT_ALWAYS_INLINE, for the core's small helpers on SIMD vectors: inlined into each
// multiversioned kernel (cpu/lanes.h), so they get that kernel's instruction set and never pass
// a vector across a call.
#pragma once

#if defined(__GNUC__)
#define GOFT_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define GOFT_ALWAYS_INLINE inline
#endif
