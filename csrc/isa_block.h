// One x86 copy of the kernels (isa_instantiate.h includes this once per instruction set, with
// LF_ISA_NS the namespace and LF_ISA_TARGET the target string). No include guard: that is the point.
#define LF_PRAGMA(x) _Pragma(#x)
#ifdef __clang__
#define LF_TARGET_PUSH(t) LF_PRAGMA(clang attribute push(__attribute__((target(t))), apply_to = function))
LF_TARGET_PUSH(LF_ISA_TARGET)
#else
#define LF_TARGET_PUSH(t) LF_PRAGMA(GCC target(t))
#pragma GCC push_options
LF_TARGET_PUSH(LF_ISA_TARGET)
// GCC 12's AVX-512 intrinsics start from _mm512_undefined_ps(), a self-initialised variable that its
// uninitialised-use analysis flags at every inlined call: thousands of false warnings.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
namespace lossfuse {
namespace LF_ISA_NS {
#include "vec.h"
#include LF_KERNEL_HEADER
}  // namespace LF_ISA_NS
}  // namespace lossfuse
#ifdef __clang__
#pragma clang attribute pop
#else
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif
#undef LF_TARGET_PUSH
#undef LF_PRAGMA
