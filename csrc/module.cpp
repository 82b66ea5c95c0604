// The Python module lossfuse._C. The kernels themselves register with the dispatcher from each loss's
// translation unit (TORCH_LIBRARY_IMPL); this file holds what is shared: the instruction-set switch
// and the huge-page hint, and the module's few functions.
//
// Written against Python's C API rather than pybind11 / <torch/extension.h>: those headers made this
// one small file the third-slowest translation unit of the build (about 50 s of the compiler's time,
// for seven functions of strings and integers).
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <algorithm>
#include <cstdlib>
#include <string>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "common.h"

namespace lossfuse {

namespace {
// The widest instruction set allowed: LOSSFUSE_CPU_ISA=base|avx2 caps it (any other value: no cap).
Isa isa_cap_from_env() {
  const char* env = std::getenv("LOSSFUSE_CPU_ISA");
  const std::string v = env ? env : "";
  return v == "base" ? kIsaBase : v == "avx2" ? kIsaAvx2 : kIsaAvx512;
}
Isa g_isa_cap = isa_cap_from_env();
const char* isa_name(Isa i) { return i == kIsaAvx512 ? "avx512" : i == kIsaAvx2 ? "avx2" : "base"; }
}  // namespace

Isa cpu_isa() { return std::min(g_isa_cap, cpu_max_isa()); }

int64_t avx512_min_work() {
  static const int64_t w = [] {
    const char* env = std::getenv("LOSSFUSE_AVX512_MIN_WORK");
    return env && *env ? int64_t(std::strtoll(env, nullptr, 10)) : int64_t(1) << 16;
  }();
  return w;
}

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

namespace {

PyObject* py_cpu_isa(PyObject*, PyObject*) { return PyUnicode_FromString(isa_name(cpu_isa())); }

// set_cpu_isa(name): 'auto' (the widest the CPU has), or a cap: 'avx512', 'avx2', 'base'. Asking for
// an instruction set the CPU lacks is an error, not a silent fallback. RuntimeError, as TORCH_CHECK
// raised when this was a pybind11 module.
PyObject* py_set_cpu_isa(PyObject*, PyObject* arg) {
  const char* s = PyUnicode_AsUTF8(arg);
  if (!s) return nullptr;
  const std::string isa(s);
  Isa want;
  if (isa == "auto" || isa == "avx512") {
    want = kIsaAvx512;
  } else if (isa == "avx2") {
    want = kIsaAvx2;
  } else if (isa == "base") {
    want = kIsaBase;
  } else {
    PyErr_Format(PyExc_RuntimeError, "set_cpu_isa: expected 'auto', 'avx512', 'avx2' or 'base'; got '%s'", s);
    return nullptr;
  }
  if (isa != "auto" && cpu_max_isa() < want) {
    PyErr_Format(PyExc_RuntimeError, "set_cpu_isa('%s'): this CPU (or this build) lacks it; it has '%s'", s,
                 isa_name(cpu_max_isa()));
    return nullptr;
  }
  g_isa_cap = want;
  Py_RETURN_NONE;
}

PyObject* py_cache_bytes(PyObject*, PyObject*) { return PyLong_FromSize_t(cache_bytes()); }
PyObject* py_cache_limit(PyObject*, PyObject*) { return PyLong_FromSize_t(cache_limit()); }

PyObject* py_set_cache_limit(PyObject*, PyObject* arg) {
  const size_t bytes = PyLong_AsSize_t(arg);  // negative or not an int: OverflowError / TypeError
  if (bytes == size_t(-1) && PyErr_Occurred()) return nullptr;
  set_cache_limit(bytes);
  Py_RETURN_NONE;
}

PyObject* py_empty_cache(PyObject*, PyObject*) {
  empty_cache();
  Py_RETURN_NONE;
}

PyObject* py_openmp_threads(PyObject*, PyObject*) {
#ifdef _OPENMP
  return PyLong_FromLong(omp_get_max_threads());
#else
  return PyLong_FromLong(1);
#endif
}

PyMethodDef methods[] = {
    {"cpu_isa", py_cpu_isa, METH_NOARGS, "The instruction set the CPU kernels use: 'avx512', 'avx2' or 'base' (portable)."},
    {"set_cpu_isa", py_set_cpu_isa, METH_O,
     "Cap the instruction set ('avx512', 'avx2', 'base') or go back to the widest ('auto'). For tests."},
    {"cache_bytes", py_cache_bytes, METH_NOARGS, "Bytes held by the CPU output-buffer cache."},
    {"cache_limit", py_cache_limit, METH_NOARGS, "Upper bound on the bytes the cache may hold."},
    {"set_cache_limit", py_set_cache_limit, METH_O, "Set the cache's bound in bytes (0 disables it)."},
    {"empty_cache", py_empty_cache, METH_NOARGS, "Free every buffer the cache holds."},
    {"openmp_threads", py_openmp_threads, METH_NOARGS, "The OpenMP threads a parallel region may use."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_C", "lossfuse CPU kernels (C++/OpenMP); the ops live under torch.ops.lossfuse", -1,
    methods, nullptr, nullptr, nullptr, nullptr,
};

}  // namespace

extern PyMethodDef small_call_methods[];  // small_call.cpp

}  // namespace lossfuse

// setup.py builds this module as lossfuse._C.
PyMODINIT_FUNC PyInit__C() {
  PyObject* m = PyModule_Create(&lossfuse::module_def);
  if (m && PyModule_AddFunctions(m, lossfuse::small_call_methods) < 0) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
