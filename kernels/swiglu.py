"""SwiGLU: h = silu(gate) * up, the product inside Llama's MLP.

Backward, with s = sigmoid(gate):
    d_gate = dh * up * s * (1 + gate * (1 - s))        d_up = dh * gate * s
The kernel saves only gate and up (the matmuls' outputs, kept anyway) and recomputes s in backward
instead of keeping silu(gate) and the product.
"""

import torch
import torch.nn.functional as F

from kernels import HAS_TRITON, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl


def swiglu_reference(gate, up):
    return F.silu(gate) * up


if HAS_TRITON:
    @triton.jit
    def _swiglu_forward(g_ptr, u_ptr, h_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        live = i < n
        g = tl.load(g_ptr + i, mask=live, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + i, mask=live, other=0.0)
        silu = (g * tl.sigmoid(g)).to(u.dtype)  # rounded to the input dtype as F.silu would be
        tl.store(h_ptr + i, silu * u, mask=live)

    @triton.jit
    def _swiglu_backward(dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        live = i < n
        dh = tl.load(dh_ptr + i, mask=live, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + i, mask=live, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + i, mask=live, other=0.0).to(tl.float32)
        s = tl.sigmoid(g)
        tl.store(dg_ptr + i, (dh * u * s * (1 + g * (1 - s))).to(dg_ptr.dtype.element_ty), mask=live)
        tl.store(du_ptr + i, (dh * g * s).to(du_ptr.dtype.element_ty), mask=live)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        h = torch.empty_like(up)
        n = h.numel()
        _swiglu_forward[(triton.cdiv(n, 1024),)](gate, up, h, n, BLOCK=1024)
        ctx.save_for_backward(gate, up)
        return h

    @staticmethod
    def backward(ctx, dh):
        gate, up = ctx.saved_tensors
        dg, du = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        _swiglu_backward[(triton.cdiv(n, 1024),)](dh.contiguous(), gate, up, dg, du, n, BLOCK=1024)
        return dg, du


def swiglu_triton(gate, up):
    return _SwiGLU.apply(gate, up)


def swiglu(gate, up):
    return swiglu_triton(gate, up) if use_triton("swiglu", gate) and gate.dtype == up.dtype else swiglu_reference(gate, up)
