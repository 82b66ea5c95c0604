// Compiles the kernel header named by LF_KERNEL_HEADER three times: for AVX-512 (F, BW, DQ, VL, with
// AVX2 + FMA + F16C) in namespace lossfuse::avx512, for AVX2 + FMA + F16C in lossfuse::avx2, and
// portably in lossfuse::base. LF_RUN_KERNEL (common.h) picks one at run time, so one wheel runs
// everywhere and still uses the vector units where they exist -- never -march=native.
//
// The target pragma covers only our own kernel code: every system and torch header is included
// before it (common.h), so no inline function of theirs gets AVX2 or AVX-512 code that the linker
// could then hand to a caller on an older CPU.
#ifndef LF_KERNEL_HEADER
#error "define LF_KERNEL_HEADER before including isa_instantiate.h"
#endif

#ifdef LF_HAVE_AVX2_BUILD
#define LF_VEC_AVX2 1

#define LF_VEC_AVX512 1
#define LF_ISA_NS avx512
#define LF_ISA_TARGET "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c"
#include "isa_block.h"
#undef LF_ISA_TARGET
#undef LF_ISA_NS
#undef LF_VEC_AVX512

#define LF_ISA_NS avx2
#define LF_ISA_TARGET "avx2,fma,f16c"
#include "isa_block.h"
#undef LF_ISA_TARGET
#undef LF_ISA_NS

#undef LF_VEC_AVX2
#endif  // LF_HAVE_AVX2_BUILD

namespace lossfuse {
namespace base {
#include "vec.h"
#include LF_KERNEL_HEADER
}  // namespace base
}  // namespace lossfuse
