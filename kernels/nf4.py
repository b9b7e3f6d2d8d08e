"""NF4 dequantization: packed 4-bit codes and blockwise scales -> a bf16 / fp16 / fp32 weight.

The layout is bitsandbytes' (quant.py explains where it comes from):
    packed   uint8 [ceil(n/2)]   two 4-bit codes per byte, element 2i in the high nibble
    absmax   one scale per `blocksize` elements: fp32, or with double quantization uint8 codes
             into `nested_code` (256 values) scaled by `nested_absmax` (fp32, one per
             `nested_blocksize` scales) plus `offset` (fp32 scalar)
    weight[e] = code[nibble e] * scale[e // blocksize]

Every product and sum is done in fp32 in the same order as bitsandbytes, so the result is bit
for bit what bitsandbytes returns; the cast to the output dtype happens last.

`dequantize_nf4` dispatches: Triton on CUDA, else `dequantize_nf4_reference`.
"""

import torch

from kernels import HAS_TRITON, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl


def block_scales_reference(absmax, nested_absmax, nested_code, nested_blocksize, offset):
    """The fp32 scale of every block: absmax itself, or decoded from its 8-bit double quantization."""
    if nested_absmax is None:
        return absmax.float()
    n = absmax.numel()
    pad = (-n) % nested_blocksize
    codes = nested_code[torch.cat([absmax, absmax.new_zeros(pad)]).int()].view(-1, nested_blocksize)
    return (codes * nested_absmax[:, None]).view(-1)[:n] + offset


def dequantize_nf4_reference(packed, absmax, code, blocksize, shape, dtype,
                             nested_absmax=None, nested_code=None, nested_blocksize=256, offset=None, chunk=2**22):
    """Written into the output `chunk` weights at a time: decoding makes int32 and fp32 temporaries
    of ~15 bytes per weight, which at once would be 3.5 GiB beside the 0.44 GiB bf16 result for
    one of a 70B's MLP matrices (a peak no memory plan counts)."""
    n = shape.numel()
    scales = block_scales_reference(absmax, nested_absmax, nested_code, nested_blocksize, offset)
    out = torch.empty(n, dtype=dtype, device=packed.device)
    step = -(-chunk // blocksize) * blocksize  # whole blocks, so an even number of codes
    for start in range(0, n, step):
        stop = min(start + step, n)
        part = packed[start // 2:(stop + 1) // 2]
        q = torch.stack((part >> 4, part & 0xF), dim=-1).view(-1)  # high nibble first
        s = scales[start // blocksize:-(-stop // blocksize)]
        q = torch.cat([q, q.new_zeros(s.numel() * blocksize - q.numel())])  # whole blocks
        out[start:stop] = (code[q.int()].view(-1, blocksize) * s[:, None]).view(-1)[:stop - start]  # cast last
    return out.view(shape)


if HAS_TRITON:
    @triton.jit
    def _block_scale(absmax_ptr, nested_ptr, nested_code_ptr, offset_ptr, block, live,
                     NESTED_BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr):
        """The fp32 scale of quantization blocks `block`, in the reference's order of operations."""
        if NESTED:
            q = tl.load(absmax_ptr + block, mask=live, other=0).to(tl.int32)
            scale = tl.load(nested_code_ptr + q) * tl.load(nested_ptr + block // NESTED_BLOCKSIZE, mask=live, other=0.0)
            scale = scale + tl.load(offset_ptr)
        else:
            scale = tl.load(absmax_ptr + block, mask=live, other=0.0)
        return scale

    @triton.jit
    def _dequantize_nf4_kernel(packed_ptr, absmax_ptr, code_ptr, nested_ptr, nested_code_ptr, offset_ptr, out_ptr,
                               n, n_bytes, BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
                               NESTED: tl.constexpr, BYTES: tl.constexpr):
        # One program turns BYTES packed bytes into 2 * BYTES outputs. Both codes of a byte share a
        # block (blocksize is even), so the block scale is decoded once per byte.
        pid = tl.program_id(0)
        i = pid * BYTES + tl.arange(0, BYTES)
        live = i < n_bytes
        byte = tl.load(packed_ptr + i, mask=live, other=0)
        scale = _block_scale(absmax_ptr, nested_ptr, nested_code_ptr, offset_ptr, i // (BLOCKSIZE // 2), live,
                             NESTED_BLOCKSIZE, NESTED)
        hi = tl.load(code_ptr + (byte >> 4).to(tl.int32)) * scale
        lo = tl.load(code_ptr + (byte & 0xF).to(tl.int32)) * scale
        out = tl.reshape(tl.join(hi, lo), (2 * BYTES,))  # interleave: hi of byte i at 2i, lo at 2i + 1
        o = 2 * pid * BYTES + tl.arange(0, 2 * BYTES)
        tl.store(out_ptr + o, out.to(out_ptr.dtype.element_ty), mask=o < n)


def dequantize_nf4_triton(packed, absmax, code, blocksize, shape, dtype,
                          nested_absmax=None, nested_code=None, nested_blocksize=256, offset=None, bytes_per_program=1024):
    n = shape.numel()
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    nested = nested_absmax is not None
    dummy = code  # an unused pointer argument still needs a tensor
    grid = (triton.cdiv(packed.numel(), bytes_per_program),)
    # enable_fp_fusion=False: a fused multiply-add would round once where bitsandbytes rounds twice.
    # num_warps=2 with 1024 bytes a program: the fastest of 512..8192 bytes x 2, 4, 8 warps on an H200
    # (42 us for a 14336 x 4096 matrix, 73% of HBM peak; 4 warps: 46 us).
    _dequantize_nf4_kernel[grid](packed, absmax, code, nested_absmax if nested else dummy,
                                 nested_code if nested else dummy, offset if nested else dummy, out, n, packed.numel(),
                                 BLOCKSIZE=blocksize, NESTED_BLOCKSIZE=nested_blocksize, NESTED=nested,
                                 BYTES=bytes_per_program, num_warps=2, enable_fp_fusion=False)
    return out


def dequantize_nf4(packed, absmax, code, blocksize, shape, dtype,
                   nested_absmax=None, nested_code=None, nested_blocksize=256, offset=None):
    fn = dequantize_nf4_triton if use_triton("nf4", packed) else dequantize_nf4_reference
    return fn(packed, absmax, code, blocksize, shape, dtype, nested_absmax, nested_code, nested_blocksize, offset)


# -----------------------------------------------------------------------------
# y = x @ W^T straight from the 4-bit codes, for a few rows of x (generation, small LoRA batches):
# dequantizing the whole W first would write and re-read it in bf16, four times the bytes of the
# codes, for a matmul that is all memory traffic anyway.


def nf4_matmul_reference(x, packed, absmax, code, blocksize, shape, nested_absmax=None, nested_code=None,
                         nested_blocksize=256, offset=None):
    w = dequantize_nf4_reference(packed, absmax, code, blocksize, shape, x.dtype, nested_absmax, nested_code,
                                 nested_blocksize, offset)
    return x @ w.t()


if HAS_TRITON:
    @triton.jit
    def _nf4_matmul_kernel(x_ptr, packed_ptr, absmax_ptr, code_ptr, nested_ptr, nested_code_ptr, offset_ptr, y_ptr,
                           M, N, K, BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
                           BM: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr, FP32_DOT: tl.constexpr):
        # Program (i, j): rows m in [i * BM, (i + 1) * BM) of x, output columns n in [j * BN, (j + 1) * BN).
        # K is walked one quantization block (BLOCKSIZE weights, one scale per output column) at a
        # time; each block of codes is read and decoded once for all BM rows (one tl.dot), so up to
        # BM rows cost what one does.
        i, j = tl.program_id(0), tl.program_id(1)
        m = i * BM + tl.arange(0, BM)
        n = j * BN + tl.arange(0, BN)
        m_live, n_live = m < M, n < N
        half, kk = tl.arange(0, BLOCKSIZE // 2), tl.arange(0, BLOCKSIZE)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BLOCKSIZE):
            scale = _block_scale(absmax_ptr, nested_ptr, nested_code_ptr, offset_ptr, (n * K + k0) // BLOCKSIZE, n_live,
                                 NESTED_BLOCKSIZE, NESTED)  # [BN]: one scale per output column
            byte = tl.load(packed_ptr + ((n * K + k0) // 2)[:, None] + half[None, :], mask=n_live[:, None], other=0)
            hi = tl.load(code_ptr + (byte >> 4).to(tl.int32))
            lo = tl.load(code_ptr + (byte & 0xF).to(tl.int32))
            w = tl.reshape(tl.join(hi, lo), (BN, BLOCKSIZE)) * scale[:, None]  # [BN, BLOCKSIZE] in fp32
            xk = tl.load(x_ptr + m[:, None] * K + k0 + kk[None, :], mask=m_live[:, None], other=0.0)
            w = w.to(x_ptr.dtype.element_ty)  # rounded to x's dtype, as the reference's dequantized weight is
            if FP32_DOT:  # the same products and fp32 sums (Triton 3.9's interpreter gets a bf16 tl.dot wrong)
                acc = tl.dot(xk.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
            else:  # fp32 x stays fp32 (no TF32)
                acc = tl.dot(xk, tl.trans(w), acc, input_precision="ieee" if IEEE else "tf32")
        tl.store(y_ptr + m[:, None] * N + n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=m_live[:, None] & n_live[None, :])


def nf4_matmul_grid(rows, n, bm=16, bn=32):
    """Programs of nf4_matmul_triton: one per BN output columns for every BM rows of x."""
    return (triton.cdiv(rows, bm), triton.cdiv(n, bn))


def nf4_matmul_triton(x, packed, absmax, code, blocksize, shape, nested_absmax=None, nested_code=None,
                      nested_blocksize=256, offset=None, bn=32, bm=16):
    """x (M, K) with K a multiple of blocksize."""
    N, K = shape
    lead = x.shape[:-1]
    x = x.reshape(-1, K).contiguous()
    y = torch.empty((*lead, N), dtype=x.dtype, device=x.device)  # not a view: callers may modify it in place
    nested = nested_absmax is not None
    dummy = code
    _nf4_matmul_kernel[nf4_matmul_grid(x.shape[0], N, bm=bm, bn=bn)](
        x, packed, absmax, code, nested_absmax if nested else dummy, nested_code if nested else dummy,
        offset if nested else dummy, y, x.shape[0], N, K, BLOCKSIZE=blocksize, NESTED_BLOCKSIZE=nested_blocksize,
        NESTED=nested, BM=bm, BN=bn, IEEE=x.dtype == torch.float32, FP32_DOT=not x.is_cuda)
    return y
