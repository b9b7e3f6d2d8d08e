"""What NF4 buys and costs: base bytes, dequantization speed, and a QLoRA step against a LoRA step.

    python bench/quant.py                       # GPU: Llama-2-7B shapes; CPU: small shapes, same tables
    python bench/quant.py --model=tinyllama-1.1b --seq_len=1024 --batch_size=4

Three tables, random weights, nothing downloaded:
1. Bytes of the frozen base of a Llama-2-7B-shaped stack: bf16 against NF4 with double quantization
   (exact, from the tensors' shapes: the stack is built on the meta device).
2. Dequantization throughput of one Llama-2-7B block's seven weights: the PyTorch reference against
   the Triton kernel (GPU only). GB/s counts the bytes read (codes and scales) plus written (bf16).
3. One training step (forward, backward, AdamW) of LoRA on a bf16 base against QLoRA on an NF4 base:
   time and peak GPU memory.
4. Every format's PyTorch dequantization of one 14336 x 4096 weight to bf16, a chunk of 4M weights
   at a time (QuantLinear.dequantize) against the whole weight at once: time and peak bytes per
   weight (GPU: max_memory_allocated; CPU: the allocator's records, bench/memory.py).
"""

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lora as L  # noqa: E402
import model as M  # noqa: E402
import quant as Q  # noqa: E402
from kernels import HAS_TRITON  # noqa: E402
from kernels.nf4 import dequantize_nf4_reference, dequantize_nf4_triton  # noqa: E402

HBM_PEAK = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.0e12}  # bytes/s, SXM parts


def timed(fn, repeat):
    fn()  # warm-up (and Triton compilation)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / repeat


def table(title, header, rows):
    print(f"\n{title}")
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    for r in [header, ["-" * w for w in widths]] + rows:
        print("  ".join(str(c).rjust(w) for c, w in zip(r, widths)))


def base_bytes_table():
    args = M.MODELS["llama2-7b"]
    with torch.device("meta"):
        model = M.Llama(args)
        dense = sum(p.numel() for p in model.parameters()) * 2
        Q.quantize_model(model)  # on meta: shapes only
    q_bytes, q_params, _ = Q.base_bytes(model)
    other = sum(p.numel() for p in model.parameters()) * 2  # embeddings, norms, lm_head stay bf16
    rows = [["bf16", f"{dense / 2**30:.2f}", "16.000", "-"],
            ["nf4 + double quant", f"{(q_bytes + other) / 2**30:.2f}", f"{8 * q_bytes / q_params:.3f}",
             f"{(q_bytes + other) / dense:.1%}"]]
    table("1. Frozen base of llama2-7b (32 blocks; embeddings, norms and lm_head stay bf16)",
          ["storage", "GiB", "bits/weight (Linear)", "of bf16"], rows)


def dequant_table(device, small):
    args = M.MODELS["llama2-7b"]
    shapes = [(args.dim, args.dim)] * 4 + [(args.ffn_dim, args.dim)] * 2 + [(args.dim, args.ffn_dim)]
    if small:  # CPU: a slice of the block, so the run takes seconds
        shapes = [(s[0] // 8, s[1] // 8) for s in shapes]
    nf4, dynamic = Q.codes_on(device)
    torch.manual_seed(0)
    layers = [Q.quantize_nf4(torch.randn(s, device=device, dtype=torch.bfloat16) * 0.02) for s in shapes]
    n = sum(a * b for a, b in shapes)
    traffic = sum(q["weight"].numel() + q["absmax"].numel() + 4 * q["nested_absmax"].numel() for q in layers) + 2 * n

    def run(fn):
        for q, s in zip(layers, shapes):
            fn(q["weight"], q["absmax"], nf4, 64, torch.Size(s), torch.bfloat16, q["nested_absmax"], dynamic, 256, q["offset"])

    rows = []
    impls = [("reference (PyTorch)", dequantize_nf4_reference)]
    if device.type == "cuda" and HAS_TRITON:
        impls.append(("Triton", dequantize_nf4_triton))
    peak = next((v for k, v in HBM_PEAK.items() if device.type == "cuda" and k in torch.cuda.get_device_name()), None)
    for name, fn in impls:
        t = timed(lambda: run(fn), 3 if small else 20)
        gbs = traffic / t / 1e9
        rows.append([name, f"{t * 1e3:.2f}", f"{gbs:.1f}", f"{traffic / t / peak:.0%}" if peak else "-"])
    table(f"2. Dequantize one llama2-7b block{' (1/64 of it: CPU)' if small else ''}, {n / 1e6:.1f}M weights "
          f"-> bf16 on {device.type}", ["implementation", "ms", "GB/s", "of HBM peak"], rows)


def step_table(device, preset, seq_len, batch_size):
    rows = []
    for kind in ("lora", "qlora"):
        torch.manual_seed(0)
        with torch.device(device):
            model = M.Llama(M.MODELS[preset])
            model.init_weights()
        if device.type == "cuda":
            model.to(torch.bfloat16)  # the frozen base in bf16; adapters are made fp32 below
        if kind == "qlora":
            Q.quantize_model(model)
        L.add_lora(model, rank=16, alpha=32, targets="all-linear")
        model.gradient_checkpointing = True
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        x = torch.randint(0, model.args.vocab_size, (batch_size, seq_len), device=device)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

        def step():
            with autocast:
                s, n = model(x, labels=x, loss_chunk=1024)
            (s / n).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t = timed(step, 3)
        q_bytes, _, other = Q.base_bytes(model)
        base = q_bytes + other  # every frozen tensor: NF4 buffers, and bf16/fp32 weights
        peak = f"{torch.cuda.max_memory_allocated() / 2**30:.2f}" if device.type == "cuda" else "-"
        rows.append([kind, f"{t * 1e3:.0f}", f"{batch_size * seq_len / t:,.0f}", f"{base / 2**30:.3f}", peak])
    table(f"3. One step of {preset}, {batch_size} x {seq_len} tokens, rank 16 on all linear layers, activation "
          f"checkpointing, on {device.type}", ["", "ms/step", "tok/s", "frozen base GiB", "peak GiB"], rows)


def decode_table(device):
    from memory import peak_above  # bench/memory.py

    out_f, in_f = 14336, 4096
    n, w, rows = out_f * in_f, torch.randn(out_f, in_f, device=device) * 0.02, []
    for fmt, bits in (("nf4", 4), ("hqq", 4), ("hqq", 3), ("int8", 8), ("ternary", 2)):
        q = Q.make_quant_linear(fmt, in_f, out_f, bits=bits, group=64, device=device)
        q.set_weight(w)
        row = [f"{fmt} {bits}-bit"]
        for chunk in (Q.QuantLinear.chunk, n):
            if fmt == "nf4":  # the PyTorch reference (the Triton kernel has no temporaries)
                nf4, dynamic = Q.codes_on(device)
                fn = lambda: dequantize_nf4_reference(q.weight, q.absmax, nf4, 64, q.shape, torch.bfloat16,  # noqa: E731
                                                      q.nested_absmax, dynamic, 256, q.offset, chunk=chunk)
            else:
                q.chunk = chunk
                fn = lambda: q.dequantize(torch.bfloat16)  # noqa: E731
            row += [f"{timed(fn, 3) * 1e3:.0f}", f"{peak_above(fn, device) / n:.1f}"]
        rows.append(row)
    table(f"4. Dequantizing one {out_f} x {in_f} weight to bf16 in PyTorch (the result alone: 2 bytes per weight)",
          ["format", "chunked ms", "bytes/weight", "whole ms", "bytes/weight"], rows)


def main(argv):
    opts = dict(a[2:].split("=", 1) for a in argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    small = device.type == "cpu"
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}")
    base_bytes_table()
    dequant_table(device, small)
    step_table(device, opts.get("model", "tiny" if small else "tinyllama-1.1b"),
               int(opts.get("seq_len", 256 if small else 2048)), int(opts.get("batch_size", 4)))
    decode_table(device)


if __name__ == "__main__":
    main(sys.argv[1:])
