"""The LoRA update added onto the base layer's output in one pass: out = y + s * (x A^T) B^T.

PyTorch writes the adapter's [tokens, out] product, scales it, then reads it again to add it to
y (three passes over an output-sized tensor, two extra allocations). The kernel reads y once and
writes it once, computing the rank-r product tile by tile in registers. Backward is matrix
products only (dy passes through; d(xA) = s dy B; dB = s dy^T (xA)), left to PyTorch's GEMMs with
the scale folded in.
"""

import torch

from kernels import HAS_TRITON, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl


def lora_add_reference(y, xa, b, scale):
    return y + (xa @ b.t().to(xa.dtype)).to(y.dtype) * scale


if HAS_TRITON:
    @triton.jit
    def _lora_add_kernel(y_ptr, xa_ptr, b_ptr, out_ptr, M, N, R, scale, BM: tl.constexpr, BN: tl.constexpr,
                         BR: tl.constexpr):
        i = tl.program_id(0) * BM + tl.arange(0, BM)
        j = tl.program_id(1) * BN + tl.arange(0, BN)
        r = tl.arange(0, BR)
        xa = tl.load(xa_ptr + i[:, None] * R + r[None, :], mask=(i[:, None] < M) & (r[None, :] < R), other=0.0)
        b = tl.load(b_ptr + j[:, None] * R + r[None, :], mask=(j[:, None] < N) & (r[None, :] < R), other=0.0)
        # [BM, BN], rank padded to BR with zeros. "ieee": full fp32 products (the default on
        # Ampere and later would round the inputs to tf32); with a rank of 16 the dot is cheap.
        acc = tl.dot(xa.to(tl.float32), tl.trans(b.to(tl.float32)), input_precision="ieee")
        live = (i[:, None] < M) & (j[None, :] < N)
        y = tl.load(y_ptr + i[:, None] * N + j[None, :], mask=live, other=0.0).to(tl.float32)
        tl.store(out_ptr + i[:, None] * N + j[None, :], (y + scale * acc).to(out_ptr.dtype.element_ty), mask=live)


class _LoraAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, xa, b, scale):
        shape = y.shape
        y2, xa2 = y.reshape(-1, shape[-1]).contiguous(), xa.reshape(-1, xa.shape[-1]).contiguous()
        M, N, R = y2.shape[0], y2.shape[1], xa2.shape[1]
        out = torch.empty(shape, dtype=y.dtype, device=y.device)  # not a view: q and k get RoPE'd in place later
        grid = (triton.cdiv(M, 32), triton.cdiv(N, 64))
        _lora_add_kernel[grid](y2, xa2, b.contiguous(), out, M, N, R, scale, BM=32, BN=64,
                               BR=max(16, triton.next_power_of_2(R)))
        ctx.save_for_backward(xa2, b)
        ctx.scale, ctx.xa_shape = scale, xa.shape
        return out

    @staticmethod
    def backward(ctx, dy):
        xa2, b = ctx.saved_tensors
        # In dy's dtype: an fp32 copy of the output gradient would be the largest tensor here; the
        # matmuls sum their products in fp32 all the same (as autocast's reference does).
        dy2 = dy.reshape(-1, dy.shape[-1])
        d_xa = (dy2 @ b.to(dy2.dtype)).mul_(ctx.scale).to(xa2.dtype).view(ctx.xa_shape)
        d_b = (dy2.t() @ xa2.to(dy2.dtype)).float().mul_(ctx.scale).to(b.dtype)
        return dy, d_xa, d_b, None


def lora_add_triton(y, xa, b, scale):
    return _LoraAdd.apply(y, xa, b, float(scale))


def lora_add(y, xa, b, scale):
    return lora_add_triton(y, xa, b, scale) if use_triton("lora", y) else lora_add_reference(y, xa, b, scale)
