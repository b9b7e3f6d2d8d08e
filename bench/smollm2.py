"""SmolLM2-135M-Instruct, the real checkpoint: NF4 quality, and the cost of a training step.

    python bench/smollm2.py [--model=PATH] [--quality_only=1] [--nf4_only=1]   # PATH: what ../shared/models/smollm2.sh prints

1. Perplexity of the answer tokens of the last 64 GSM8K records (ChatML: user turn, assistant
   turn, no system turn; the answer, its <|im_end|> and newline are scored), with the base in fp32
   and in each quantized format (every Linear but lm_head): NF4 with double quantization, HQQ at
   4, 3 and 2 bits, int8, ternary. The issue's reference, measured with bitsandbytes on the same
   recipe: fp32 3.89 -> NF4 4.78, ratio 1.23.
2. One training step (forward, backward, AdamW) of full fine-tuning, LoRA and QLoRA (rank 16, all
   linear layers) at context 512, batch 4, packed GSM8K: time, tokens/s and peak memory (GPU:
   max_memory_allocated; CPU: the peak resident set of a fresh process, which includes ~0.4 GiB of
   Python and torch). On the CPU each kind runs twice: with glibc's default allocator, whose
   adaptive mmap threshold keeps freed per-layer temporaries (QLoRA's dequantized weights) in the
   heap, and with MALLOC_MMAP_THRESHOLD_=131072, which hands them back at once (a little slower).
"""

import json
import math
import os
import resource
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import hf  # noqa: E402
import data as D  # noqa: E402
import lora as L  # noqa: E402
import quant as Q  # noqa: E402

GSM8K = os.path.join(os.path.dirname(ROOT), "shared", "data", "gsm8k_train_alpaca.json")


@torch.no_grad()
def answer_perplexity(model, tok, records, autocast=None):
    """exp(mean loss over the answer tokens of all records), one record at a time (no padding)."""
    total, n = 0.0, 0
    for rec in records:
        segments = D.chat_segments(D.chat_turns(rec, "gsm8k"), "chatml")
        ids, mask = D.tokenize_segments(tok, segments, add_eos=False)
        x = torch.tensor([ids], device=model.inv_freq.device)
        labels = torch.tensor([ids[1:] + [-100]], device=x.device)
        labels[0, :-1][~torch.tensor(mask[1:], dtype=torch.bool, device=x.device)] = -100
        with autocast or torch.autocast(x.device.type, enabled=False):
            s, k = model(x, labels=labels)
        total, n = total + s.item(), n + k
    return math.exp(total / n)


def step_row(path, kind, device):
    """Run in a fresh process per kind (so the CPU peak resident set is this kind's)."""
    tok = D.load_tokenizer(path, eos_id=2)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda and kind != "full" else torch.float32
    model = hf.from_pretrained(path, device, dtype, prepare=Q.quantize_model if kind == "qlora" else None)
    if kind != "full":
        L.add_lora(model, rank=16, alpha=32, targets="all-linear", generator=torch.Generator().manual_seed(0))
    data = D.load_documents(GSM8K, tok, fmt="chatml")
    loader = D.Batches(data, range(len(data)), 512, 4, tok.pad_id)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)
    times, tokens = [], 0
    for i in range(4):
        b = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in next(loader).items()}
        n_real = b.pop("num_tokens")
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        with autocast:
            s, n = model(**b)
        (s / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i > 0:  # the first step warms up
            times.append(time.perf_counter() - t)
            tokens += n_real
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"kind": kind, "ms": 1e3 * sum(times) / len(times), "tok_s": tokens / sum(times), "peak_gib": peak}


def main(argv):
    opts = dict(a[2:].split("=", 1) for a in argv)
    path = opts.get("model") or subprocess.run(["bash", os.path.join(os.path.dirname(ROOT), "shared", "models", "smollm2.sh")],
                                                capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if "kind" in opts:  # child process: one step row as JSON
        print(json.dumps(step_row(path, opts["kind"], device)))
        return
    print(f"SmolLM2-135M-Instruct ({path}), torch {torch.__version__}, "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}")
    tok = D.load_tokenizer(path, eos_id=2)
    records = json.load(open(GSM8K))[-64:]
    p32 = answer_perplexity(hf.from_pretrained(path, device), tok, records)
    print("\n1. Answer perplexity, last 64 GSM8K records, ChatML, every Linear but lm_head quantized "
          "(reference: bitsandbytes NF4 3.89 -> 4.78, x1.23)")
    print(f"   {'base':<34}{'bits/weight':>12}{'perplexity':>12}{'ratio':>10}")
    print(f"   {'fp32':<34}{32:>12.3f}{p32:>12.3f}{1:>10.3f}")
    formats = [("nf4", 4, 64, "NF4 + double quantization")] + ([] if "nf4_only" in opts else [
        ("hqq", 4, 64, "HQQ 4-bit, group 64"), ("hqq", 3, 64, "HQQ 3-bit, group 64"), ("hqq", 2, 16, "HQQ 2-bit, group 16"),
        ("int8", 8, 0, "int8 per output channel"), ("ternary", 2, 64, "ternary (b1.58), group 64")])
    for fmt, bits, group, name in formats:
        model = hf.from_pretrained(path, device, prepare=lambda m: Q.quantize_model(m, fmt, bits, group or 64))
        q_bytes, q_params, _ = Q.base_bytes(model)
        p = answer_perplexity(model, tok, records)
        print(f"   {name:<34}{8 * q_bytes / q_params:>12.3f}{p:>12.3f}{p / p32:>10.3f}", flush=True)
        del model
    if "quality_only" in opts:
        return
    print("\n2. One training step, context 512, batch 4, packed GSM8K, rank 16 on all linear layers")
    print(f"   {'':<6}{'allocator':<24}{'ms/step':>9}{'tok/s':>9}{'peak GiB':>10}")
    allocators = [("default", {})] + ([("mmap threshold 128 KiB", {"MALLOC_MMAP_THRESHOLD_": "131072"})]
                                      if device.type == "cpu" else [])
    for kind in ("full", "lora", "qlora"):
        for name, env in allocators:
            out = subprocess.run([sys.executable, __file__, f"--model={path}", f"--kind={kind}"], capture_output=True,
                                 text=True, check=True, env={**os.environ, **env}).stdout.strip().splitlines()[-1]
            r = json.loads(out)
            print(f"   {kind:<6}{name:<24}{r['ms']:>9.0f}{r['tok_s']:>9.0f}{r['peak_gib']:>10.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
