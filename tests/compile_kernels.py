"""Compile every Triton kernel for real GPUs, on a machine without one (run by tests/test_kernels.py).

    python tests/compile_kernels.py [--arch=90,86]

Triton's interpreter (what the CPU tests run) accepts programs the GPU compiler rejects, so this
compiles each kernel ahead of time down to a cubin with Triton's own compiler and ptxas, for the
given CUDA architectures (90: H100/H200, 86: RTX 3090 / A10, 80: A100, 89: RTX 4090). The
argument types and constants are the ones the kernels' Python wrappers really launch with: the
wrappers run on CPU tensors with a launch that records its arguments instead of running. Prints
registers, spilled bytes (LOCAL) and shared memory per kernel; exits 1 if any compile fails.
"""
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # must happen before triton.jit runs: real JITFunctions
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

LAUNCHES = []  # (kernel, {parameter name: value}, launch options)


def record(self, *args, grid, warmup, **kwargs):
    names = [p.name for p in self.params]
    values = dict(zip(names, args))
    values.update({k: v for k, v in kwargs.items() if k in names})
    LAUNCHES.append((self, values, {k: v for k, v in kwargs.items() if k not in names}))


JITFunction.run = record

TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.uint8: "u8", torch.int8: "i8",
         torch.int32: "i32", torch.int64: "i64", torch.bool: "i1"}


def type_of(v):
    if isinstance(v, torch.Tensor):
        return "*" + TYPES[v.dtype]
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        return "i32" if -2**31 <= v < 2**31 else "i64"
    return "fp32"


def resource_usage(cubin):
    """REG, LOCAL (bytes of spilled registers) and SHARED of a cubin, read by cuobjdump (shipped with Triton)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
    line = next(line for line in out.splitlines() if "REG:" in line)
    return {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}


def launch_everything():
    """Each wrapper forward and backward at Llama-like shapes, in bf16 and fp32."""
    from kernels.linear_ce import linear_cross_entropy_triton
    from kernels.lora import lora_add_triton
    from kernels.nf4 import dequantize_nf4_triton, nf4_matmul_triton
    from kernels.rmsnorm import rms_norm_triton
    from kernels.rope import rope_triton
    from kernels.swiglu import swiglu_triton
    import quant as Q
    for dt in (torch.bfloat16, torch.float32):
        x = torch.zeros(2, 8, 4096, dtype=dt, requires_grad=True)
        rms_norm_triton(x, torch.ones(4096, dtype=dt, requires_grad=True), 1e-5).sum().backward()
        g, u = torch.zeros(2, 8, 14336, dtype=dt, requires_grad=True), torch.zeros(2, 8, 14336, dtype=dt, requires_grad=True)
        swiglu_triton(g, u).sum().backward()
        q = torch.zeros(2, 8, 32, 128, dtype=dt).transpose(1, 2).requires_grad_(True)  # (B, H, T, hd) as attention makes it
        cos = torch.zeros(2, 8, 128, dtype=dt)
        rope_triton(q.clone(), cos, cos).sum().backward()
        y, xa = torch.zeros(16, 4096, dtype=dt, requires_grad=True), torch.zeros(16, 16, dtype=dt, requires_grad=True)
        lora_add_triton(y, xa, torch.zeros(4096, 16, dtype=torch.float32, requires_grad=True), 2.0).sum().backward()
        h, w = torch.zeros(64, 4096, dtype=dt, requires_grad=True), torch.zeros(128256, 4096, dtype=dt, requires_grad=True)
        linear_cross_entropy_triton(h, w, torch.zeros(64, dtype=torch.long), 32).backward()
        weight = torch.randn(256, 512)
        for nested in (True, False):
            qt = Q.quantize_nf4(weight, double_quant=nested)
            args = (qt["weight"], qt["absmax"], Q.NF4_CODE, 64, weight.shape)
            extra = (qt["nested_absmax"], Q.DYNAMIC_CODE, 256, qt["offset"]) if nested else ()
            dequantize_nf4_triton(*args, dt, *extra)
            nf4_matmul_triton(torch.zeros(4, 512, dtype=dt), *args, *extra)


def main(argv):
    archs = [int(a) for a in dict(x[2:].split("=", 1) for x in argv).get("arch", "90").split(",")]
    launch_everything()
    failures, seen = 0, set()
    print(f"{'kernel':<26}{'signature':<44}{'arch':>5}{'regs':>6}{'spill B':>8}{'smem B':>8}")
    for fn, values, opts in LAUNCHES:
        constexprs = {p.name: values[p.name] for p in fn.params if p.is_constexpr}
        if "FP32_DOT" in constexprs:  # the wrappers ran on CPU tensors: compile what a CUDA tensor launches
            constexprs["FP32_DOT"] = False
        signature = {p.name: "constexpr" if p.is_constexpr else type_of(values[p.name]) for p in fn.params}
        types = ",".join(t for t in signature.values() if t != "constexpr")
        key = (fn.__name__, types, tuple(sorted(constexprs.items())))
        if key in seen:
            continue
        seen.add(key)
        for arch in archs:
            try:
                k = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", arch, 32),
                                   options={k: v for k, v in opts.items() if k in ("num_warps", "num_stages", "enable_fp_fusion")})
                use = resource_usage(k.asm["cubin"])
                print(f"{fn.__name__:<26}{types[:43]:<44}{arch:>5}{use['REG']:>6}{use['LOCAL']:>8}{use['SHARED']:>8}")
            except Exception as e:  # report every failure, not just the first
                failures += 1
                print(f"{fn.__name__:<26}{types[:43]:<44}{arch:>5}  FAILED: {str(e).splitlines()[0][:200]}")
    print(f"compiled {len(seen)} kernel variants for sm_{', sm_'.join(map(str, archs))}; {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
