// The Python module lossfuse._C. The kernels themselves register with the dispatcher from each loss's
// translation unit (TORCH_LIBRARY_IMPL); this file holds what is shared: the instruction-set switch
// and the huge-page hint.
#include <torch/extension.h>

#include <cstdlib>
#include <string>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "tensor_utils.h"

namespace lossfuse {

namespace {
// -1: automatic (AVX2 where the CPU has it), 0: portable kernels forced.
int isa_choice() {
  static int choice = [] {
    const char* env = std::getenv("LOSSFUSE_CPU_ISA");
    return (env && std::string(env) == "base") ? 0 : -1;
  }();
  return choice;
}
int g_isa = isa_choice();
}  // namespace

bool use_avx2() { return g_isa != 0 && cpu_has_avx2_fma_f16c(); }

void advise_hugepages(void* ptr, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  if (bytes < 4 * kHuge) return;
  const uintptr_t b = reinterpret_cast<uintptr_t>(ptr);
  const uintptr_t lo = (b + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t hi = (b + bytes) & ~(kHuge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)ptr;
  (void)bytes;
#endif
}

}  // namespace lossfuse

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lossfuse CPU kernels (C++/OpenMP); the ops live under torch.ops.lossfuse";
  m.def("cpu_isa", [] { return std::string(lossfuse::use_avx2() ? "avx2" : "base"); },
        "The instruction set the CPU kernels use: 'avx2' or 'base' (portable).");
  m.def(
      "set_cpu_isa",
      [](const std::string& isa) {
        if (isa == "base") {
          lossfuse::g_isa = 0;
        } else if (isa == "auto" || isa == "avx2") {
          TORCH_CHECK(isa == "auto" || lossfuse::cpu_has_avx2_fma_f16c(),
                      "set_cpu_isa('avx2'): this CPU lacks AVX2/FMA/F16C");
          lossfuse::g_isa = -1;
        } else {
          TORCH_CHECK(false, "set_cpu_isa: expected 'auto', 'avx2' or 'base'; got '", isa, "'");
        }
      },
      "Force the portable kernels ('base') or go back to the automatic choice ('auto'/'avx2'). For tests.");
  m.def("cache_bytes", &lossfuse::cache_bytes, "Bytes held by the CPU output-buffer cache.");
  m.def("cache_limit", &lossfuse::cache_limit, "Upper bound on the bytes the cache may hold.");
  m.def("set_cache_limit", &lossfuse::set_cache_limit, "Set the cache's bound in bytes (0 disables it).");
  m.def("empty_cache", &lossfuse::empty_cache, "Free every buffer the cache holds.");
  m.def("openmp_threads", [] {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
  });
}
