"""What the Triton launchers share on the host side: which tensors the kernels take, and the launch
configurations of the elementwise losses (huber.py, kl_div.py), whose kernels have the same structure --
a per-element forward, a reducing forward storing one partial sum per program, a per-element backward.
"""

from __future__ import annotations

import torch

from .._backend import triton_interpreting

# Elements per program of every per-element launch of the elementwise losses (their backward's too).
ELEMENTWISE_BLOCK = 1024


def check_device(input: torch.Tensor, who: str) -> None:
    """CUDA tensors (not float64: only the interpreter runs fp64), or CPU tensors under TRITON_INTERPRET=1;
    a floating dtype the kernels load."""
    if input.device.type == "cuda":
        if input.dtype == torch.float64:
            raise NotImplementedError(
                f"{who}: the Triton kernels do not support float64 on CUDA; use backend='reference' (or float32)"
            )
    elif not (input.device.type == "cpu" and triton_interpreting()):
        raise RuntimeError(
            f"{who}: the Triton kernels run on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1); "
            f"got a tensor on {input.device}"
        )
    if input.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"{who}: input must be float32, float16, bfloat16 (or float64); got {input.dtype}")


def elementwise_launch_config(block: int):
    """(BLOCK, num_warps): ``block`` elements per program for a reducing forward (the op's partial-sum
    block, a power of two), else ELEMENTWISE_BLOCK. 8 warps from 2048 elements, 4 below."""
    block = block if block > 0 else ELEMENTWISE_BLOCK
    return block, 8 if block >= 2048 else 4


def elementwise_launch_configs(partial_block: int, fwd_kernel: str, bwd_kernel: str) -> dict:
    """Every GPU launch configuration (constexprs + num_warps) of an elementwise loss's two kernels, from
    elementwise_launch_config over what its op passes (``partial_block`` or 0): lossfuse/triton/aot.py
    compiles them."""
    fwd = []
    for block in (0, partial_block):
        b, warps = elementwise_launch_config(block)
        fwd.append(dict(REDUCE=block > 0, BLOCK=b, num_warps=warps))
    b, warps = elementwise_launch_config(0)
    return {fwd_kernel: fwd, bwd_kernel: [dict(BLOCK=b, num_warps=warps)]}
