"""Triton kernels, each with its plain-PyTorch reference beside it in the same file.

One dispatch rule for all of them: the Triton kernel runs when Triton is installed, the tensor is
on CUDA (or FORCE is set: tests run kernels on CPU through TRITON_INTERPRET=1) and the kernel has
not been switched off (train.py's --kernels / --kernels_off fill DISABLED); otherwise the
reference runs.

    nf4      NF4 dequantization (quant.py)
    nf4_matmul  x @ W^T from the 4-bit codes for up to 16 rows of x (quant.Linear4bit forward)
    rmsnorm  RMSNorm forward and backward (model.RMSNorm)
    swiglu   silu(gate) * up forward and backward (model.MLP)
    rope     rotary embedding in place on q and k, forward and backward (model.Attention)
    lora     the adapter's update added onto the base output in one pass (lora.LoRALinear)
    linear_ce  lm_head matmul + cross-entropy, gradients computed chunk by chunk (model.cross_entropy_sum)
"""

import importlib.util

HAS_TRITON = importlib.util.find_spec("triton") is not None
NAMES = ("nf4", "nf4_matmul", "rmsnorm", "swiglu", "linear_ce", "rope", "lora")
DISABLED = set()  # kernels that must use their reference
FORCE = False  # run kernels on CPU tensors too (only meaningful under TRITON_INTERPRET=1)


def use_triton(name, tensor):
    return HAS_TRITON and (tensor.is_cuda or FORCE) and name not in DISABLED
