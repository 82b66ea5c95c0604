// Compiles the kernel header named by LF_KERNEL_HEADER twice: for AVX2 + FMA + F16C in namespace
// lossfuse::avx2, and portably in lossfuse::base. LF_RUN_KERNEL (common.h) picks one at run time, so
// one wheel runs everywhere and still uses the vector units where they exist -- never -march=native.
//
// The target pragma covers only our own kernel code: every system and torch header is included
// before it (common.h), so no inline function of theirs gets AVX2 code that the linker could then
// hand to a caller on an older CPU.
#ifndef LF_KERNEL_HEADER
#error "define LF_KERNEL_HEADER before including isa_instantiate.h"
#endif

#ifdef LF_HAVE_AVX2_BUILD
#ifdef __clang__
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif
#define LF_VEC_AVX2 1
namespace lossfuse {
namespace avx2 {
#include "vec.h"
#include LF_KERNEL_HEADER
}  // namespace avx2
}  // namespace lossfuse
#undef LF_VEC_AVX2
#ifdef __clang__
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // LF_HAVE_AVX2_BUILD

namespace lossfuse {
namespace base {
#include "vec.h"
#include LF_KERNEL_HEADER
}  // namespace base
}  // namespace lossfuse
