import os
import zlib

# Small calls run AVX2 even on an AVX-512 CPU (csrc/common.h, isa_for); the tests' shapes are
# small, so they lower that bound to run the AVX-512 build (where the CPU has it) at every size.
os.environ.setdefault("LOSSFUSE_AVX512_MIN_WORK", "0")

import pytest
import torch

# Triton kernels run in Triton's interpreter on CPU tensors when no GPU is present. The variable must
# be set before any Triton kernel is defined, i.e. before lossfuse.triton.* is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """Fresh random inputs per test, yet reproducible: the seed is a hash of the test's id."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield
