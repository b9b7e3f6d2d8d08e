"""This project against transformers + PEFT (+ bitsandbytes for QLoRA on a GPU): the same HF folder,
the same batch, one training step at a time, side by side in one run.

    python bench/compare.py --model=<HF folder> [--batch_size=2] [--seq_len=512] [--steps=3]
                            [--kinds=full,lora,qlora] [--lora_rank=16] [--keep_freed_memory=1]

Each side runs at its best setting on this device, printed in the table:
- ours: train.py's --precision=auto (bf16 autocast with fp32 master weights and a bf16 frozen base
  where the device multiplies bf16 natively: CUDA, or a CPU with AMX / AVX512-BF16; else fp32),
  the Triton kernels on CUDA, ddp.Replicated, fused AdamW;
- transformers + PEFT: bf16 autocast where ours uses it (same precision), the frozen base loaded
  in bf16 for LoRA, fp32 master weights for full fine-tuning, SDPA attention, fused AdamW (as ours);
  QLoRA through bitsandbytes' 4-bit Linear, on a GPU only (its CPU backend is not its product).
On a CPU both sides run with build.keep_freed_memory (glibc keeps freed blocks for reuse instead
of page-faulting them in afresh each step), which speeds both up; --keep_freed_memory=0 runs both
with glibc's defaults.
LoRA targets every linear layer but the head, rank --lora_rank, alpha 2 * rank, no dropout.
A row whose library is not installed is skipped with a note: none of them is a dependency.

Tokens/s is the median over --steps timed steps after one warm-up step (forward, backward, AdamW).
Peak memory: on CUDA torch.cuda.max_memory_allocated over the timed steps; on CPU the growth of
this process's peak resident set (VmHWM, reset through /proc/self/clear_refs) from before the model
was built, so it counts weights, optimizer state and activations. Each side runs in a fresh process
(`--one=ours:lora` prints one JSON line), so neither inherits the other's allocator state.
"""

import gc
import importlib.util
import json
import os
import subprocess
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import hf  # noqa: E402
import optim  # noqa: E402
import build as B  # noqa: E402
import train  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def rss_peak_kib():
    return int(dict(line.split(":", 1) for line in open("/proc/self/status"))["VmHWM"].split()[0])


def reset_peak(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := current RSS
    return rss_peak_kib() * 1024


def peak_since(device, start):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() - start
    return rss_peak_kib() * 1024 - start


def step_times(step, device, *, warmup, steps):
    """Seconds of each of `steps` calls of step(), after `warmup` calls, each synchronized
    (bench/gpu.py and bench/fsdp.py time with it too)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        sync(device)
        t = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t)
    return times


def measure(build, device, steps, tokens):
    """(tokens/s, peak bytes) of step() from build() -> step."""
    start = reset_peak(device)
    step = build()
    times = step_times(step, device, warmup=1, steps=steps)  # warm-up: compilation, where there is any
    peak = peak_since(device, start)
    del step
    gc.collect()
    return tokens / statistics.median(times), peak


def ours(path, kind, device, batch, rank):
    """train.py's own pieces at --precision=auto."""
    cfg = train.parse_args([f"--model={path}", f"--train_type={kind}", f"--lora_rank={rank}", f"--lora_alpha={2 * rank}",
                            "--lr=1e-5", "--beta2=0.999"])
    d = train.Dist(0, 0, 1, device)

    def build():
        model, *_ = B.build_model(cfg, d)
        engine = B.make_engine(model, cfg, d)
        opt = optim.make_optimizer(engine, cfg)

        def step():
            engine.forward_backward(batch, loss_scale=1 / batch["labels"].numel())
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step
    return build, ("bf16 autocast" if B.uses_bf16(cfg, device.type) else "fp32")


def theirs(path, kind, device, batch, rank, bf16):
    """transformers (+ PEFT, + bitsandbytes for QLoRA)."""
    from transformers import AutoModelForCausalLM

    def build():
        kw = {"attn_implementation": "sdpa"}
        if kind == "qlora":
            from transformers import BitsAndBytesConfig
            kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_use_double_quant=True,
                                                           bnb_4bit_compute_dtype=torch.bfloat16)
        base_dtype = torch.bfloat16 if kind != "full" and bf16 else torch.float32
        model = AutoModelForCausalLM.from_pretrained(path, dtype=base_dtype, **kw).to(device)
        if kind != "full":
            from peft import LoraConfig, get_peft_model
            model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                     target_modules="all-linear"))
            for p in model.parameters():
                if p.requires_grad:
                    p.data = p.data.float()  # fp32 adapters, as ours
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
        ids = batch["input_ids"]

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step
    return build


def missing(kind, device):
    """Why the reference row cannot run here, or None."""
    need = ["transformers"] + (["peft"] if kind != "full" else []) + (["bitsandbytes"] if kind == "qlora" else [])
    absent = [m for m in need if importlib.util.find_spec(m) is None]
    if absent:
        return f"{' + '.join(absent)} not installed"
    if kind == "qlora" and device.type != "cuda":
        return "bitsandbytes' 4-bit training is measured on a GPU only"
    return None


def one(opts, side, kind, device):
    """Measure one side of one kind in this process: {"tok_s", "peak", "setting"}."""
    B, T, steps = int(opts.get("batch_size", 2)), int(opts.get("seq_len", 512)), int(opts.get("steps", 3))
    rank = int(opts.get("lora_rank", 16))
    vocab = hf.read_hf_config(opts["model"]).vocab_size
    ids = torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(0)).to(device)
    batch = {"input_ids": ids, "labels": torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1)}
    build, setting = ours(opts["model"], kind, device, batch, rank)
    if side == "theirs":
        bf16 = setting.startswith("bf16")
        build = theirs(opts["model"], kind, device, batch, rank, bf16)
        setting = ("bf16 autocast" if bf16 else "fp32") + (", bf16 base" if kind != "full" and bf16 else "")
    if device.type == "cpu" and opts.get("keep_freed_memory", "1") == "1":  # train.py's setting, for both sides
        B.keep_freed_memory()
    tok_s, peak = measure(build, device, steps, B * T)
    return {"tok_s": tok_s, "peak": peak, "setting": setting}


def main(argv):
    opts = dict(a[2:].split("=", 1) for a in argv if a.startswith("--"))
    if "model" not in opts:
        sys.exit("usage: python bench/compare.py --model=<HF Llama folder> [--batch_size=2 --seq_len=512 --steps=3]")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if "one" in opts:
        side, kind = opts["one"].split(":")
        print(json.dumps(one(opts, side, kind, device)))
        return

    def run(side, kind):
        args = [a for a in argv if not a.startswith("--one=")] + [f"--one={side}:{kind}"]
        r = subprocess.run([sys.executable, os.path.abspath(__file__), *args], capture_output=True, text=True)
        if r.returncode:
            return None, r.stderr.strip().splitlines()[-1]
        return json.loads(r.stdout.strip().splitlines()[-1]), None

    B, T = int(opts.get("batch_size", 2)), int(opts.get("seq_len", 512))
    rows = []
    for kind in opts.get("kinds", "full,lora,qlora").split(","):
        mine, err = run("ours", kind)
        if mine is None:
            sys.exit(f"ours, {kind}: {err}")
        why = missing(kind, device)
        ref, err = (None, why) if why else run("theirs", kind)
        rows.append((kind, mine, ref, err or (ref or {}).get("setting")))

    dev = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{opts['model']}, {B} x {T} tokens, one optimizer step, {dev}, torch {torch.__version__}")
    print(f"{'kind':<7}{'ours tok/s':>11}{'peak MiB':>10}{'theirs tok/s':>14}{'peak MiB':>10}{'speed':>7}{'memory':>8}"
          "  settings (ours | theirs)")
    for kind, mine, ref, note in rows:
        cols = (f"{ref['tok_s']:>14,.0f}{ref['peak'] / 2**20:>10,.0f}{mine['tok_s'] / ref['tok_s']:>6.2f}x"
                f"{mine['peak'] / ref['peak']:>7.2f}x" if ref else f"{'-':>14}{'-':>10}{'-':>7}{'-':>8}")
        print(f"{kind:<7}{mine['tok_s']:>11,.0f}{mine['peak'] / 2**20:>10,.0f}{cols}  {mine['setting']} | {note}")


if __name__ == "__main__":
    main(sys.argv[1:])
