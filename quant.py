"""Frozen quantized Linear layers for QLoRA-style training: NF4 (Dettmers et al. 2023, stored
exactly as bitsandbytes stores it), HQQ, int8 and ternary, each one class under one protocol
(`QuantLinear`: storage buffers, quantize, dequantize; after the NF4 functions).

    model = from_pretrained(path, device, prepare=quantize_model)   # quantize layer by layer while loading (NF4)
    quantize_model(model, "hqq", bits=3, group=64)                  # or another format
    model = load_prequantized(path, device)                         # a folder saved by transformers + bitsandbytes
    y = layer(x)                                                    # dequantize, matmul; nothing dense kept for backward

How NF4 works. A weight is cut into blocks of 64 consecutive elements (row-major). Each block is
divided by its absolute maximum, which puts it in [-1, 1], and every element becomes the index of
the nearest of 16 fixed values: NormalFloat4, the quantiles of a standard normal rescaled to
[-1, 1] with an exact zero, so that normally distributed weights use all 16 codes equally often.
Two codes are packed per byte. That is 4 bits per element plus one fp32 absmax per 64 elements
(0.5 bits). Double quantization stores the absmax values themselves in 8 bits: subtract their
mean (`offset`), cut them into blocks of 256, divide each block by its own absmax (kept in fp32)
and round to bitsandbytes' 8-bit "dynamic" code. Bits per parameter:
4 + 8/64 + 32/(64*256) = 4.127.

The bitsandbytes layout, which this file reproduces bit for bit (tests/test_quant.py checks it
against bitsandbytes when it is installed, and against bytes it produced when it is not):
    weight            uint8 [n/2]       element 2i in the high nibble of byte i, 2i+1 in the low
    absmax            uint8 [n/64]      (fp32 without double quantization)
    nested_absmax     fp32  [n/64/256]  rounded up; the last block may be short
    offset            fp32  scalar      the mean of the fp32 absmax values
    quant_map, nested_quant_map         the 16 NF4 values and the 256 dynamic values (constants here)
In a checkpoint these sit under `<module>.weight`, `<module>.weight.absmax`, ... with a JSON
tensor `<module>.weight.quant_state.bitsandbytes__nf4` holding shape, block sizes and offset.

Dequantization (kernels/nf4.py) runs as a Triton kernel on CUDA and in PyTorch elsewhere.
"""

import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import hf
from kernels import use_triton
from kernels.nf4 import dequantize_nf4, nf4_matmul_triton

# The 16 NormalFloat4 values as bitsandbytes ships them (QLoRA appendix E; 0 is exact, 8 positive
# and 7 negative quantiles so that both -1 and 1 exist).
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0])


def dynamic_code():
    """bitsandbytes' signed 8-bit "dynamic" code (Dettmers 2015, arXiv:1511.04561): for each
    decade 10**(e-6), e = 0..6, 2**e values spread evenly over [0.1, 1] of it, both signs; plus 0
    and 1. The same float32 arithmetic as bitsandbytes, so the 256 values match it bit for bit."""
    values = [0.0, 1.0]
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2
        values += (10 ** (e - 6) * mids).tolist() + (-(10 ** (e - 6)) * mids).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


DYNAMIC_CODE = dynamic_code()
_codes = {}


def codes_on(device):
    """(NF4_CODE, DYNAMIC_CODE) on a device, made once: every layer shares them."""
    device = torch.device(device)
    if device not in _codes:
        _codes[device] = (NF4_CODE.to(device), DYNAMIC_CODE.to(device))
    return _codes[device]


# -----------------------------------------------------------------------------
# Quantize


def quantize_blockwise(x, code, blocksize):
    """Each element -> index of the nearest value in `code` after dividing by its block's absmax,
    with the rounding of bitsandbytes' CUDA kernel (kQuantizeBlockwise), which made the checkpoints
    on the hub: x * (1 / absmax), then NF4's 15 thresholds (a value on one goes down), or for the
    256-value dynamic code `dynamic_nearest` below.

    Returns (codes uint8 [n], absmax fp32 [ceil(n / blocksize)]).
    """
    x = x.reshape(-1).float()
    n = x.numel()
    blocks = torch.cat([x, x.new_zeros((-n) % blocksize)]).view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).view(-1)[:n]
    if code.numel() == 256:
        return dynamic_nearest(scaled, code), absmax
    q = torch.bucketize(scaled.clamp(-1, 1), (code[:-1] + code[1:]) / 2, out_int32=True)
    return q.to(torch.uint8), absmax


def dynamic_nearest(x, code):
    """bitsandbytes' dQuantize<0> (csrc/kernels.cu), vectorized: a 7-step binary search from the
    middle of the 256 sorted values, then the nearer of the two neighbours. A value exactly between
    two codes goes to the one the search stands on, so ties break up or down depending on the path;
    bitsandbytes' CPU backend uses a 65536-bin lookup table instead and is one code off (not the
    nearest) in about 0.3% of double-quantized blocks."""
    pivot = torch.full_like(x, 127, dtype=torch.long)
    lower_pivot, upper_pivot = torch.zeros_like(pivot), torch.full_like(pivot, 255)
    lower, upper = torch.full_like(x, -1.0), torch.full_like(x, 1.0)
    val = code[pivot]
    for step in (64, 32, 16, 8, 4, 2, 1):
        right = x > val
        lower_pivot, lower = torch.where(right, pivot, lower_pivot), torch.where(right, val, lower)
        upper_pivot, upper = torch.where(right, upper_pivot, pivot), torch.where(right, upper, val)
        pivot = torch.where(right, pivot + step, pivot - step)
        val = code[pivot]
    upper = torch.where(upper_pivot == 255, code[255], upper)
    lower = torch.where(lower_pivot == 0, code[0], lower)
    right = x > val
    q = torch.where(right, torch.where(x > (upper + val) * 0.5, upper_pivot, pivot),
                    torch.where(x < (lower + val) * 0.5, lower_pivot, pivot))
    return q.to(torch.uint8)


def quantize_nf4(w, blocksize=64, double_quant=True, nested_blocksize=256, chunk=2**24):
    """A float weight -> dict(weight, absmax, nested_absmax, offset) in the bitsandbytes layout.

    `chunk` elements are quantized at a time so the fp32 temporaries stay small next to a 70B
    layer's 235M-element MLP weight.
    """
    nf4, dynamic = codes_on(w.device)
    flat = w.reshape(-1)
    chunk = chunk // blocksize * blocksize
    parts = [quantize_blockwise(flat[i:i + chunk], nf4, blocksize) for i in range(0, flat.numel(), chunk)]
    q = torch.cat([p[0] for p in parts])
    absmax = torch.cat([p[1] for p in parts])
    if q.numel() % 2:
        q = torch.cat([q, q.new_zeros(1)])
    packed = (q[0::2] << 4) | q[1::2]
    if not double_quant:
        return {"weight": packed, "absmax": absmax, "nested_absmax": None, "offset": None}
    offset = absmax.mean()
    qabsmax, nested_absmax = quantize_blockwise(absmax - offset, dynamic, nested_blocksize)
    return {"weight": packed, "absmax": qabsmax, "nested_absmax": nested_absmax, "offset": offset}


# -----------------------------------------------------------------------------
# The protocol: a frozen Linear whose weight is stored quantized


class QuantMatmul(torch.autograd.Function):
    """y = x W^T + b with W dequantized on the fly. Backward dequantizes W again instead of saving
    it, so a quantized model's weights never sit in memory densely between forward and backward. W
    is frozen: the only gradient is the input's (which LoRA needs)."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer  # the module, not its tensors: nothing is saved for backward
        return layer.matmul(x)

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.layer.dequantize(grad.dtype), None


class QuantLinear(nn.Module):
    """A frozen nn.Linear whose weight lives in buffers of some quantized format. A format is one
    subclass: its __init__ registers the storage buffers (their shapes known on the meta device, so
    the memory plan and fsdp.py see the real bytes), `quantize(w)` fills them from a float [out, in]
    weight, `dequantize(dtype)` gives the dense weight back. lora.py, fsdp.py (which shards any
    buffer, whatever its dtype) and plan.py only use this interface."""

    format = "?"

    def __init__(self, in_features, out_features, bias=False, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @property
    def shape(self):
        return torch.Size((self.out_features, self.in_features))

    align = 1  # decode(start, stop) is called with a start that is a multiple of this many weights
    chunk = 2**22  # weights decoded at a time

    def quantize(self, w):
        raise NotImplementedError

    def decode(self, start, stop):
        """fp32 values of weights start..stop of the flattened [out, in] weight."""
        raise NotImplementedError

    def dequantize(self, dtype=torch.bfloat16):
        """The dense weight, decoded about 4M weights at a time into the output: decoding makes int64
        and fp32 temporaries of 8-18 bytes per weight, which at once would be 2-4 GiB beside the
        0.44 GiB bf16 result for one of a 70B's MLP matrices (a peak no memory plan counts)."""
        n = self.in_features * self.out_features
        out = torch.empty(n, dtype=dtype, device=self.weight.device)
        step = -(-self.chunk // self.align) * self.align
        for start in range(0, n, step):
            stop = min(start + step, n)
            out[start:stop] = self.decode(start, stop)  # cast last, as one .to(dtype) would
        return out.view(self.shape)

    def matmul(self, x):
        return F.linear(x, self.dequantize(x.dtype), self.bias)

    def set_weight(self, w):
        """Quantize a float [out, in] weight into this module's buffers, on w's device."""
        if tuple(w.shape) != tuple(self.shape):
            raise ValueError(f"{type(self).__name__}: weight of shape {list(w.shape)}, expected {list(self.shape)}")
        self.quantize(w.detach())

    def forward(self, x):
        if torch.is_autocast_enabled(x.device.type):  # a custom Function is not autocast by itself
            x = x.to(torch.get_autocast_dtype(x.device.type))
        return QuantMatmul.apply(x, self)

    def bits_per_weight(self):
        return 8 * sum(b.numel() * b.element_size() for b in self.buffers(recurse=False)) / (self.in_features * self.out_features)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.format}"

    # Loading, called by hf.from_pretrained for each of this module's checkpoint tensors: a float
    # weight is quantized as it arrives and then dropped (a layer-by-layer peak).

    def checkpoint_shapes(self, prefix):
        shapes = {prefix + "weight": (self.out_features, self.in_features)}
        if self.bias is not None:
            shapes[prefix + "bias"] = (self.out_features,)
        return shapes

    def load_tensor(self, leaf, t, device, dtype, where="checkpoint"):
        if leaf == "bias":
            self.bias = nn.Parameter(t.to(device, dtype), requires_grad=False)
        elif leaf == "weight":
            self.set_weight(t.to(device))
        else:
            raise ValueError(f"{where}: unexpected tensor {leaf!r} for a {self.format} Linear")


class Linear4bit(QuantLinear):
    """NF4. Its buffers are the bitsandbytes tensors above; it also loads bitsandbytes-saved folders,
    and multiplies a few rows straight from the codes on CUDA (kernels/nf4.py)."""

    format = "nf4"

    def __init__(self, in_features, out_features, bias=False, *, blocksize=64, double_quant=True,
                 nested_blocksize=256, device=None):
        super().__init__(in_features, out_features, bias, device)
        self.blocksize, self.nested_blocksize, self.double_quant = blocksize, nested_blocksize, double_quant
        self.prequantized = False  # True: the checkpoint holds bitsandbytes tensors, not a float weight
        n = in_features * out_features
        n_blocks = math.ceil(n / blocksize)
        self.register_buffer("weight", torch.empty((n + 1) // 2, dtype=torch.uint8, device=device))
        self.register_buffer("absmax", torch.empty(n_blocks, dtype=torch.uint8 if double_quant else torch.float32, device=device))
        self.register_buffer("nested_absmax", torch.empty(math.ceil(n_blocks / nested_blocksize), device=device) if double_quant else None)
        self.register_buffer("offset", torch.zeros((), device=device) if double_quant else None)

    def quantize(self, w):
        for k, v in quantize_nf4(w, self.blocksize, self.double_quant, self.nested_blocksize).items():
            if v is not None:
                setattr(self, k, v)

    def dequantize(self, dtype=torch.bfloat16):
        nf4, dynamic = codes_on(self.weight.device)
        return dequantize_nf4(self.weight, self.absmax, nf4, self.blocksize, self.shape, dtype,
                              self.nested_absmax, dynamic, self.nested_blocksize, self.offset)

    def matmul(self, x):
        if x.numel() <= 16 * x.shape[-1] and self.in_features % self.blocksize == 0 and use_triton("nf4_matmul", x):
            nf4, dynamic = codes_on(x.device)  # few rows: read the codes once, never the dense weight
            y = nf4_matmul_triton(x, self.weight, self.absmax, nf4, self.blocksize, self.shape,
                                  self.nested_absmax, dynamic, self.nested_blocksize, self.offset)
            return y + self.bias if self.bias is not None else y
        return super().matmul(x)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4, blocksize={self.blocksize}, double_quant={self.double_quant}"

    def checkpoint_shapes(self, prefix):
        shapes = super().checkpoint_shapes(prefix)
        if self.prequantized:  # shapes of the rest depend on the block sizes in the JSON: checked later
            shapes[prefix + "weight"] = ((self.in_features * self.out_features + 1) // 2, 1)
            shapes.update({prefix + "weight." + k: None for k in ("absmax", "quant_map", "quant_state.bitsandbytes__nf4")})
            if self.double_quant:
                shapes.update({prefix + "weight." + k: None for k in ("nested_absmax", "nested_quant_map")})
        return shapes

    def load_tensor(self, leaf, t, device, dtype, where="checkpoint"):
        if not self.prequantized or leaf == "bias":
            return super().load_tensor(leaf, t, device, dtype, where)
        if leaf == "weight":
            self.weight = t.reshape(-1).to(device)
        elif leaf in ("weight.absmax", "weight.nested_absmax"):
            setattr(self, leaf.split(".")[1], t.to(device))
        elif leaf in ("weight.quant_map", "weight.nested_quant_map"):
            expected = NF4_CODE if leaf == "weight.quant_map" else DYNAMIC_CODE
            if not torch.equal(t.float().cpu(), expected):
                raise ValueError(f"{where}: {leaf} is not the standard {'NF4' if expected is NF4_CODE else 'dynamic 8-bit'} code")
        elif leaf == "weight.quant_state.bitsandbytes__nf4":
            state = json.loads(bytes(t.tolist()).decode("utf-8"))
            if list(state["shape"]) != [self.out_features, self.in_features]:
                raise ValueError(f"{where}: quant_state shape {state['shape']}, config.json implies {[self.out_features, self.in_features]}")
            self.blocksize = state["blocksize"]
            if self.double_quant:
                self.nested_blocksize = state["nested_blocksize"]
                self.offset = torch.tensor(state["nested_offset"], dtype=torch.float32, device=device)
        else:
            raise ValueError(f"{where}: unexpected tensor {leaf!r} for a 4-bit Linear")


# -----------------------------------------------------------------------------
# More formats, each one class. Codes of `bits` bits are packed 8 at a time into `bits` bytes.


def pack_bits(q, bits):
    """uint8 codes < 2**bits -> uint8 bytes, 8 codes in `bits` bytes (code i at bit bits * i)."""
    q = torch.cat([q.reshape(-1), q.new_zeros((-q.numel()) % 8)]).view(-1, 8).to(torch.int64)
    word = (q << (bits * torch.arange(8, device=q.device))).sum(dim=1)
    return ((word[:, None] >> (8 * torch.arange(bits, device=q.device))) & 0xFF).to(torch.uint8).view(-1)


def unpack_bits(packed, bits, n):
    word = (packed.view(-1, bits).to(torch.int64) << (8 * torch.arange(bits, device=packed.device))).sum(dim=1)
    return ((word[:, None] >> (bits * torch.arange(8, device=packed.device))) & (2**bits - 1)).view(-1)[:n].to(torch.uint8)


def grouped(w, group):
    """A weight -> fp32 (groups, group) of consecutive elements, the last group zero-padded."""
    flat = w.reshape(-1).float()
    return torch.cat([flat, flat.new_zeros((-flat.numel()) % group)]).view(-1, group)


class LinearInt8(QuantLinear):
    """Weight-only int8 with one absmax scale per output channel: q = round(w * 127 / max|w_row|),
    w ~ q * scale. 8 bits + 32 / in_features per weight."""

    format = "int8"

    def __init__(self, in_features, out_features, bias=False, device=None):
        super().__init__(in_features, out_features, bias, device)
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.empty(out_features, device=device))

    def quantize(self, w):
        w = w.float()
        self.scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.weight = torch.round(w / self.scale[:, None]).clamp(-127, 127).to(torch.int8)

    @property
    def align(self):  # whole rows: one scale each
        return self.in_features

    def decode(self, start, stop):
        rows = slice(start // self.in_features, -(-stop // self.in_features))
        return (self.weight[rows].float() * self.scale[rows, None]).view(-1)[:stop - start]


def hqq_zero(w, scale, zero, max_code, *, lp_norm=0.7, beta=10.0, kappa=1.01, iters=20):
    """Half-quadratic quantization's zero-point solver (Badri & Shaji 2023; mobiusml/hqq's
    optimize_weights_proximal_legacy): with the scale fixed, alternate between the quantization
    error made sparse by the l_p shrinkage operator (p < 1: a heavy-tailed error is cheap), and the
    zero point that best explains the weights given that error, in closed form (a mean per group).
    No calibration data. Returns the zero with the smallest mean absolute error seen."""
    best, best_zero = math.inf, zero
    for _ in range(iters):
        q = torch.round(w * scale + zero).clamp(0, max_code)
        r = (q - zero) / scale
        error = (w - r).abs().mean().item()
        if error >= best:
            break
        best, best_zero = error, zero
        e = w - r
        e = torch.sign(e) * F.relu(e.abs() - (1 / beta) * (e.abs() + 1e-8).pow(lp_norm - 1))
        zero = (q - (w - e) * scale).mean(dim=1, keepdim=True)
        beta *= kappa
    return best_zero


class LinearHQQ(QuantLinear):
    """HQQ: `bits`-bit codes (2, 3, 4 or 8) with a scale and a zero point per group of `group`
    consecutive weights, w ~ (q - zero) * scale; min-max initialisation, then the zero point from
    `hqq_zero`. The scale is fp16, as hqq keeps it; the zero point fp32, since -min / step overflows
    fp16 for a narrow group far from 0 (hqq's fp16 zero turns a constant group of 5.0 into inf):
    bits + 48 / group per weight."""

    format = "hqq"

    def __init__(self, in_features, out_features, bias=False, bits=4, group=64, device=None):
        super().__init__(in_features, out_features, bias, device)
        self.bits, self.group = bits, group
        n_groups = math.ceil(in_features * out_features / group)
        self.register_buffer("weight", torch.empty(math.ceil(n_groups * group / 8) * bits, dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.empty(n_groups, dtype=torch.float16, device=device))
        self.register_buffer("zero", torch.empty(n_groups, dtype=torch.float32, device=device))

    def quantize(self, w):
        g, max_code = grouped(w, self.group), 2**self.bits - 1
        lo, hi = g.amin(dim=1, keepdim=True), g.amax(dim=1, keepdim=True)
        scale = (max_code / (hi - lo)).clamp(max=2e4)  # codes per unit of weight (hqq's convention)
        scale16 = (1 / scale).half()  # stored in fp16: the codes are chosen against the stored values
        inv = 1 / scale16.float()
        zero = hqq_zero(g, inv, -lo * inv, max_code)
        q = torch.round(g * inv + zero).clamp(0, max_code).to(torch.uint8)
        self.weight, self.scale, self.zero = pack_bits(q, self.bits), scale16.view(-1), zero.view(-1)

    @property
    def align(self):  # whole groups whose codes start on a byte: 8 codes fill `bits` bytes
        return math.lcm(self.group, 8)

    def decode(self, start, stop):
        groups = slice(start // self.group, -(-stop // self.group))
        codes = (groups.stop - groups.start) * self.group
        packed = self.weight[start // 8 * self.bits:-(-(start + codes) // 8) * self.bits]
        q = unpack_bits(packed, self.bits, codes).view(-1, self.group).float()
        w = (q - self.zero[groups].float()[:, None]) * self.scale[groups].float()[:, None]
        return w.view(-1)[:stop - start]

    def extra_repr(self):
        return super().extra_repr() + f", bits={self.bits}, group={self.group}"


class LinearTernary(QuantLinear):
    """BitNet b1.58's absmean ternary weights as a frozen base: per group of `group` consecutive
    weights s = mean |w|, q = round(clamp(w / s, -1, 1)) in {-1, 0, 1}, w ~ q * s. Five ternary digits
    fit in a byte (3^5 = 243): 1.6 bits + 16 / group (the fp16 scale) per weight."""

    format = "ternary"

    def __init__(self, in_features, out_features, bias=False, group=64, device=None):
        super().__init__(in_features, out_features, bias, device)
        self.group = group
        n_groups = math.ceil(in_features * out_features / group)
        self.register_buffer("weight", torch.empty(math.ceil(n_groups * group / 5), dtype=torch.uint8, device=device))
        self.register_buffer("scale", torch.empty(n_groups, dtype=torch.float16, device=device))

    def quantize(self, w):
        g = grouped(w, self.group)
        scale = g.abs().mean(dim=1, keepdim=True).clamp(min=2**-14).half()  # fp16's smallest normal: never 0
        q = (torch.round((g / scale.float()).clamp(-1, 1)) + 1).to(torch.int64).view(-1)  # 0, 1, 2
        q = torch.cat([q, q.new_zeros((-q.numel()) % 5)]).view(-1, 5)
        self.weight = (q * 3 ** torch.arange(5, device=q.device)).sum(dim=1).to(torch.uint8)
        self.scale = scale.view(-1)

    @property
    def align(self):  # whole groups whose digits start on a byte: 5 digits fill one
        return math.lcm(self.group, 5)

    def decode(self, start, stop):
        groups = slice(start // self.group, -(-stop // self.group))
        codes = (groups.stop - groups.start) * self.group
        packed = self.weight[start // 5:-(-(start + codes) // 5)]
        digits = (packed.to(torch.int64)[:, None] // 3 ** torch.arange(5, device=packed.device)) % 3
        q = digits.view(-1)[:codes].view(-1, self.group).float() - 1
        return (q * self.scale[groups].float()[:, None]).view(-1)[:stop - start]

    def extra_repr(self):
        return super().extra_repr() + f", group={self.group}"


FORMATS = ("nf4", "hqq", "int8", "ternary")


def make_quant_linear(fmt, in_features, out_features, bias=False, *, bits=4, group=64, device=None):
    """An empty quantized Linear of format `fmt` (--quant), with --quant_bits / --quant_group where they apply."""
    if fmt == "nf4":
        return Linear4bit(in_features, out_features, bias, blocksize=group, device=device)
    if fmt == "hqq":
        return LinearHQQ(in_features, out_features, bias, bits, group, device=device)
    if fmt == "int8":
        return LinearInt8(in_features, out_features, bias, device=device)
    if fmt == "ternary":
        return LinearTernary(in_features, out_features, bias, group, device=device)
    raise ValueError(f"unknown quantization format {fmt!r}; formats are {', '.join(FORMATS)}")


def quantize_model(model, fmt="nf4", bits=4, group=64, skip=("lm_head",)):
    """Replace every nn.Linear (but those whose name ends in `skip`) by a QuantLinear of format
    `fmt`, in place. On a meta-device model (from_pretrained's `prepare`) the new modules are empty
    and get filled as the checkpoint streams in; otherwise each weight is quantized right away.
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and not name.endswith(tuple(skip)):
            q = make_quant_linear(fmt, module.in_features, module.out_features, module.bias is not None, bits=bits,
                                  group=group, device=module.weight.device)
            if module.weight.device.type != "meta":
                q.set_weight(module.weight.detach())
                if module.bias is not None:
                    q.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
            model.set_submodule(name, q)
    return model


@torch.no_grad()
def dequantize_model(model, dtype=torch.float32):
    """The inverse swap: every QuantLinear becomes an nn.Linear holding its dequantized weight."""
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantLinear):
            dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                              device=module.weight.device, dtype=dtype)
            dense.weight.copy_(module.dequantize(dtype))
            if module.bias is not None:
                dense.bias.copy_(module.bias)
            dense.requires_grad_(False)
            model.set_submodule(name, dense)
    return model


def quantization_config(path):
    """config.json's quantization_config (transformers writes it for a pre-quantized folder), or {}."""
    return hf.read_json(os.path.join(path, "config.json")).get("quantization_config") or {}


def is_prequantized(path):
    """Does this HF folder hold bitsandbytes 4-bit weights?"""
    return quantization_config(path).get("quant_method") == "bitsandbytes"


def load_prequantized(path, device="cpu", dtype=torch.float32):
    """Load a 4-bit folder saved by transformers + bitsandbytes (quantization_config in config.json)."""
    qc = quantization_config(path)
    if qc.get("quant_method") != "bitsandbytes" or not qc.get("load_in_4bit") or qc.get("bnb_4bit_quant_type", "fp4") != "nf4":
        raise ValueError(f"{path}/config.json: quantization_config is not bitsandbytes 4-bit nf4")
    quantized = {name.removesuffix(".weight.quant_state.bitsandbytes__nf4") for name in hf.safetensors_files(path)
                 if name.endswith(".weight.quant_state.bitsandbytes__nf4")}

    def prepare(model):
        for name in quantized:
            old = model.get_submodule(name)
            q = Linear4bit(old.in_features, old.out_features, old.bias is not None,
                           double_quant=qc.get("bnb_4bit_use_double_quant", False), device="meta")
            q.prequantized = True
            model.set_submodule(name, q)

    model = hf.from_pretrained(path, device, dtype, prepare=prepare)
    for name, module in model.named_modules():
        if isinstance(module, Linear4bit):
            n_blocks = math.ceil(module.in_features * module.out_features / module.blocksize)
            if module.absmax.numel() != n_blocks or (module.double_quant and module.nested_absmax.numel() != math.ceil(n_blocks / module.nested_blocksize)):
                raise ValueError(f"{path}: {name}.weight.absmax does not fit blocksize {module.blocksize}")
    return model


# -----------------------------------------------------------------------------
# Accounting


def base_bytes(model):
    """(bytes of quantized Linear tensors, their number of weights, bytes of every other frozen tensor)."""
    q_bytes, q_params, other = 0, 0, 0
    for module in model.modules():
        if isinstance(module, QuantLinear):
            q_bytes += sum(b.numel() * b.element_size() for b in module.buffers(recurse=False))
            q_params += module.in_features * module.out_features
    seen = set()
    for t in list(model.parameters()) + [b for m in model.modules() if not isinstance(m, QuantLinear) for b in m.buffers(recurse=False)]:
        if not t.requires_grad and id(t) not in seen:
            seen.add(id(t))
            other += t.numel() * t.element_size()
    return q_bytes, q_params, other
