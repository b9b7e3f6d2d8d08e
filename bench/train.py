"""End-to-end training steps: tokens/s, MFU and peak memory for full, LoRA and QLoRA, with every
Triton kernel on, with all off, and with each one off alone.

    python bench/train.py                          # GPU: llama3-8b shapes cut to --layers=4; CPU: tiny
    python bench/train.py --model=tinyllama-1.1b --layers=0 --seq_len=2048 --batch_size=4

Random weights, nothing downloaded; one micro-batch per step, AdamW, activation checkpointing,
loss in 4096-token chunks. MFU counts the FLOPs a step needs (plan.flops_per_token): per weight
and token 2 (forward) + 2 (input gradient) + 2 (weight gradient), where a frozen base weight under
LoRA/QLoRA needs no weight gradient (4, not 6), plus 6 per adapter weight, plus attention
12 * layers * seq_len * heads * head_dim; divided by the GPU's dense bf16 peak. On CPU the table
has tokens/s only (the kernels run only on CUDA, so the rows there are all the reference).
"""

import dataclasses
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kernels as K  # noqa: E402
import lora as L  # noqa: E402
import model as M  # noqa: E402
import quant as Q  # noqa: E402
import plan  # noqa: E402


def step_stats(args, kind, device, batch_size, seq_len, steps=3):
    torch.manual_seed(0)
    with torch.device(device):
        model = M.Llama(args)
        model.init_weights()
    if device.type == "cuda" and kind != "full":
        model.to(torch.bfloat16)
    if kind == "qlora":
        Q.quantize_model(model)
    if kind != "full":
        L.add_lora(model, rank=16, alpha=32, targets="all-linear", generator=torch.Generator().manual_seed(0))
    model.gradient_checkpointing = True
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    x = torch.randint(0, args.vocab_size, (batch_size, seq_len), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        with autocast:
            s, n = model(x, labels=x, loss_chunk=4096)
        (s / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / steps
    adapters = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    flops = plan.flops_per_token(args, seq_len, kind != "full", adapters)
    peak = plan.peak_flops(device)
    tok_s = batch_size * seq_len / dt
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return tok_s, (tok_s * flops / peak if peak else None), mem


def main(argv):
    opts = dict(a[2:].split("=", 1) for a in argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    preset = opts.get("model", "llama3-8b" if gpu else "tiny")
    args = dataclasses.replace(M.MODELS[preset])
    layers = int(opts.get("layers", 4 if gpu else 0))
    if layers:
        args.n_layers = layers
    B, T = int(opts.get("batch_size", 2 if gpu else 4)), int(opts.get("seq_len", 2048 if gpu else 256))
    settings = [("all kernels", set()), ("all reference (--kernels=torch)", set(K.NAMES))]
    settings += [(f"{k} off", {k}) for k in K.NAMES]
    print(f"{preset} ({args.n_layers} layers), {B} x {T} tokens, torch {torch.__version__}, "
          f"{torch.cuda.get_device_name() if gpu else 'CPU'}")
    print(f"{'':<8}{'kernels':<34}{'tok/s':>10}{'MFU':>8}{'peak GiB':>10}")
    for kind in ("full", "lora", "qlora"):
        for name, off in settings if gpu else settings[:1]:
            K.select("triton", off)
            tok_s, mfu, mem = step_stats(args, kind, device, B, T)
            print(f"{kind:<8}{name:<34}{tok_s:>10,.0f}{(f'{mfu:.1%}' if mfu else '-'):>8}"
                  f"{(f'{mem:.2f}' if mem else '-'):>10}")


if __name__ == "__main__":
    main(sys.argv[1:])
