"""Triton kernels, each with its plain-PyTorch reference beside it in the same file.

One dispatch rule for all of them: the Triton kernel runs when Triton is installed, the tensor is
on CUDA (or the interpreter was selected: tests run kernels on CPU through TRITON_INTERPRET=1) and
the kernel has not been switched off; otherwise the reference runs. The choice is the process's,
made once at startup like a torch.backends flag: train.py calls select(--kernels, --kernels_off);
tests and benchmarks use `with selected(...)`, which restores the previous choice.

    nf4      NF4 dequantization (quant.py)
    nf4_matmul  x @ W^T from the 4-bit codes for up to 16 rows of x (quant.Linear4bit forward)
    rmsnorm  RMSNorm forward and backward (model.RMSNorm)
    swiglu   silu(gate) * up forward and backward (model.MLP)
    rope     rotary embedding in place on q and k, forward and backward (model.Attention)
    lora     the adapter's update added onto the base output in one pass (lora.LoRALinear)
    linear_ce  lm_head matmul + cross-entropy, gradients computed chunk by chunk (model.cross_entropy_sum)
"""

import contextlib
import importlib.util

HAS_TRITON = importlib.util.find_spec("triton") is not None
NAMES = ("nf4", "nf4_matmul", "rmsnorm", "swiglu", "linear_ce", "rope", "lora")
_off, _on_cpu = frozenset(), False  # the choice: kernels replaced by their reference; CPU tensors take Triton too


def select(mode="triton", off=()):
    """mode: triton (where they can run: CUDA) | torch (every reference) | interpret (CPU tensors too,
    under TRITON_INTERPRET=1); off: kernels replaced by their reference."""
    global _off, _on_cpu
    _off, _on_cpu = frozenset(NAMES if mode == "torch" else off), mode == "interpret"


@contextlib.contextmanager
def selected(mode="triton", off=()):
    before = _off, _on_cpu
    select(mode, off)
    try:
        yield
    finally:
        select("interpret" if before[1] else "triton", before[0])


def use_triton(name, tensor):
    return HAS_TRITON and (tensor.is_cuda or _on_cpu) and name not in _off
