// Shared, instruction-set-independent pieces of the CPU kernels: storage types for the 16-bit floats,
// exact scalar conversions, the CPU feature check and small memory helpers.
//
// Everything here is compiled for the baseline target. The vector code lives in vec.h and the kernel
// headers, which isa_instantiate.h compiles once per instruction set (AVX-512, AVX2, portable) in separate
// namespaces.
// Keeping the system and torch headers out of those regions means no inline function of theirs can be
// emitted with AVX2 instructions and then picked by the linker for a caller on a machine without AVX2.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LF_HAVE_X86 1
#if defined(__GNUC__) || defined(__clang__)
#define LF_HAVE_AVX2_BUILD 1  // isa_instantiate.h compiles AVX2 and AVX-512 copies of the kernels
#endif
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

namespace lossfuse {

enum class Dtype { F32, F16, BF16, F64 };

// Raw 16-bit storage; the kernels never do arithmetic on these, only convert to fp32 and back.
struct half_t {
  uint16_t bits;
};
struct bf16_t {
  uint16_t bits;
};

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float bf16_to_float(bf16_t h) { return bits_to_float(uint32_t(h.bits) << 16); }

// Round to nearest even, as torch does. NaN needs its own branch: adding the rounding bias to a NaN
// with a small payload would carry into the exponent and turn it into infinity.
inline bf16_t float_to_bf16(float f) {
  uint32_t u = float_to_bits(f);
  if (std::isnan(f)) return bf16_t{uint16_t(0x7FC0)};
  u += 0x7FFFu + ((u >> 16) & 1u);
  return bf16_t{uint16_t(u >> 16)};
}

inline float half_to_float(half_t h) {
  const uint32_t sign = uint32_t(h.bits & 0x8000u) << 16;
  const uint32_t exp = (h.bits >> 10) & 0x1Fu;
  const uint32_t man = h.bits & 0x3FFu;
  if (exp == 0x1Fu) return bits_to_float(sign | 0x7F800000u | (man << 13));  // inf / NaN
  if (exp != 0) return bits_to_float(sign | ((exp + 112u) << 23) | (man << 13));
  // zero or subnormal: man * 2^-24 is exact in fp32
  const float mag = float(man) * 5.9604644775390625e-08f;
  return sign ? -mag : mag;
}

// Round to nearest even, including into and out of the subnormal range.
inline half_t float_to_half(float f) {
  const uint32_t u = float_to_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return half_t{uint16_t(sign | 0x7E00u)};  // NaN
  if (a >= 0x477FF000u) return half_t{uint16_t(sign | 0x7C00u)};  // rounds to >= 65520: inf
  if (a < 0x38800000u) {                                           // below the smallest normal half
    // Adding 0.5 makes the FPU do the rounding to a multiple of 2^-24 for us.
    const float r = bits_to_float(a) + 0.5f;
    return half_t{uint16_t(sign | uint16_t(float_to_bits(r) - 0x3F000000u))};
  }
  uint32_t m = a + 0xC8000FFFu + ((a >> 13) & 1u);  // rebias exponent (-112 << 23) and round
  return half_t{uint16_t(sign | uint16_t(m >> 13))};
}

// Scalar load in the accumulation type A (float, or double for double inputs) and store back.
template <class A>
inline A to_acc(float x) { return A(x); }
template <class A>
inline A to_acc(double x) { return A(x); }
template <class A>
inline A to_acc(half_t x) { return A(half_to_float(x)); }
template <class A>
inline A to_acc(bf16_t x) { return A(bf16_to_float(x)); }

inline void put(float* p, float v) { *p = v; }
inline void put(half_t* p, float v) { *p = float_to_half(v); }
inline void put(bf16_t* p, float v) { *p = float_to_bf16(v); }
inline void put(double* p, double v) { *p = v; }

template <class T>
inline T from_float(float v) {
  T out;
  put(&out, v);
  return out;
}

// The instruction set the kernels run with: the widest the CPU has (kIsaAvx512: AVX-512 F/BW/DQ/VL;
// kIsaAvx2: AVX2 + FMA + F16C), capped by lossfuse._C.set_cpu_isa or LOSSFUSE_CPU_ISA=avx2|base (for
// tests and comparisons). Defined in module.cpp.
enum Isa { kIsaBase = 0, kIsaAvx2 = 1, kIsaAvx512 = 2 };
Isa cpu_isa();

// The same for inputs of dtype d. float64 always runs the portable kernels: Vec<double> is one lane on
// every instruction set (float64 is for gradcheck and precision, not speed), so a vector copy of its
// kernels would cost build time and buy nothing but FMA contractions (see with_dtype in vec.h).
//
// AVX-512 only for calls of at least avx512_min_work() elements (2^16; LOSSFUSE_AVX512_MIN_WORK
// overrides it, and the test suite sets 0 so that every test runs the AVX-512 build): on small calls
// (CE (64, 10), (256, 100)) it measured 10-15% slower than AVX2 -- short rows are mostly partial
// 16-lane vectors, and the wide units pay a warm-up that a call of a few microseconds never amortises.
int64_t avx512_min_work();  // module.cpp
inline Isa isa_for(Dtype d, int64_t work) {
  if (d == Dtype::F64) return kIsaBase;
  const Isa isa = cpu_isa();
  return isa == kIsaAvx512 && work < avx512_min_work() ? kIsaAvx2 : isa;
}

// LF_RUN_KERNEL(fn, args, work, ...): calls the kernel entry point fn(args, ...) -- a function that
// isa_instantiate.h compiled into lossfuse::avx512, lossfuse::avx2 and lossfuse::base -- of the
// instruction set isa_for(args.dtype, work) picks (work: the call's element count). The one place the
// choice is made (a macro: a namespace is no template argument).
#ifdef LF_HAVE_AVX2_BUILD
#define LF_RUN_KERNEL(fn, args, work, ...)                                                                    \
  ([&](::lossfuse::Isa isa_) {                                                                                \
    return isa_ == ::lossfuse::kIsaAvx512 ? ::lossfuse::avx512::fn(args __VA_OPT__(, ) __VA_ARGS__)          \
           : isa_ == ::lossfuse::kIsaAvx2 ? ::lossfuse::avx2::fn(args __VA_OPT__(, ) __VA_ARGS__)            \
                                          : ::lossfuse::base::fn(args __VA_OPT__(, ) __VA_ARGS__);           \
  }(::lossfuse::isa_for((args).dtype, (work))))
#else
#define LF_RUN_KERNEL(fn, args, work, ...) (::lossfuse::base::fn(args __VA_OPT__(, ) __VA_ARGS__))
#endif

// The widest of the instruction sets above that this CPU (and its OS: the feature bits count only
// where the OS saves the registers) supports.
inline Isa cpu_max_isa() {
#if defined(LF_HAVE_X86) && (defined(__GNUC__) || defined(__clang__))
  static const Isa best = [] {
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    if (!avx2) return kIsaBase;
    const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
    return avx512 ? kIsaAvx512 : kIsaAvx2;
  }();
  return best;
#else
  return kIsaBase;
#endif
}

// Number of threads for a parallel region over `work` elements: a fork/join costs a few microseconds,
// more than a small loss takes on one core. From 20000 elements a second thread pays: on the 2-core
// machine (fwd+bwd against torch's, interleaved in one process) cross-entropy (512, 100) went from
// 1.02-1.10x torch's time on one thread to 0.78 on two, (256, 100) from 1.01-1.04 to 0.85-0.88,
// (512, 20) from 0.98 to 0.86; a threshold of 16k or 8k elements a thread did no better.
inline int threads_for(int64_t work, int max_threads) {
  constexpr int64_t kMinWorkPerThread = 10000;
  int64_t t = work / kMinWorkPerThread;
  if (t < 1) t = 1;
  if (t > max_threads) t = max_threads;
  return int(t);
}

// Ask the kernel to back a large, not yet touched output buffer with transparent huge pages.
// A fresh 500 MB gradient otherwise costs ~125k page faults on first touch, several times the time
// the kernel spends writing it. Harmless where THP is off or the memory is already mapped.
void advise_hugepages(void* ptr, size_t bytes);

// The CPU output-buffer cache (buffer_cache.cpp): bytes held, its bound, and freeing what it holds.
size_t cache_bytes();
size_t cache_limit();
void set_cache_limit(size_t bytes);
void empty_cache();

}  // namespace lossfuse
