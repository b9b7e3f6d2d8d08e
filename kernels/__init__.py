"""Triton kernels, each with its plain-PyTorch reference beside it in the same file.

One dispatch rule for all of them: the Triton kernel runs when Triton is installed, the tensor is
on CUDA and the kernel has not been switched off (train.py's --kernels); otherwise the reference
runs. The tests run every kernel on CPU too, through Triton's interpreter (TRITON_INTERPRET=1).
"""

import importlib.util

HAS_TRITON = importlib.util.find_spec("triton") is not None

DISABLED = set()  # names of kernels that must use their reference (set by train.py)


def use_triton(name, tensor):
    return HAS_TRITON and tensor.is_cuda and name not in DISABLED
