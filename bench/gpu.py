"""The GPU acceptance run, second version: whole models, not a slice. Every claim only a GPU can
check, measured in one call (about 8 minutes on one H200) with random weights, so nothing large has
to travel, and printed as one table with a target and a verdict per row. A row that fails prints
its error in the table and the run goes on.

    python bench/gpu.py [--steps=10] [--only=kernels,loss,train,hf,long,70b,fsdp,smollm2]
                        [--smollm2=<HF folder> --data=<gsm8k_train_alpaca.json>]
    python bench/gpu.py --smoke        # CPU, tiny shapes, kernels through the interpreter: tests/test_gpu_bench.py

Without CUDA (and without --smoke) it says so in one line and exits 2. Sections:
- kernels: each Triton kernel against its PyTorch reference, eager and under torch.compile, timed
  with triton's do_bench_cudagraph (one CUDA graph replayed: no host launch floor), with the peak
  memory of each. Verdict: a kernel stays where it beats the compiled reference in time or memory.
- loss: lm_head + cross-entropy, forward and backward, 16,384 tokens at V 128256 and H 4096, bf16:
  eager, compiled and the fused kernel; time and the peak above the inputs.
- train: Llama-3-8B at full depth (32 layers, full vocabulary), LoRA and QLoRA (rank 16, every
  linear layer, a bf16 frozen base as a folder loads it), 4 x 2048 tokens, train.py's engine
  (ddp.Replicated, fused loss, fused AdamW): recompute none (where the plan says it fits) and full,
  eager and compiled blocks. Tokens/s as the median of --steps steps with min-max, MFU, peak
  memory, and the memory plan against that peak.
- hf: transformers + PEFT (+ bitsandbytes for QLoRA) on the same shapes and recompute, each in a
  fresh process (`--hf_worker=lora:full`), SDPA pinned, non-reentrant checkpointing per layer.
- long: QLoRA at 1 x 32,768 tokens (recompute full): tokens/s and plan against measured.
- 70b: Llama-3-70B's shapes cut to 8 layers, QLoRA under fsdp.Sharded at world 1, built unit by
  unit (the whole model never exists), --offload none and frozen: plan against measured.
- fsdp: --fsdp at world 1 on CUDA (side-stream gathers; offload none, frozen, all) gives the losses
  of plain data parallelism.
- smollm2 (with --smollm2 and --data): 20 QLoRA steps of train.py on GSM8K, held-out loss falls.
"""

import dataclasses
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import torch

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel is defined
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))
import ddp  # noqa: E402
import fsdp  # noqa: E402
import kernels  # noqa: E402
import model as M  # noqa: E402
import plan  # noqa: E402
import quant  # noqa: E402
import train  # noqa: E402
import memory  # noqa: E402  (bench/memory.py: random models as each kind, built whole or unit by unit)
from compare import step_times  # noqa: E402  (bench/compare.py)

HBM_PEAK = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}  # bytes/s
GiB = 2**30


# -- the table ---------------------------------------------------------------------------


class Table:
    """Rows of (section, what, measured, target, verdict). Verdict: PASS, FAIL, ERROR, or INFO
    (a figure with no target, or a row skipped with its reason)."""

    def __init__(self):
        self.rows = []

    def add(self, section, what, measured, target="-", ok=None):
        self.rows.append((section, what, measured, target, "INFO" if ok is None else ("PASS" if ok else "FAIL")))
        print(" | ".join(self.rows[-1]), flush=True)  # at once too: a run cut short by a time limit keeps its rows

    def run(self, section, fn, *args):
        """fn(table, *args) adds its rows; an exception becomes an ERROR row and the run goes on."""
        t = time.perf_counter()
        try:
            fn(self, *args)
        except Exception as e:  # noqa: BLE001 - a failing check must not stop the others
            last = traceback.extract_tb(e.__traceback__)[-1]
            where = f"{os.path.basename(last.filename)}:{last.lineno}"
            self.rows.append((section, f"{type(e).__name__} at {where}", str(e).splitlines()[0][:160] if str(e) else "", "-",
                              "ERROR"))
            print(" | ".join(self.rows[-1]), flush=True)
        finally:
            free_memory()
        print(f"[{section}: {time.perf_counter() - t:.0f} s]", file=sys.stderr, flush=True)

    def render(self):
        header = ("section", "what", "measured", "target", "verdict")
        widths = [max(len(str(r[i])) for r in self.rows + [header]) for i in range(5)]
        lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header] + self.rows]
        counts = {v: sum(r[4] == v for r in self.rows) for v in ("PASS", "FAIL", "ERROR")}
        lines.append(f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['ERROR']} errors")
        return "\n".join(lines)


# -- measuring ---------------------------------------------------------------------------


def free_memory():
    import gc
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def kernel_time(fn, device):
    """Seconds per call: on CUDA the median of do_bench_cudagraph (the calls replayed from one CUDA
    graph, so the host's launch overhead, ~0.5 ms for a few small kernels, does not count)."""
    if device.type == "cuda":
        import triton
        return triton.testing.do_bench_cudagraph(fn, return_mode="median") / 1e3
    return step_times(fn, device, warmup=1, steps=1)[0]


def peak_of(fn, device):
    """Peak bytes allocated while fn() runs, above what was allocated before it; 0 on CPU, where the
    smoke run's interpreted kernels and tiny shapes would make the figure meaningless."""
    if device.type != "cuda":
        fn()
        return 0
    return memory.peak_above(fn, device)


def spread(tokens, times):
    """'median tok/s (min-max)' over per-step times."""
    rates = sorted(tokens / t for t in times)
    return statistics.median(rates), f"{statistics.median(rates):,.0f} tok/s ({rates[0]:,.0f}-{rates[-1]:,.0f})"


# -- kernels -----------------------------------------------------------------------------


def kernel_cases(device, smoke):
    """(name, bytes each must move at least once, eager reference, reference to compile, Triton)."""
    from kernels.linear_ce import linear_cross_entropy_triton
    from kernels.lora import lora_add_reference, lora_add_triton
    from kernels.nf4 import dequantize_nf4_reference, dequantize_nf4_triton, nf4_matmul_reference, nf4_matmul_triton
    from kernels.rmsnorm import rms_norm_reference, rms_norm_triton
    from kernels import rope as R
    from kernels.swiglu import swiglu_reference, swiglu_triton
    tokens, dim, ffn, vocab, hd, heads = (64, 128, 256, 512, 64, 4) if smoke else (8192, 4096, 14336, 128256, 128, 32)
    dtype = torch.bfloat16
    torch.manual_seed(0)

    def leaf(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, device=device, dtype=dt) * scale).requires_grad_(True)

    def fwd_bwd(fn, *args):
        def go():
            out = fn(*args)
            out.backward(torch.ones_like(out))
            for a in args:
                a.grad = None
        return go

    x, w = leaf(tokens, dim), leaf(dim)
    gate, up = leaf(tokens, ffn), leaf(tokens, ffn)
    q = torch.randn(2, tokens // 2, heads, hd, device=device, dtype=dtype).transpose(1, 2)  # as attention views it
    q_leaf, dy = q.detach().clone().requires_grad_(True), torch.randn_like(q)
    pos = torch.arange(tokens // 2, device=device)[None].expand(2, -1)
    cos, sin = M.rope_cos_sin(M.rope_frequencies(dataclasses.replace(M.MODELS["llama3-8b"], head_dim=hd), device), pos, dtype)

    def rope_ref(forward):  # forward and the gradient of its input, as autograd runs them for the model
        return lambda: torch.autograd.grad(forward(q_leaf, cos, sin), q_leaf, dy)

    def rope_kernel():  # what rope_triton's autograd Function runs: in place forward, rotated-back gradient
        R._launch(q, q, cos, sin, 1.0)
        return R._launch(dy, torch.empty_like(dy), cos, sin, -1.0)
    hid, head = leaf(tokens, dim), leaf(vocab, dim, scale=0.02)
    labels = torch.randint(0, vocab, (tokens,), device=device)
    ybase, xa, bmat = leaf(tokens, dim), leaf(tokens, 16), leaf(dim, 16, dt=torch.float32)
    qw = quant.quantize_nf4(torch.randn(ffn, dim, device=device) * 0.02)
    nf4, dynamic = quant.codes_on(device)
    deq = (qw["weight"], qw["absmax"], nf4, 64, torch.Size((ffn, dim)), torch.bfloat16, qw["nested_absmax"], dynamic, 256,
           qw["offset"])
    mm = (qw["weight"], qw["absmax"], nf4, 64, torch.Size((ffn, dim)), qw["nested_absmax"], dynamic, 256, qw["offset"])
    x1, x16 = torch.randn(1, dim, device=device, dtype=dtype), torch.randn(16, dim, device=device, dtype=dtype)
    ce = lambda a, b: torch.nn.functional.cross_entropy((a @ b.t()).float(), labels, reduction="sum")  # noqa: E731
    codes = ffn * dim // 2 + ffn * dim // 64
    rms = lambda a, b: rms_norm_reference(a, b, 1e-5)  # noqa: E731
    lora = lambda a, c, d: lora_add_reference(a, c, d, 2.0)  # noqa: E731
    return [
        ("rmsnorm fwd+bwd", 2 * tokens * dim * 4, fwd_bwd(rms, x, w), lambda c: fwd_bwd(c(rms), x, w),
         fwd_bwd(lambda a, b: rms_norm_triton(a, b, 1e-5), x, w)),
        ("swiglu fwd+bwd", 2 * tokens * ffn * 7, fwd_bwd(swiglu_reference, gate, up),
         lambda c: fwd_bwd(c(swiglu_reference), gate, up), fwd_bwd(swiglu_triton, gate, up)),
        ("rope fwd+bwd", 2 * q.numel() * 4, rope_ref(R.rope_reference), lambda c: rope_ref(c(R.rope_reference)),
         rope_kernel),
        ("lora add fwd+bwd", 2 * tokens * dim * 3, fwd_bwd(lora, ybase, xa, bmat), lambda c: fwd_bwd(c(lora), ybase, xa, bmat),
         fwd_bwd(lambda a, c, d: lora_add_triton(a, c, d, 2.0), ybase, xa, bmat)),
        ("linear+CE fwd+bwd", 2 * (tokens * dim * 2 + vocab * dim * 2), fwd_bwd(ce, hid, head),
         lambda c: fwd_bwd(c(ce), hid, head), fwd_bwd(lambda a, b: linear_cross_entropy_triton(a, b, labels, 4096), hid, head)),
        ("nf4 dequant -> bf16", codes + 2 * ffn * dim, lambda: dequantize_nf4_reference(*deq),
         lambda c: (lambda f: lambda: f(*deq))(c(dequantize_nf4_reference)), lambda: dequantize_nf4_triton(*deq)),
        ("nf4 matmul, 1 row", codes + 2 * (dim + ffn), lambda: nf4_matmul_reference(x1, *mm),
         lambda c: (lambda f: lambda: f(x1, *mm))(c(nf4_matmul_reference)), lambda: nf4_matmul_triton(x1, *mm)),
        ("nf4 matmul, 16 rows", codes + 32 * (dim + ffn), lambda: nf4_matmul_reference(x16, *mm),
         lambda c: (lambda f: lambda: f(x16, *mm))(c(nf4_matmul_reference)), lambda: nf4_matmul_triton(x16, *mm)),
    ]


def kernel_rows(t, device, smoke):
    peak_bw = next((v for k, v in HBM_PEAK.items() if device.type == "cuda" and k in torch.cuda.get_device_name()), None)
    compile_ = (lambda f: f) if smoke else torch.compile  # the interpreter's speed means nothing anyway
    for name, nbytes, eager, compiled, triton in kernel_cases(device, smoke):
        compiled = compiled(compile_)
        impls = {"eager": eager, "compiled": compiled, "triton": triton}
        times = {k: kernel_time(fn, device) for k, fn in impls.items()}
        peaks = {k: peak_of(fn, device) for k, fn in impls.items()}
        frac = f", {nbytes / times['triton'] / peak_bw:.0%} of HBM" if peak_bw else ""
        measured = (f"{times['triton'] * 1e3:.3f} ms ({nbytes / times['triton'] / 1e9:,.0f} GB/s{frac}), "
                    f"{peaks['triton'] / 2**20:,.0f} MiB; compiled {times['compiled'] * 1e3:.3f} ms, "
                    f"{peaks['compiled'] / 2**20:,.0f} MiB; eager {times['eager'] * 1e3:.3f} ms")
        if name.startswith("nf4 dequant"):
            t.add("kernels", name, measured, ">= 70% of HBM peak", bool(peak_bw) and nbytes / times["triton"] >= 0.7 * peak_bw)
        elif name.startswith("nf4 matmul"):  # the references build the dense weight: memory always favours the codes
            t.add("kernels", name, measured, "faster than compiled", times["triton"] < times["compiled"])
        else:
            faster, smaller = times["triton"] < times["compiled"], peaks["triton"] < peaks["compiled"]
            t.add("kernels", name, measured + (" (faster)" if faster else " (less memory)" if smaller else ""),
                  "beats compiled in time or memory", faster or smaller)


# -- the fused loss ----------------------------------------------------------------------


def loss_rows(t, device, smoke):
    from kernels.linear_ce import linear_cross_entropy_triton
    tokens, dim, vocab = (256, 64, 1000) if smoke else (16384, 4096, 128256)
    torch.manual_seed(0)
    hid = torch.randn(tokens, dim, device=device, dtype=torch.bfloat16, requires_grad=True)
    head = (torch.randn(vocab, dim, device=device, dtype=torch.bfloat16) * 0.02).requires_grad_(True)
    labels = torch.randint(0, vocab, (tokens,), device=device)
    eager = lambda: torch.nn.functional.cross_entropy((hid @ head.t()).float(), labels, reduction="sum")  # noqa: E731
    impls = {"eager": eager, "compiled": eager if smoke else torch.compile(eager),
             "fused": lambda: linear_cross_entropy_triton(hid, head, labels, 4096)}
    losses, peaks, times = {}, {}, {}
    for name, fn in impls.items():
        def step():
            loss = fn()
            loss.backward()
            losses[name] = loss.detach()
            hid.grad = head.grad = None
        step()  # compiles
        peaks[name] = peak_of(step, device)
        times[name] = statistics.median(step_times(step, device, warmup=1, steps=1 if smoke else 5))
    same = math.isclose(losses["fused"].item(), losses["eager"].item(), rel_tol=1e-2)
    t.add("loss", f"lm_head + CE fwd+bwd, {tokens} tok, V={vocab}, H={dim}: peak above the inputs",
          ", ".join(f"{k} {peaks[k] / GiB:.2f} GiB {times[k] * 1e3:.1f} ms" for k in impls)
          + f"; loss {losses['fused'].item():.1f} vs {losses['eager'].item():.1f}",
          "fused <= 2.2 GiB, no slower than compiled, same loss",
          (smoke or peaks["fused"] <= 2.2 * GiB) and times["fused"] <= times["compiled"] * 1.02 and same)


# -- training at full depth --------------------------------------------------------------


def llama8b(smoke, seq_len=8192):
    if smoke:
        return M.ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, ffn_dim=256, max_seq_len=seq_len)
    return dataclasses.replace(M.MODELS["llama3-8b"], max_seq_len=max(seq_len, 8192))


def planned(args, kind, B, T, recompute, device):
    """The memory plan's total for this run on one device (what --dry_run prints)."""
    meta = memory.build_model(args, kind, torch.device("meta"), torch.bfloat16)
    gpu, _ = plan.plan_memory(meta, 1, B, T, checkpointing=recompute, param_bytes=2,
                              kernels=device.type == "cuda" and kernels.HAS_TRITON)
    return gpu["total"]


def fits(total, device):
    """Does a planned total fit this device's free memory, with a tenth to spare? (CPU: yes)"""
    free_memory()  # what the allocator caches from the previous run is free for this one
    return device.type != "cuda" or total <= 0.9 * torch.cuda.mem_get_info()[0]


def our_run(args, kind, device, B, T, *, recompute, compiled, steps, smoke):
    """{tok_s, spread, peak, mfu}: train.py's engine on a random model, one device, bf16."""
    free_memory()
    base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    model = memory.build_model(args, kind, device, torch.bfloat16)
    model.gradient_checkpointing = recompute
    if compiled:
        for layer in model.model.layers:
            layer.compile(backend="eager" if smoke else "inductor")
    engine = ddp.Replicated(model, train.Dist(0, 0, 1, device), amp_dtype=torch.bfloat16)
    opt = torch.optim.AdamW(engine.param_groups(0.0), lr=1e-5, fused=device.type == "cuda")
    ids = torch.randint(0, args.vocab_size, (B, T), device=device)

    def step():
        engine.forward_backward({"input_ids": ids, "labels": ids}, loss_scale=1 / ids.numel())
        opt.step()
        opt.zero_grad(set_to_none=True)
    times = step_times(step, device, warmup=3 if compiled else 2, steps=0)  # AdamW's state exists from here on
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = step_times(step, device, warmup=0, steps=steps)
    peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else 0
    adapters = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    peak_flops = plan.peak_flops(device)
    tok_s, text = spread(B * T, times)  # the model and its optimizer state are freed on return
    if compiled:
        torch._dynamo.reset()  # nor do dynamo's caches keep anything of this model
    return {"tok_s": tok_s, "spread": text, "peak": peak,
            "mfu": tok_s * plan.flops_per_token(args, T, True, adapters) / peak_flops if peak_flops else None}


def training_rows(t, device, smoke, steps, results):
    args, (B, T) = llama8b(smoke), ((2, 64) if smoke else (4, 2048))
    for kind in ("lora", "qlora"):
        for recompute in (False, True):
            total = planned(args, kind, B, T, recompute, device)
            for compiled in (False, True):
                what = f"ours {kind}, {args.n_layers} layers, {B}x{T}, recompute {'full' if recompute else 'none'}, " \
                       f"{'compiled' if compiled else 'eager'}"
                if not fits(total, device):
                    t.add("train", what, f"skipped: the plan needs {total / GiB:.1f} GiB")
                    continue
                r = our_run(args, kind, device, B, T, recompute=recompute, compiled=compiled, steps=steps, smoke=smoke)
                results[(kind, recompute, compiled)] = r
                mfu = f", MFU {r['mfu']:.1%}" if r["mfu"] else ""
                t.add("train", what, f"{r['spread']}{mfu}, peak {r['peak'] / GiB:.2f} GiB")
                if device.type == "cuda":
                    ratio = total / r["peak"]
                    t.add("memory plan", what, f"{total / GiB:.2f} / {r['peak'] / GiB:.2f} GiB = {ratio:.2f}",
                          "0.9 .. 1.1", 0.9 <= ratio <= 1.1)
    training_verdicts(t, results)


def training_verdicts(t, results):
    """The targets that compare rows: LoRA MFU, QLoRA against LoRA, QLoRA's peak, compile against eager."""
    best = {kind: max((r for (k, _, _), r in results.items() if k == kind), key=lambda r: r["tok_s"], default=None)
            for kind in ("lora", "qlora")}
    if best["lora"] and best["lora"]["mfu"] is not None:
        t.add("targets", "LoRA MFU, best setting", f"{best['lora']['mfu']:.1%}", ">= 40%", best["lora"]["mfu"] >= 0.40)
    if best["lora"] and best["qlora"]:
        ratio = best["qlora"]["tok_s"] / best["lora"]["tok_s"]
        t.add("targets", "QLoRA / LoRA tok/s, best settings", f"{ratio:.2f}x", ">= 0.9x", ratio >= 0.9)
    ckpt = [r["peak"] for (k, rec, _), r in results.items() if k == "qlora" and rec]
    if ckpt and ckpt[0]:
        t.add("targets", "QLoRA peak, 4 x 2048, recompute full", f"{min(ckpt) / GiB:.2f} GiB", "<= 10 GiB",
              min(ckpt) <= 10 * GiB)
    for kind in ("lora", "qlora"):
        pairs = [(results[(kind, rec, False)]["tok_s"], results[(kind, rec, True)]["tok_s"]) for rec in (False, True)
                 if (kind, rec, False) in results and (kind, rec, True) in results]
        if pairs:
            gains = [c / e for e, c in pairs]
            t.add("targets", f"{kind}: compiled / eager tok/s (recompute none, full)",
                  ", ".join(f"{g:.2f}x" for g in gains), "> 1: --compile default on CUDA", min(gains) > 1)


# -- transformers + PEFT, in a process of its own ----------------------------------------


def hf_worker(spec, smoke, steps):
    """`--hf_worker=kind:recompute`: transformers + PEFT (+ bitsandbytes) at the shapes of
    training_rows, random weights built on the device; prints one JSON line."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    kind, recompute = spec.split(":")
    device = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    args, (B, T) = llama8b(smoke), ((2, 64) if smoke else (4, 2048))
    hf_cfg = {k: v for k, v in args.to_hf_config().items() if k not in ("architectures", "model_type", "torch_dtype")}
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**hf_cfg, attn_implementation="sdpa")).to(torch.bfloat16)
    if kind == "qlora":
        import bitsandbytes as bnb
        for name, mod in list(model.named_modules()):
            if isinstance(mod, torch.nn.Linear) and not name.endswith("lm_head"):
                q = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=False, compute_dtype=torch.bfloat16,
                                      quant_type="nf4", compress_statistics=True)
                q.weight = bnb.nn.Params4bit(mod.weight.data.cpu(), requires_grad=False, quant_type="nf4",
                                             compress_statistics=True)
                model.set_submodule(name, q.to(device))  # quantized as it moves to the GPU
    if recompute == "full":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # fp32 adapters, as ours
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=device.type == "cuda")
    ids = torch.randint(0, args.vocab_size, (B, T), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    step_times(step, device, warmup=2, steps=0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = step_times(step, device, warmup=0, steps=steps)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0  # all of it: nothing was here before
    print(json.dumps({"times": times, "peak": peak, "tokens": B * T}))


def hf_rows(t, device, smoke, steps, results):
    for kind in ("lora", "qlora"):
        for recompute in ("none", "full"):
            need = ["transformers", "peft"] + (["bitsandbytes"] if kind == "qlora" else [])
            absent = [m for m in need if importlib.util.find_spec(m) is None]
            what = f"transformers + PEFT{' + bnb' if kind == 'qlora' else ''}, {kind}, recompute {recompute}"
            if absent or (kind == "qlora" and device.type != "cuda"):
                t.add("hf", what, f"skipped: {', '.join(absent) + ' not installed' if absent else 'bitsandbytes needs CUDA'}")
                continue
            if smoke and recompute == "none":  # one fresh process is enough to try the worker's code
                t.add("hf", what, "skipped: --smoke runs one worker")
                continue
            r = subprocess.run([sys.executable, os.path.abspath(__file__), f"--hf_worker={kind}:{recompute}",
                                f"--steps={steps}"] + (["--smoke"] if smoke else []), capture_output=True, text=True)
            if r.returncode:
                t.add("hf", what, "failed: " + (r.stderr.strip().splitlines() or ["?"])[-1][:160])
                continue
            theirs = json.loads(r.stdout.strip().splitlines()[-1])
            tok_s, text = spread(theirs["tokens"], theirs["times"])
            t.add("hf", what, f"{text}, peak {theirs['peak'] / GiB:.2f} GiB")
            mine = results.get((kind, recompute == "full", False))
            if mine and theirs["peak"]:
                speed, mem = mine["tok_s"] / tok_s, mine["peak"] / theirs["peak"]
                t.add("targets", f"{kind}, recompute {recompute}: ours (eager) / theirs",
                      f"{speed:.2f}x tok/s, {mem:.2f}x memory", ">= 1.3x tok/s at <= 0.75x memory", speed >= 1.3 and mem <= 0.75)


# -- long sequences, and a 70B-shaped model ----------------------------------------------


def long_rows(t, device, smoke, steps):
    T = 256 if smoke else 32768
    args = llama8b(smoke, seq_len=T)
    total = planned(args, "qlora", 1, T, True, device)
    r = our_run(args, "qlora", device, 1, T, recompute=True, compiled=False, steps=max(steps // 2, 1), smoke=smoke)
    t.add("long", f"QLoRA, {args.n_layers} layers, 1 x {T}, recompute full", f"{r['spread']}, peak {r['peak'] / GiB:.2f} GiB")
    if device.type == "cuda":
        ratio = total / r["peak"]
        t.add("memory plan", f"QLoRA at 1 x {T}", f"{total / GiB:.2f} / {r['peak'] / GiB:.2f} GiB = {ratio:.2f}",
              "0.9 .. 1.1", 0.9 <= ratio <= 1.1)


def big_rows(t, device, smoke):
    args = llama8b(True) if smoke else dataclasses.replace(M.MODELS["llama3-70b"], n_layers=8)
    B, T = (2, 64) if smoke else (2, 2048)
    for offload in ("none", "frozen"):
        p, peak = memory.compare(args, "qlora", True, train.Dist(0, 0, 1, device), B, T, bf16=True,
                                 kernels=device.type == "cuda" and kernels.HAS_TRITON, offload=offload)
        ratio = p["total"] / peak  # on CPU (smoke) the offloaded shards count in both: no verdict
        t.add("70b", f"70B shapes, {args.n_layers} layers, QLoRA sharded (world 1), {B}x{T}, offload {offload}: plan / "
              f"measured", f"{p['total'] / GiB:.2f} / {peak / GiB:.2f} GiB = {ratio:.2f}", "0.9 .. 1.1",
              0.9 <= ratio <= 1.1 if device.type == "cuda" else None)
        free_memory()


# -- sharding on CUDA, and a real model --------------------------------------------------


def fsdp_rows(t, device, smoke):
    args = llama8b(True) if smoke else dataclasses.replace(M.MODELS["tinyllama-1.1b"], n_layers=4)
    d = train.Dist(0, 0, 1, device)
    B, T = 2, 64 if smoke else 1024
    ids = torch.randint(0, args.vocab_size, (B, T), device=device, generator=torch.Generator(device).manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    losses = {}
    for mode in ("replicated", "none", "frozen", "all"):
        model = memory.build_model(args, "qlora", device, torch.bfloat16)
        model.gradient_checkpointing = True
        engine = (ddp.Replicated(model, d, amp_dtype=torch.bfloat16) if mode == "replicated" else
                  fsdp.Sharded(model, d, param_dtype=torch.bfloat16, amp_dtype=torch.bfloat16, offload=mode))
        opt = torch.optim.AdamW(engine.param_groups(0.0), lr=1e-2)
        losses[mode] = []
        for _ in range(3):
            loss, n = engine.forward_backward(batch, loss_scale=1 / ids.numel())
            engine.clip_grad_norm_(1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses[mode].append(loss.item() / n)
    for mode in ("none", "frozen", "all"):
        close = all(math.isclose(a, b, rel_tol=1e-2) for a, b in zip(losses[mode], losses["replicated"]))
        t.add("fsdp", f"QLoRA, offload={mode}: losses vs plain DP",
              " ".join(f"{v:.4f}" for v in losses[mode]) + " vs " + " ".join(f"{v:.4f}" for v in losses["replicated"]),
              "equal to 1e-2", close)


def smollm2_rows(t, device, smoke, folder, data):
    if not folder or not os.path.isdir(folder) or not data or not os.path.isfile(data):
        t.add("smollm2", "20 QLoRA steps on GSM8K", "skipped: pass --smollm2=<folder> --data=<gsm8k_train_alpaca.json>")
        return
    out, steps = tempfile.mkdtemp(), 2 if smoke else 20
    train.main([f"--model={folder}", f"--data={data}", "--train_type=qlora", "--lora_rank=16", "--lora_alpha=32",
                "--seq_len=512", f"--batch_size={1 if smoke else 4}", f"--max_steps={steps}", "--lr=2e-4",
                "--warmup_steps=2", f"--eval_every={steps // 2}", "--eval_batches=4", "--eval_samples=0", "--samples=0",
                "--save_hf=false", f"--out_dir={out}", "--log_every=5"])
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    finite = all(math.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))
    t.add("smollm2", f"{steps} QLoRA steps on GSM8K, eval loss", " -> ".join(f"{v:.3f}" for v in evals),
          "falls, no NaN", finite and evals[-1] < evals[0])


def main(argv):
    opts = dict(a[2:].split("=", 1) if "=" in a else (a[2:], "1") for a in argv if a.startswith("--"))
    steps = int(opts.get("steps", 2 if SMOKE else 10))
    if "hf_worker" in opts:
        hf_worker(opts["hf_worker"], SMOKE, steps)
        return 0
    if not torch.cuda.is_available() and not SMOKE:
        print("error: bench/gpu.py needs a CUDA GPU (this machine has none); --smoke runs its logic on CPU", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() and not SMOKE else "cpu")
    t, results = Table(), {}
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (smoke: tiny shapes, Triton interpreter)"
    print(f"bench/gpu.py on {name}, torch {torch.__version__}", flush=True)
    only = opts.get("only", "kernels,loss,train,hf,long,70b,fsdp,smollm2").split(",")
    sections = [("kernels", kernel_rows, ()), ("loss", loss_rows, ()), ("train", training_rows, (steps, results)),
                ("hf", hf_rows, (steps, results)), ("long", long_rows, (steps,)), ("70b", big_rows, ()),
                ("fsdp", fsdp_rows, ()), ("smollm2", smollm2_rows, (opts.get("smollm2"), opts.get("data")))]
    for section, fn, extra in sections:
        if section in only:
            # the interpreter runs the kernels on CPU tensors: in the smoke run, the kernel rows only
            kernels.select("interpret" if SMOKE and section in ("kernels", "loss") else "triton")
            t.run(section, fn, device, SMOKE, *extra)
    print(t.render())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
