"""Builds lossfuse._C, the C++/OpenMP CPU kernels, with torch's extension tooling.

    pip install --no-build-isolation .        # torch must already be installed (CPU or CUDA build)
    LOSSFUSE_NO_EXT=1 pip install ...         # pure Python: reference + Triton backends only

The build is portable: the kernels are compiled for a baseline x86-64 and again for AVX2+FMA+F16C and
for AVX-512 (csrc/isa_instantiate.h), and the CPU picks at run time -- never -march=native. OpenMP: the extension
uses the libgomp that torch itself loads, so there is one thread pool, sized by torch.set_num_threads.
"""

import glob
import os

from setuptools import setup

ext_modules = []
cmdclass = {}

# The translation units that take longest to compile (each holds a loss's kernels for three ISAs) start
# first: ninja runs one compiler per core, and a long unit started last would leave the other cores idle.
_SLOWEST_FIRST = ("huber.cpp", "cross_entropy.cpp", "focal.cpp", "small_call.cpp", "distillation.cpp")


def _build_order(path):
    name = os.path.basename(path)
    return (_SLOWEST_FIRST.index(name) if name in _SLOWEST_FIRST else len(_SLOWEST_FIRST), name)


if os.environ.get("LOSSFUSE_NO_EXT", "0") in ("", "0"):
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    # -g0: Python's own CFLAGS carry -g, and debug info for every kernel instantiation made the extension
    # 128 MB. TORCH_ASSERT_ONLY_METHOD_OPERATORS: the torch-facing files include only the operators they
    # call (csrc/tensor_utils.h), not <ATen/ATen.h>.
    compile_args = ["-O3", "-g0", "-fopenmp", "-fno-math-errno", "-Wall", "-Wno-unknown-pragmas",
                    "-DTORCH_ASSERT_ONLY_METHOD_OPERATORS"]
    ext_modules.append(
        CppExtension(
            name="lossfuse._C",
            sources=sorted(glob.glob(os.path.join("csrc", "*.cpp")), key=_build_order),
            include_dirs=[os.path.abspath("csrc")],
            extra_compile_args=compile_args,
            extra_link_args=["-fopenmp"],
            # A failed compile must not hide: the tests check that _C loaded (cpu_kernels_or_skip in tests/helpers.py).
            optional=os.environ.get("LOSSFUSE_EXT_OPTIONAL", "0") not in ("", "0"),
        )
    )
    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
