"""Each kernel at Llama-3-8B shapes: the PyTorch reference eager, the reference under torch.compile,
and the Triton kernel; time, peak memory, achieved GB/s and the fraction of the GPU's bandwidth.

    python bench/kernels.py            # GPU: Llama-3-8B shapes, 8192 tokens; CPU: 1/16 of the tokens, no Triton
    python bench/kernels.py --loss_memory   # peak memory of lm_head + cross-entropy, 8192 tokens, vocab 128256, bf16

Shapes: tokens = 8192 (batch 4 x 2048), dim 4096, ffn 14336, vocab 128256. Forward + backward for
RMSNorm, SwiGLU and the lm_head + cross-entropy (what training runs; for the loss, "chunked" is
model.cross_entropy_sum with 4096-token chunks recomputed in backward), forward only for NF4
dequantization (of one 14336 x 4096 weight). For the loss the figure to watch is peak memory.
GB/s counts the bytes each kernel must move at least once (inputs read, outputs written; in
backward also the saved inputs and the incoming gradient), so it is comparable across rows.

--loss_memory measures only the loss's peak memory (logits and their gradients, and the
gradients of h and W), at the full shapes in bf16, for eager, chunked and the fused kernel. On a
GPU that is torch.cuda.max_memory_allocated; on CPU it is the allocator's record (bench/memory.py)
with the kernel run through Triton's interpreter, which allocates no tensors of its own, so the
bytes are the algorithm's (slow there: on 2 cores without bf16 matrix units eager took 10 minutes,
chunked 13, and the interpreted kernel did not finish in 35).
"""

import os
import sys
import time

import torch

if "--loss_memory" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel is defined
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kernels as K  # noqa: E402
import quant as Q  # noqa: E402
from kernels import HAS_TRITON  # noqa: E402
import model as M  # noqa: E402
from kernels.lora import lora_add_reference, lora_add_triton  # noqa: E402
from kernels.linear_ce import linear_cross_entropy_triton  # noqa: E402
from kernels.nf4 import dequantize_nf4_reference, dequantize_nf4_triton, nf4_matmul_reference, nf4_matmul_triton  # noqa: E402
from kernels.rmsnorm import rms_norm_reference, rms_norm_triton  # noqa: E402
from kernels.swiglu import swiglu_reference, swiglu_triton  # noqa: E402

HBM_PEAK = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}


def measure(fn, device, repeat):
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / repeat
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device.type == "cuda" else None
    return dt, peak


def loss_memory():
    """Peak memory of lm_head + cross-entropy, forward and backward, at Llama 3's vocabulary."""
    from memory import cpu_allocation_peak
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    K.select("interpret" if device.type == "cpu" else "triton")  # the interpreter runs the kernel on CPU tensors
    tokens, dim, vocab = 8192, 4096, 128256
    torch.manual_seed(0)
    hid = torch.randn(tokens, dim, device=device, dtype=torch.bfloat16, requires_grad=True)
    head = (torch.randn(vocab, dim, device=device, dtype=torch.bfloat16) * 0.02).requires_grad_(True)
    labels = torch.randint(0, vocab, (tokens,), device=device)
    impls = {"eager": lambda: torch.nn.functional.cross_entropy((hid @ head.t()).float(), labels, reduction="sum"),
             "chunked": lambda: M.cross_entropy_sum(hid, lambda t: t @ head.t(), labels, 4096)[0],
             "triton": lambda: linear_cross_entropy_triton(hid, head, labels, 4096)}
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU (allocator records)'}, "
          f"lm_head + cross-entropy forward + backward, {tokens} tokens, dim {dim}, vocab {vocab}, bf16")
    print(f"{'impl':<10}{'peak MiB':>10}{'s':>8}{'loss':>12}")
    for name, fn in impls.items():
        out = {}

        def step():
            loss = fn()
            loss.backward()
            out["loss"] = loss.item()
            hid.grad = head.grad = None
        if device.type == "cuda":
            seconds, peak_mib = measure(step, device, repeat=1)
        else:  # one run: minutes at these shapes on a CPU
            t = time.perf_counter()
            peak_mib = cpu_allocation_peak(step) / 2**20
            seconds = time.perf_counter() - t
        print(f"{name:<10}{peak_mib:>10.0f}{seconds:>8.1f}{out['loss']:>12.1f}")


def main():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    tokens, dim, ffn, vocab = (8192 if gpu else 512), 4096, 14336, (128256 if gpu else 32000)
    dtype = torch.bfloat16 if gpu else torch.float32
    repeat = 20 if gpu else 3
    peak_bw = next((v for k, v in HBM_PEAK.items() if gpu and k in torch.cuda.get_device_name()), None)
    torch.manual_seed(0)
    x = torch.randn(tokens, dim, device=device, dtype=dtype, requires_grad=True)
    w = torch.ones(dim, device=device, dtype=dtype, requires_grad=True)
    gate = torch.randn(tokens, ffn, device=device, dtype=dtype, requires_grad=True)
    up = torch.randn(tokens, ffn, device=device, dtype=dtype, requires_grad=True)
    e = x.element_size()

    def fwd_bwd(fn, *args):
        def run():
            out = fn(*args)
            out.backward(torch.ones_like(out))
            for a in args:
                a.grad = None
        return run

    hid = torch.randn(tokens, dim, device=device, dtype=dtype, requires_grad=True)
    head = torch.randn(vocab, dim, device=device, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, vocab, (tokens,), device=device)
    ce = lambda a, b: torch.nn.functional.cross_entropy((a @ b.t()).float(), labels, reduction="sum")  # noqa: E731
    chunked = lambda a, b: M.cross_entropy_sum(a, lambda t: t @ b.t(), labels, 4096)[0]  # noqa: E731

    q = Q.quantize_nf4(torch.randn(ffn, dim, device=device) * 0.02)
    nf4, dynamic = Q.codes_on(device)
    nf4_args = (q["weight"], q["absmax"], nf4, 64, torch.Size((ffn, dim)), torch.bfloat16, q["nested_absmax"], dynamic, 256, q["offset"])
    x1 = torch.randn(1, dim, device=device, dtype=torch.bfloat16)
    mm_args = (q["weight"], q["absmax"], nf4, 64, torch.Size((ffn, dim)), q["nested_absmax"], dynamic, 256, q["offset"])
    ybase = torch.randn(tokens, dim, device=device, dtype=dtype, requires_grad=True)
    xa = torch.randn(tokens, 16, device=device, dtype=dtype, requires_grad=True)
    bmat = torch.randn(dim, 16, device=device, requires_grad=True)
    cases = [
        # name, bytes moved, {implementation: callable}
        ("rmsnorm fwd+bwd", e * tokens * dim * 4, {  # x, y; x, dy -> dx (rstd and w negligible)
            "eager": fwd_bwd(lambda a, b: rms_norm_reference(a, b, 1e-5), x, w),
            "compiled": fwd_bwd(torch.compile(lambda a, b: rms_norm_reference(a, b, 1e-5)), x, w),
            "triton": fwd_bwd(lambda a, b: rms_norm_triton(a, b, 1e-5), x, w)}),
        ("swiglu fwd+bwd", e * tokens * ffn * 7, {  # gate, up -> h; dh, gate, up -> dgate, dup
            "eager": fwd_bwd(swiglu_reference, gate, up),
            "compiled": fwd_bwd(torch.compile(swiglu_reference), gate, up),
            "triton": fwd_bwd(swiglu_triton, gate, up)}),
        ("linear + CE fwd+bwd", e * (tokens * dim * 2 + vocab * dim * 2), {  # h, W read; dh, dW written
            "eager": fwd_bwd(ce, hid, head),
            "compiled": fwd_bwd(torch.compile(ce), hid, head),
            "chunked": fwd_bwd(chunked, hid, head),
            "triton": fwd_bwd(lambda a, b: linear_cross_entropy_triton(a, b, labels, 4096), hid, head)}),
        ("lora add fwd+bwd", e * tokens * dim * 3, {  # y read, out written; dy read in backward
            "eager": fwd_bwd(lambda a, c, d: lora_add_reference(a, c, d, 2.0), ybase, xa, bmat),
            "compiled": fwd_bwd(torch.compile(lambda a, c, d: lora_add_reference(a, c, d, 2.0)), ybase, xa, bmat),
            "triton": fwd_bwd(lambda a, c, d: lora_add_triton(a, c, d, 2.0), ybase, xa, bmat)}),
        ("nf4 dequant -> bf16", ffn * dim // 2 + ffn * dim // 64 + 2 * ffn * dim, {
            "eager": lambda: dequantize_nf4_reference(*nf4_args),
            "compiled": (lambda f: lambda: f(*nf4_args))(torch.compile(dequantize_nf4_reference)),
            "triton": lambda: dequantize_nf4_triton(*nf4_args)}),
        ("nf4 matmul, 1 row", ffn * dim // 2 + ffn * dim // 64 + 2 * (dim + ffn), {  # codes + scales; x, y
            "eager": lambda: nf4_matmul_reference(x1, *mm_args),
            "compiled": (lambda f: lambda: f(x1, *mm_args))(torch.compile(nf4_matmul_reference)),
            "triton": lambda: nf4_matmul_triton(x1, *mm_args)}),
    ]
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name() if gpu else 'CPU'}, {tokens} tokens, dim {dim}, "
          f"ffn {ffn}, vocab {vocab}, {str(dtype).removeprefix('torch.')}")
    print(f"{'kernel':<22}{'impl':<10}{'ms':>9}{'GB/s':>9}{'of peak':>9}{'peak MiB':>10}")
    for name, nbytes, impls in cases:
        for impl, fn in impls.items():
            if impl == "triton" and not (gpu and HAS_TRITON):
                continue  # the interpreter's speed means nothing
            dt, peak = measure(fn, device, repeat)
            frac = f"{nbytes / dt / peak_bw:.0%}" if peak_bw else "-"
            print(f"{name:<22}{impl:<10}{dt * 1e3:>9.3f}{nbytes / dt / 1e9:>9.1f}{frac:>9}"
                  f"{(f'{peak:.0f}' if peak is not None else '-'):>10}")


if __name__ == "__main__":
    loss_memory() if "--loss_memory" in sys.argv else main()
