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
# first: ninja runs one compiler per core in the order of its build file, and a long unit started last
# would leave the other cores idle (on 2 cores: 176 s for the build in alphabetical order, the order
# setuptools hands over, against 152 s of compiler time per core).
_SLOWEST_FIRST = ("cross_entropy.cpp", "huber.cpp", "focal.cpp", "small_call.cpp", "distillation.cpp", "kl_div.cpp")


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
            sources=sorted(glob.glob(os.path.join("csrc", "*.cpp"))),
            include_dirs=[os.path.abspath("csrc")],
            extra_compile_args=compile_args,
            extra_link_args=["-fopenmp"],
            # A failed compile must not hide: the tests check that _C loaded (cpu_kernels_or_skip in tests/helpers.py).
            optional=os.environ.get("LOSSFUSE_EXT_OPTIONAL", "0") not in ("", "0"),
        )
    )

    class _BuildSlowestFirst(BuildExtension.with_options(use_ninja=True)):
        """setuptools sorts an extension's sources by name before compiling them; torch's ninja
        compile writes them in the order it is given. Hand it ours."""

        def build_extension(self, ext):
            compile_ = self.compiler.compile

            def compile_in_order(sources, *args, **kwargs):
                return compile_(sorted(sources, key=_build_order), *args, **kwargs)

            self.compiler.compile = compile_in_order
            try:
                super().build_extension(ext)
            finally:
                self.compiler.compile = compile_

    cmdclass["build_ext"] = _BuildSlowestFirst

setup(ext_modules=ext_modules, cmdclass=cmdclass)
