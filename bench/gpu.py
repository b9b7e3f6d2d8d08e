"""The GPU acceptance run: every claim that only a GPU can check, measured in one go and printed as
one table with a target and a verdict per row. Made to spend a short GPU loan on measuring, not on
debugging: a row that fails prints its error in the table and the run goes on.

    python bench/gpu.py [--smollm2=<HF folder>] [--data=<gsm8k_train_alpaca.json>] [--layers=2]
                        [--only=kernels,loss,train,fsdp,smollm2]
    python bench/gpu.py --smoke        # CPU, tiny shapes, kernels through the interpreter: tests/test_gpu_bench.py

Without CUDA (and without --smoke) it says so in one line and exits 2. On an H100/H200 it takes
about 5 minutes. Rows:
- kernels: each Triton kernel, forward + backward where it has one, against the PyTorch reference
  eager and under torch.compile: time, GB/s and % of HBM peak (bytes each must move once). Target:
  faster than the compiled reference; NF4 dequantization >= 70% of peak bandwidth.
- loss memory: lm_head + cross-entropy at vocab 128256, dim 4096, 16384 tokens, bf16, forward and
  backward, eager against the fused kernel. Target: fused <= 4 GiB (Liger reports 4.9 GB).
- training steps of a Llama-3-8B-shaped model cut to --layers blocks (full vocabulary), 2 x 2048
  tokens, bf16, checkpointing, for full, LoRA and QLoRA (rank 16, all linear layers): tokens/s,
  MFU, peak memory; the memory plan (plan.plan_memory) against that peak (target within 15%: the
  caching allocator's rounding comes on top); transformers + PEFT (+ bitsandbytes) on the same
  shapes when installed. Target: QLoRA >= 2x their tokens/s at <= 0.5x their memory.
- --fsdp at world 1 on CUDA (side-stream gathers; offload=frozen and all through pinned memory):
  the losses of plain data parallelism to 1e-2 relative (bf16), in every mode.
- a 20-step QLoRA run of SmolLM2-135M-Instruct on GSM8K with evals (train.py, --smollm2 and
  --data): held-out loss falls, nothing is NaN.
"""

import dataclasses
import importlib.util
import json
import math
import os
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
import fsdp as F  # noqa: E402
import kernels as K  # noqa: E402
import model as M  # noqa: E402
import plan  # noqa: E402
import plan as P  # noqa: E402
import quant as Q  # noqa: E402
import train  # noqa: E402
from memory import build_model  # noqa: E402  (bench/memory.py: random weights, quantized, adapters, as each kind)

HBM_PEAK = {"H200": 4.8e12, "H100": 3.35e12, "A100": 2.0e12}  # bytes/s


# -- the table ---------------------------------------------------------------------------


class Table:
    """Rows of (section, what, measured, target, verdict). Verdict: PASS, FAIL, ERROR, or INFO
    (a figure with no target) / SKIP."""

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
        print(f"[{section}: {time.perf_counter() - t:.0f} s]", file=sys.stderr, flush=True)

    def render(self):
        widths = [max(len(str(r[i])) for r in self.rows + [("section", "what", "measured", "target", "verdict")])
                  for i in range(5)]
        lines = []
        for r in [("section", "what", "measured", "target", "verdict")] + self.rows:
            lines.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
        counts = {v: sum(r[4] == v for r in self.rows) for v in ("PASS", "FAIL", "ERROR")}
        lines.append(f"{counts['PASS']} passed, {counts['FAIL']} failed, {counts['ERROR']} errors")
        return "\n".join(lines)


def kernel_time(fn, device, repeat):
    """Seconds per call of one kernel: on CUDA the median of triton's do_bench (CUDA events, L2
    flushed between calls), since a host timer would measure the Python launch overhead instead."""
    if device.type == "cuda":
        import triton
        return triton.testing.do_bench(fn, return_mode="median") / 1e3
    return timed(fn, device, repeat)


def timed(fn, device, repeat):
    fn()  # warm-up (compiles)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / repeat


def peak_of(fn, device, base=None):
    """Peak bytes allocated while fn() runs, above `base` (default: what was allocated before it).
    CUDA; 0 on CPU."""
    if device.type != "cuda":
        fn()
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if base is None else base
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def allocated(device):
    return torch.cuda.memory_allocated() if device.type == "cuda" else 0


# -- kernels -----------------------------------------------------------------------------


def kernel_rows(t, device, smoke):
    from kernels.linear_ce import linear_cross_entropy_triton
    from kernels.lora import lora_add_reference, lora_add_triton
    from kernels.nf4 import dequantize_nf4_reference, dequantize_nf4_triton, nf4_matmul_reference, nf4_matmul_triton
    from kernels.rmsnorm import rms_norm_reference, rms_norm_triton
    from kernels.rope import rope_reference, rope_triton
    from kernels.swiglu import swiglu_reference, swiglu_triton
    tokens, dim, ffn, vocab, hd = (64, 128, 256, 512, 64) if smoke else (8192, 4096, 14336, 128256, 128)
    dtype, repeat, heads = torch.bfloat16, 1 if smoke else 10, 4 if smoke else 32
    peak_bw = next((v for k, v in HBM_PEAK.items() if device.type == "cuda" and k in torch.cuda.get_device_name()), None)
    torch.manual_seed(0)

    def leaf(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, device=device, dtype=dt) * scale).requires_grad_(True)

    def fwd_bwd(fn, *args):
        def go():
            out = fn(*args)
            out.backward(torch.ones_like(out))
            for a in args:
                if isinstance(a, torch.Tensor):
                    a.grad = None
        return go

    x, w = leaf(tokens, dim), leaf(dim)
    gate, up = leaf(tokens, ffn), leaf(tokens, ffn)
    q = leaf(2, heads, tokens // 2, hd)
    pos = torch.arange(tokens // 2, device=device)[None].expand(2, -1)
    cos, sin = M.rope_cos_sin(M.rope_frequencies(dataclasses.replace(M.MODELS["llama3-8b"], head_dim=hd), device), pos, dtype)
    hid, head = leaf(tokens, dim), leaf(vocab, dim, scale=0.02)
    labels = torch.randint(0, vocab, (tokens,), device=device)
    ybase, xa, bmat = leaf(tokens, dim), leaf(tokens, 16), leaf(dim, 16, dt=torch.float32)
    qw = Q.quantize_nf4(torch.randn(ffn, dim, device=device) * 0.02)
    nf4, dynamic = Q.codes_on(device)
    deq = (qw["weight"], qw["absmax"], nf4, 64, torch.Size((ffn, dim)), torch.bfloat16, qw["nested_absmax"], dynamic, 256,
           qw["offset"])
    x1 = torch.randn(1, dim, device=device, dtype=dtype)
    mm = (qw["weight"], qw["absmax"], nf4, 64, torch.Size((ffn, dim)), qw["nested_absmax"], dynamic, 256, qw["offset"])
    ce = lambda a, b: torch.nn.functional.cross_entropy((a @ b.t()).float(), labels, reduction="sum")  # noqa: E731
    e = 2
    cases = [  # name, bytes moved at least once, reference, Triton
        ("rmsnorm fwd+bwd", e * tokens * dim * 4, fwd_bwd(lambda a, b: rms_norm_reference(a, b, 1e-5), x, w),
         lambda c: fwd_bwd(c(lambda a, b: rms_norm_reference(a, b, 1e-5)), x, w),
         fwd_bwd(lambda a, b: rms_norm_triton(a, b, 1e-5), x, w)),
        ("swiglu fwd+bwd", e * tokens * ffn * 7, fwd_bwd(swiglu_reference, gate, up),
         lambda c: fwd_bwd(c(swiglu_reference), gate, up), fwd_bwd(swiglu_triton, gate, up)),
        ("rope fwd+bwd", e * q.numel() * 4, fwd_bwd(lambda a: rope_reference(a, cos, sin), q),
         lambda c: fwd_bwd(c(lambda a: rope_reference(a, cos, sin)), q), fwd_bwd(lambda a: rope_triton(a * 1, cos, sin), q)),
        ("lora add fwd+bwd", e * tokens * dim * 3, fwd_bwd(lambda a, c, d: lora_add_reference(a, c, d, 2.0), ybase, xa, bmat),
         lambda c: fwd_bwd(c(lambda a, b_, d: lora_add_reference(a, b_, d, 2.0)), ybase, xa, bmat),
         fwd_bwd(lambda a, c, d: lora_add_triton(a, c, d, 2.0), ybase, xa, bmat)),
        ("linear+CE fwd+bwd", e * (tokens * dim * 2 + vocab * dim * 2), fwd_bwd(ce, hid, head),
         lambda c: fwd_bwd(c(ce), hid, head), fwd_bwd(lambda a, b: linear_cross_entropy_triton(a, b, labels, 4096), hid, head)),
        ("nf4 dequant -> bf16", ffn * dim // 2 + ffn * dim // 64 + 2 * ffn * dim, lambda: dequantize_nf4_reference(*deq),
         lambda c: (lambda f: lambda: f(*deq))(c(dequantize_nf4_reference)), lambda: dequantize_nf4_triton(*deq)),
        ("nf4 matmul, 1 row", ffn * dim // 2 + ffn * dim // 64 + 2 * (dim + ffn), lambda: nf4_matmul_reference(x1, *mm),
         lambda c: (lambda f: lambda: f(x1, *mm))(c(nf4_matmul_reference)), lambda: nf4_matmul_triton(x1, *mm)),
    ]
    compile_ = (lambda f: f) if smoke else torch.compile  # the interpreter's speed means nothing anyway
    for name, nbytes, eager, compiled, triton in cases:
        times = {"eager": kernel_time(eager, device, repeat), "compiled": kernel_time(compiled(compile_), device, repeat),
                 "triton": kernel_time(triton, device, repeat)}
        gbs = nbytes / times["triton"] / 1e9
        frac = f", {nbytes / times['triton'] / peak_bw:.0%} of HBM" if peak_bw else ""
        if name.startswith("linear+CE"):  # three matmuls of tokens x dim x vocab: compute-bound, not memory
            frac += f"; {6 * tokens * dim * vocab / times['triton'] / 1e12:,.0f} TFLOP/s"
        measured = (f"{times['triton'] * 1e3:.3f} ms ({gbs:,.0f} GB/s{frac}); eager {times['eager'] * 1e3:.3f}, "
                    f"compiled {times['compiled'] * 1e3:.3f} ms")
        if name.startswith("nf4 dequant"):
            t.add("kernels", name, measured, ">= 70% of HBM peak", bool(peak_bw) and nbytes / times["triton"] >= 0.7 * peak_bw)
        else:
            t.add("kernels", name, measured, "faster than compiled", times["triton"] < times["compiled"])


def loss_memory_rows(t, device, smoke):
    from kernels.linear_ce import linear_cross_entropy_triton
    tokens, dim, vocab = (256, 64, 1000) if smoke else (16384, 4096, 128256)
    torch.manual_seed(0)
    hid = torch.randn(tokens, dim, device=device, dtype=torch.bfloat16, requires_grad=True)
    head = (torch.randn(vocab, dim, device=device, dtype=torch.bfloat16) * 0.02).requires_grad_(True)
    labels = torch.randint(0, vocab, (tokens,), device=device)
    impls = {"eager": lambda: torch.nn.functional.cross_entropy((hid @ head.t()).float(), labels, reduction="sum"),
             "fused": lambda: linear_cross_entropy_triton(hid, head, labels, 4096)}
    losses, peaks = {}, {}
    for name, fn in impls.items():
        def step():
            loss = fn()
            loss.backward()
            losses[name] = loss.item()
            hid.grad = head.grad = None
        peaks[name] = peak_of(step, device)
    same = math.isclose(losses["fused"], losses["eager"], rel_tol=1e-2)
    t.add("loss memory", f"lm_head + CE fwd+bwd, {tokens} tok, V={vocab}, H={dim}",
          f"fused {peaks['fused'] / 2**30:.2f} GiB, eager {peaks['eager'] / 2**30:.2f} GiB; loss {losses['fused']:.1f} "
          f"vs {losses['eager']:.1f}", "fused <= 4 GiB, same loss", peaks["fused"] <= 4 * 2**30 and same)


# -- training steps ----------------------------------------------------------------------


def shapes(smoke, layers):
    if smoke:
        return M.ModelArgs(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, ffn_dim=256, max_seq_len=256)
    return dataclasses.replace(M.MODELS["llama3-8b"], n_layers=layers)


def our_step(args, kind, device, B, T):
    """(step function, the model) for train.py's pieces at bf16."""
    model = build_model(args, kind, device, torch.bfloat16)
    model.gradient_checkpointing = True
    d = train.Dist(0, 0, 1, device)
    engine = ddp.Replicated(model, d, amp_dtype=torch.bfloat16, loss_chunk=4096)
    opt = torch.optim.AdamW(engine.param_groups(0.0), lr=1e-5, fused=True)
    ids = torch.randint(0, args.vocab_size, (B, T), device=device)

    def step():
        engine.forward_backward({"input_ids": ids, "labels": ids}, loss_scale=1 / ids.numel())
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, model


def their_step(args, kind, device, B, T):
    """transformers + PEFT (+ bitsandbytes) on the same shapes, random weights, bf16."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(**{k: v for k, v in args.to_hf_config().items() if k not in ("architectures", "model_type", "torch_dtype")})
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(device, torch.bfloat16 if kind != "full" else torch.float32)
    if kind == "qlora":
        import bitsandbytes as bnb
        for name, mod in list(model.named_modules()):
            if isinstance(mod, torch.nn.Linear) and not name.endswith("lm_head"):
                q = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=False, compute_dtype=torch.bfloat16,
                                      quant_type="nf4", compress_statistics=True)
                q.weight = bnb.nn.Params4bit(mod.weight.data.cpu(), requires_grad=False, quant_type="nf4",
                                             compress_statistics=True)
                model.set_submodule(name, q.to(device))
    if kind != "full":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear"))
    model.gradient_checkpointing_enable()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    ids = torch.randint(0, args.vocab_size, (B, T), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def training_rows(t, device, smoke, layers):
    args = shapes(smoke, layers)
    B, T, steps = (2, 64, 1) if smoke else (2, 2048, 2)
    peak_flops = plan.peak_flops(device)
    ours = {}
    for kind in ("full", "lora", "qlora"):
        base = allocated(device)
        step, model = our_step(args, kind, device, B, T)
        step()  # AdamW state exists from here on, as in the plan's "after the first step"
        # The whole footprint (weights, gradients, optimizer state, activations), as the plan counts it
        peak = peak_of(step, device, base)
        dt = timed(step, device, steps)
        tok_s = B * T / dt
        adapters = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
        mfu = tok_s * plan.flops_per_token(args, T, kind != "full", adapters) / peak_flops if peak_flops else None
        ours[kind] = (tok_s, peak)
        t.add("train step", f"ours {kind}, {args.n_layers}-layer llama3-8b shape, {B}x{T}",
              f"{tok_s:,.0f} tok/s, MFU {mfu:.1%}, peak {peak / 2**30:.2f} GiB" if mfu else f"{tok_s:,.0f} tok/s")
        gpu, _ = P.plan_memory(build_model(args, kind, torch.device("meta"), torch.bfloat16), 1, B, T, checkpointing=True, param_bytes=2, loss_chunk=4096,
                               kernels=device.type == "cuda" and K.HAS_TRITON)
        if device.type == "cuda":
            ratio = gpu["total"] / peak
            t.add("memory plan", f"{kind}: plan / measured peak", f"{gpu['total'] / 2**30:.2f} / {peak / 2**30:.2f} GiB "
                  f"= {ratio:.2f}", "0.85 .. 1.15", 0.85 <= ratio <= 1.15)
        del step, model
    for kind in ("full", "lora", "qlora"):
        need = ["transformers"] + (["peft"] if kind != "full" else []) + (["bitsandbytes"] if kind == "qlora" else [])
        absent = [m for m in need if importlib.util.find_spec(m) is None]
        if absent or device.type != "cuda":
            t.add("vs HF", f"transformers + PEFT, {kind}", f"skipped: {', '.join(absent) + ' not installed' if absent else 'no GPU'}")
            continue
        base = allocated(device)
        step = their_step(args, kind, device, B, T)
        step()
        peak = peak_of(step, device, base)
        tok_s = B * T / timed(step, device, steps)
        speed, mem = ours[kind][0] / tok_s, ours[kind][1] / peak
        t.add("vs HF", f"{kind}: ours / transformers + PEFT" + (" + bnb" if kind == "qlora" else ""),
              f"{speed:.2f}x tok/s ({tok_s:,.0f} theirs), {mem:.2f}x memory ({peak / 2**30:.2f} GiB theirs)",
              ">= 2x tok/s, <= 0.5x memory" if kind == "qlora" else "-",
              (speed >= 2 and mem <= 0.5) if kind == "qlora" else None)
        del step


def fsdp_rows(t, device, smoke):
    args = shapes(True, 2) if smoke else dataclasses.replace(M.MODELS["tinyllama-1.1b"], n_layers=4)
    d = train.Dist(0, 0, 1, device)
    B, T = 2, 64 if smoke else 1024
    ids = torch.randint(0, args.vocab_size, (B, T), device=device, generator=torch.Generator(device).manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    losses = {}
    for mode in ("replicated", "none", "frozen", "all"):
        model = build_model(args, "qlora", device, torch.bfloat16)
        model.gradient_checkpointing = True
        engine = (ddp.Replicated(model, d, amp_dtype=torch.bfloat16) if mode == "replicated" else
                  F.Sharded(model, d, param_dtype=torch.bfloat16, amp_dtype=torch.bfloat16, offload=mode))
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
        t.add("fsdp world 1", f"QLoRA, offload={mode}: losses vs plain DP",
              " ".join(f"{v:.4f}" for v in losses[mode]) + " vs " + " ".join(f"{v:.4f}" for v in losses["replicated"]),
              "equal to 1e-2", close)


def smollm2_rows(t, device, smoke, folder, data):
    if not folder or not os.path.isdir(folder) or not data or not os.path.isfile(data):
        t.add("SmolLM2 QLoRA", "20 steps on GSM8K", "skipped: pass --smollm2=<folder> --data=<gsm8k_train_alpaca.json>")
        return
    out = tempfile.mkdtemp()
    steps = 2 if smoke else 20
    train.main([f"--model={folder}", f"--data={data}", "--train_type=qlora", "--lora_rank=16", "--lora_alpha=32",
                "--seq_len=512", "--batch_size=4" if not smoke else "--batch_size=1", f"--max_steps={steps}", "--lr=2e-4",
                "--warmup_steps=2", f"--eval_every={steps // 2}", "--eval_batches=4", "--eval_samples=0", "--samples=0",
                "--save_hf=false", f"--out_dir={out}", "--log_every=5"])
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    finite = all(math.isfinite(v) for r in rows for k, v in r.items() if isinstance(v, float))
    tok_s = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]
    t.add("SmolLM2 QLoRA", f"{steps} steps of 4 x 512 on GSM8K, eval loss",
          " -> ".join(f"{v:.3f}" for v in evals) + f"; {sum(tok_s[1:]) / max(len(tok_s) - 1, 1):,.0f} tok/s",
          "falls, no NaN", finite and evals[-1] < evals[0])


def main(argv):
    opts = dict(a[2:].split("=", 1) if "=" in a else (a[2:], "1") for a in argv if a.startswith("--"))
    if not torch.cuda.is_available() and not SMOKE:
        print("error: bench/gpu.py needs a CUDA GPU (this machine has none); --smoke runs its logic on CPU", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() and not SMOKE else "cpu")
    t = Table()
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (smoke: tiny shapes, Triton interpreter)"
    print(f"bench/gpu.py on {name}, torch {torch.__version__}", flush=True)
    only = opts.get("only", "kernels,loss,train,fsdp,smollm2").split(",")  # e.g. --only=train to rerun one part
    K.select("interpret" if SMOKE else "triton")  # the interpreter runs the kernels on CPU tensors: the kernel rows only
    if "kernels" in only:
        t.run("kernels", kernel_rows, device, SMOKE)
    if "loss" in only:
        t.run("loss memory", loss_memory_rows, device, SMOKE)
    K.select("triton")
    if "train" in only:
        t.run("train step", training_rows, device, SMOKE, int(opts.get("layers", 2)))
    if "fsdp" in only:
        t.run("fsdp world 1", fsdp_rows, device, SMOKE)
    if "smollm2" in only:
        t.run("SmolLM2 QLoRA", smollm2_rows, device, SMOKE, opts.get("smollm2"), opts.get("data"))
    print(t.render())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
