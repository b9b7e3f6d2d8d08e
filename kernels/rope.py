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
              SIGN: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr):
        # One program per (batch, head, token) row of head_dim values; SIGN = -1 rotates back (backward).
        pid = tl.program_id(0)
        t, h, b = pid % T, (pid // T) % H, pid // (T * H)
        i = tl.arange(0, BLOCK)
        live = i < HALF
        xp = x_ptr + b * xs_b + h * xs_h + t * xs_t
        x1 = tl.load(xp + i, mask=live, other=0.0).to(tl.float32)
        x2 = tl.load(xp + HALF + i, mask=live, other=0.0).to(tl.float32)
        c = tl.load(cos_ptr + b * cs_b + t * cs_t + i, mask=live, other=0.0).to(tl.float32)
        s = SIGN * tl.load(sin_ptr + b * cs_b + t * cs_t + i, mask=live, other=0.0).to(tl.float32)
        op = out_ptr + b * os_b + h * os_h + t * os_t
        tl.store(op + i, (x1 * c - x2 * s).to(out_ptr.dtype.element_ty), mask=live)
        tl.store(op + HALF + i, (x2 * c + x1 * s).to(out_ptr.dtype.element_ty), mask=live)

    def _launch(x, out, cos, sin, sign):
        B, H, T, hd = x.shape
        cos, sin = cos.contiguous(), sin.contiguous()
        _rope[(B * H * T,)](x, out, cos, sin, H, T, x.stride(0), x.stride(1), x.stride(2), out.stride(0),
                            out.stride(1), out.stride(2), cos.stride(0), cos.stride(1), SIGN=sign, HALF=hd // 2,
                            BLOCK=triton.next_power_of_2(hd // 2))
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
