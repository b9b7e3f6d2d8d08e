"""Rotary embedding, applied in place to q or k: for each head, the two halves (x1, x2) become
    y1 = x1 * cos - x2 * sin,        y2 = x2 * cos + x1 * sin
(Hugging Face's rotate-half layout; cos and sin are per token, from its position id, so packed
documents each start at position 0). Backward is the inverse rotation of the incoming gradient:
    dx1 = dy1 * cos + dy2 * sin,     dx2 = dy2 * cos - dy1 * sin
Nothing is saved but cos and sin, which the caller keeps anyway.
"""

import torch

from kernels import HAS_TRITON, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl


def rope_reference(x, cos, sin):
    """x (B, H, T, hd); cos, sin (B, T, hd)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None] + torch.cat((-x2, x1), dim=-1) * sin[:, None]


if HAS_TRITON:
    @triton.jit
    def _rope(x_ptr, out_ptr, cos_ptr, sin_ptr, H, T, xs_b, xs_h, xs_t, os_b, os_h, os_t, cs_b, cs_t,
              SIGN: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr, BLOCK_H: tl.constexpr):
        # One program per (batch, token): every head of that token at once, so its cos and sin are
        # read once (not once per head) and a program moves H * head_dim values, not head_dim.
        # SIGN = -1 rotates back (backward).
        pid = tl.program_id(0)
        t, b = pid % T, pid // T
        i = tl.arange(0, BLOCK)
        h = tl.arange(0, BLOCK_H)[:, None]
        live = (h < H) & (i[None, :] < HALF)
        c = tl.load(cos_ptr + b * cs_b + t * cs_t + i, mask=i < HALF, other=0.0).to(tl.float32)[None, :]
        s = SIGN * tl.load(sin_ptr + b * cs_b + t * cs_t + i, mask=i < HALF, other=0.0).to(tl.float32)[None, :]
        xp = x_ptr + b * xs_b + t * xs_t + h * xs_h + i[None, :]
        x1 = tl.load(xp, mask=live, other=0.0).to(tl.float32)
        x2 = tl.load(xp + HALF, mask=live, other=0.0).to(tl.float32)
        op = out_ptr + b * os_b + t * os_t + h * os_h + i[None, :]
        tl.store(op, (x1 * c - x2 * s).to(out_ptr.dtype.element_ty), mask=live)
        tl.store(op + HALF, (x2 * c + x1 * s).to(out_ptr.dtype.element_ty), mask=live)

    def _launch(x, out, cos, sin, sign):
        B, H, T, hd = x.shape
        cos, sin = cos.contiguous(), sin.contiguous()
        block_h, block = triton.next_power_of_2(H), triton.next_power_of_2(hd // 2)
        _rope[(B * T,)](x, out, cos, sin, H, T, x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1),
                        out.stride(2), cos.stride(0), cos.stride(1), SIGN=sign, HALF=hd // 2, BLOCK=block,
                        BLOCK_H=block_h, num_warps=min(max(block_h * block // 256, 1), 8))
        return out


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.mark_dirty(x)
        ctx.save_for_backward(cos, sin)
        return _launch(x, x, cos, sin, 1.0)  # in place: q and k need no second buffer

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _launch(dy, torch.empty_like(dy), cos, sin, -1.0), None, None


def rope_triton(x, cos, sin):
    """In place on x (B, H, T, hd), any strides with a contiguous last dimension; returns x."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    return _Rope.apply(x, cos, sin)


def rope(x, cos, sin):
    return rope_triton(x, cos, sin) if use_triton("rope", x) else rope_reference(x, cos, sin)
