// The 16-bit floating-point storage types of the core (bfloat16, IEEE float16) and their
// conversions to and from float.
//
// The types are raw bits, so the core needs no framework's types (the torch layer passes
// c10::BFloat16 / c10::Half data as these). Each conversion is written once, as lane-wise integer
// and float operations that apply alike to one value (uint32_t / float) and to a GCC vector of
// lanes: the fast path converts whole chunks in SIMD with the same code the scalar paths use. (The
// compilers' scalar conversions, with a NaN branch, were not vectorised and left the bfloat16
// forward 4x slower than float32's.)
//
// Results match c10::BFloat16 and c10::Half bit for bit: round to nearest even; a NaN becomes the
// canonical quiet NaN (bfloat16 0x7FC0; float16 0x7E00 with the NaN's sign); float16 overflow
// rounds to infinity and its subnormals are exact. The float16 algorithms are the branch-free ones
// of the FP16 library (Marat Dukhan), which c10 uses as well.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "goft/inline.h"

namespace goft {

// Reinterprets the bits of a value or of a vector as another type of the same size.
template <typename To, typename From>
GOFT_ALWAYS_INLINE To bits_as(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bits_as needs types of one size");
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}

// The value c in every lane of V (V a scalar or a GCC vector).
template <typename V, typename S>
GOFT_ALWAYS_INLINE V lanes_of(S c) {
  return V{} + c;
}

// The two formats' conversions. U: uint32_t or a vector of uint32_t lanes; F: float or the float
// vector of as many lanes. The 16-bit values travel in the low half of U's lanes.

struct BFloat16Format {
  template <typename F, typename U>
  GOFT_ALWAYS_INLINE static F to_float(U h) {
    return bits_as<F>(U(h << 16));
  }

  template <typename U, typename F>
  GOFT_ALWAYS_INLINE static U from_float(F f) {
    const U w = bits_as<U>(f);
    const U rounded = (w + 0x7FFFu + ((w >> 16) & 1u)) >> 16;
    return f != f ? lanes_of<U>(0x7FC0u) : rounded;
  }
};

struct Float16Format {
  template <typename F, typename U>
  GOFT_ALWAYS_INLINE static F to_float(U h) {
    const U w = h << 16;
    const U sign = w & 0x80000000u;
    const U two_w = w + w;
    // Normal values: move the exponent and mantissa into place and rebias with one multiply
    // (2^-112), which also turns float16 infinities and NaNs into float ones.
    const F normalized = bits_as<F>(U((two_w >> 4) + (0xE0u << 23))) * 0x1.0p-112f;
    // Subnormals: the mantissa as the low bits of 0.5's mantissa, minus 0.5.
    const F denormalized = bits_as<F>(U((two_w >> 17) | (126u << 23))) - 0.5f;
    const U magnitude = two_w < (1u << 27) ? bits_as<U>(denormalized) : bits_as<U>(normalized);
    return bits_as<F>(U(sign | magnitude));
  }

  template <typename U, typename F>
  GOFT_ALWAYS_INLINE static U from_float(F f) {
    const U w = bits_as<U>(f);
    const U shl1_w = w + w;
    const U sign = w & 0x80000000u;
    // |f| * 2^112 * 2^-110: overflows to infinity above float16's range, and leaves the bits to
    // round where the addition below puts the float16 rounding point.
    F base = bits_as<F>(U(w & 0x7FFFFFFFu)) * 0x1.0p+112f * 0x1.0p-110f;
    U bias = shl1_w & 0xFF000000u;
    bias = bias < 0x71000000u ? lanes_of<U>(0x71000000u) : bias;
    base = bits_as<F>(U((bias >> 1) + 0x07800000u)) + base;
    const U bits = bits_as<U>(base);
    const U nonsign = ((bits >> 13) & 0x7C00u) + (bits & 0x0FFFu);
    return (sign >> 16) | (shl1_w > 0xFF000000u ? lanes_of<U>(0x7E00u) : nonsign);
  }
};

// A float packed in 16 bits: static_cast to and from float converts by its Format; the SIMD
// paths convert whole vectors with Format's functions directly.
template <typename FormatT>
struct PackedFloat {
  using Format = FormatT;
  uint16_t bits;

  PackedFloat() = default;
  explicit PackedFloat(float f) : bits(static_cast<uint16_t>(Format::template from_float<uint32_t>(f))) {}
  explicit operator float() const { return Format::template to_float<float>(uint32_t{bits}); }
};

using bfloat16 = PackedFloat<BFloat16Format>;
using float16 = PackedFloat<Float16Format>;

template <typename T>
struct is_16bit_float : std::false_type {};
template <typename Format>
struct is_16bit_float<PackedFloat<Format>> : std::true_type {};

}  // namespace goft
