"""The memory plan (plan.plan_memory, what `train.py --dry_run` prints) against measured peak memory.

    python bench/memory.py                          # CPU: tiny preset, fp32, 4 x 256 tokens
    torchrun --nproc_per_node=2 bench/memory.py     # the same, each rank sharded over 2 (gloo)
    python bench/memory.py --model=tinyllama-1.1b --batch_size=2 --seq_len=2048    # GPU: bf16
    options: --precision=bf16|fp32 --kernels=triton|torch --json=rows.json; --model= a preset or an
    HF folder (its config.json only: the weights are random); --layers=N cuts it to N blocks;
    --rows="qlora ckpt,lora dpo" runs only those rows
    python bench/memory.py --model=llama3-70b --layers=8 --batch_size=1 --seq_len=64 --precision=bf16 --rows="qlora ckpt"
    torchrun --nproc_per_node=2 bench/memory.py --loading=<HF folder>   # CPU RSS while loading

--loading checks the promise of streamed loading (train.py --fsdp from an HF folder): a rank's
peak resident memory while it builds its shards grows by less than one checkpoint file plus the
shards it keeps, for full and qlora; an unsharded load (hf.from_pretrained, what runs without
--fsdp) is measured after it for contrast. Peak RSS is the kernel's VmHWM, reset before each load
(/proc/self/clear_refs), so the figures are real resident bytes, not allocator records. At small
sizes run it with MALLOC_MMAP_THRESHOLD_=131072: glibc then returns each freed tensor to the OS,
as it does by itself for tensors over 32 MiB (every weight of a 7B model); otherwise freed small
tensors stay in its heap and the figures depend on what ran before.

For full / lora / qlora, with and without activation checkpointing: build the model, shard it with
fsdp.Sharded, run two training steps (forward + backward + clip + AdamW) and take the peak of
allocated memory during the second (the first creates the optimizer state). On a GPU the peak is
torch.cuda.max_memory_allocated. On CPU it is read from the profiler's record of every allocation
and free made by PyTorch's CPU allocator: the same tensors a GPU would hold, without the CUDA
caching allocator's rounding and fragmentation (which is why a GPU run should still leave room).
"""

import dataclasses
import gc
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import hf  # noqa: E402
import fsdp as F  # noqa: E402
import lora as L  # noqa: E402
import model as M  # noqa: E402
import plan as P  # noqa: E402
import quant as Q  # noqa: E402
import build  # noqa: E402
from dpo import DPO  # noqa: E402
import train  # noqa: E402


def cpu_allocation_peak(fn, after=None):
    """Peak bytes live while fn() runs, from the profiler's record of every allocation and free of
    PyTorch's CPU allocator, counted from fn's start (what existed before does not count, and must
    not be freed inside fn). after: the name of a record_function block inside fn; the peak is
    then taken from its start on, with what fn allocated before it still counted."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = list(prof.profiler.kineto_results.events())
    start = min((e.start_ns() for e in events if e.name() == after), default=0)
    live = peak = 0
    for e in sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns()):
        live += e.nbytes()  # > 0 for an allocation, < 0 for a free
        if e.start_ns() >= start:
            peak = max(peak, live)
    return peak


def peak_above(fn, device):
    """Peak bytes allocated while fn() runs, above what was allocated before it: on CUDA
    max_memory_allocated, on CPU the allocator's records (cpu_allocation_peak)."""
    if device.type != "cuda":
        return cpu_allocation_peak(fn)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def peak_bytes(device, build, step):
    """Peak allocated bytes while step(*build()) runs the second time: everything build() made
    counts, what existed before does not (on CPU, build() must create all that step() uses)."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        objects = build()
        step(*objects)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step(*objects)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before

    def run():
        objects = build()
        step(*objects)
        with record_function("measured step"):
            step(*objects)
        del objects  # freed while recording, so that no later recording sees frees it never saw allocated
        gc.collect()
    return cpu_allocation_peak(run, after="measured step")


def build_model(args, kind, device, dtype):
    """Random weights; frozen weights in `dtype` for lora / qlora (as build.build_model does in bf16)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = M.Llama(args)
        if device.type != "meta":
            model.init_weights()
    if kind != "full":
        model.to(dtype)
    if kind == "qlora":
        Q.quantize_model(model)
    if kind != "full":
        L.add_lora(model, rank=16, alpha=32, targets="all-linear", generator=torch.Generator().manual_seed(0))
    return model


def sharded_model(args, kind, d, dtype, **engine):
    """fsdp.Sharded over build_model(args, kind)'s model, built unit by unit on the shards (a meta
    model, each unit's random weights drawn, cast, quantized and given adapters as it is sharded):
    the whole model never exists, so a 70B-shaped one builds wherever its shards fit."""
    with torch.device("meta"):
        model = M.Llama(args)
    init, gen = M.random_init_by_unit(model, d.device, seed=0), torch.Generator().manual_seed(0)

    def load(modules):
        init(modules)
        for module in modules:
            if kind != "full":
                module.to(dtype).requires_grad_(False)
            if kind == "qlora" and module is not model.lm_head:
                Q.quantize_model(module)
            if kind in ("lora", "qlora") and L.linear_names(module):
                L.add_lora(module, rank=16, alpha=32, targets="all-linear", generator=gen)
    model.inv_freq = M.rope_frequencies(args, d.device)
    return F.Sharded(model, d, materialize=load, **engine)


def compare(args, kind, ckpt, d, batch_size, seq_len, bf16, kernels, offload="none", prefetch=1, objective="sft",
            loss_chunk=0):
    """(planned GPU bytes by category, measured peak bytes) for one configuration on this rank.
    objective=dpo: each row one answer, pairs of rows; the reference is the base with the adapters
    off (lora, qlora) or a frozen copy sharded like the model (full), as train.py makes it."""
    dtype, dpo = (torch.bfloat16 if bf16 else torch.float32), objective == "dpo"
    plan, _ = P.plan_memory(build_model(args, kind, torch.device("meta"), dtype), d.world, batch_size, seq_len,
                            prefetch=prefetch, checkpointing=ckpt, param_bytes=2 if bf16 else 4, offload=offload,
                            kernels=kernels, loss_chunk=loss_chunk, dpo=dpo)
    if dpo and kind == "full":  # the frozen copy, every weight in the compute dtype, sharded
        plan = dict(plan, total=plan["total"] + -(-args.num_params() * dtype.itemsize // d.world))
    tokens = batch_size * seq_len * d.world

    def build():
        sharded = sharded_model(args, kind, d, dtype, prefetch=prefetch, param_dtype=dtype, offload=offload,
                                amp_dtype=dtype if bf16 else None, loss_chunk=loss_chunk)
        sharded.model.gradient_checkpointing = ckpt
        opt = torch.optim.AdamW(sharded.param_groups(0.0), lr=1e-5, fused=True)  # as train.py on CUDA
        g = torch.Generator().manual_seed(d.rank)
        ids = torch.randint(0, args.vocab_size, (batch_size, seq_len), generator=g).to(d.device)
        batch = {"input_ids": ids, "labels": ids}
        loss_fn = None
        if dpo:  # row b is answer b: pairs (0, 1), (2, 3), ...
            batch.update(seq_ids=torch.arange(batch_size, device=d.device)[:, None].expand(-1, seq_len).contiguous(),
                         num_pairs=batch_size // 2)
            reference = None
            if kind == "full":
                reference = sharded_model(args, "frozen", d, dtype, param_dtype=dtype, amp_dtype=dtype if bf16 else None)
                reference.model.eval()
            loss_fn = DPO(0.1, reference, chunk=loss_chunk or 4096)
        return sharded, opt, batch, loss_fn

    def step(sharded, opt, batch, loss_fn):
        sharded.forward_backward(batch, loss_scale=1 / tokens, loss_fn=loss_fn)
        sharded.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return plan, peak_bytes(d.device, build, step)


def rss_kib():
    """(current, peak) resident set of this process in KiB, from /proc/self/status (Linux)."""
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def rss_growth(fn):
    """Bytes by which fn() raises this process's peak resident memory above where it started."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    start, _ = rss_kib()
    fn()
    return (rss_kib()[1] - start) * 1024


def loading(path, d, opts):
    """Per rank: peak RSS growth of a streamed sharded load vs one checkpoint file + this rank's shards."""
    files = sorted({f for f in hf.safetensors_files(path).values()})
    largest = max(os.path.getsize(f) for f in files)
    rows = []
    for kind in opts.get("kinds", "full,qlora").split(","):
        cfg = train.parse_args([f"--model={path}", f"--train_type={kind}", "--fsdp"])
        keep = {}

        def streamed():
            model, _, _, load = build.build_model(cfg, d)
            keep["sharded"] = F.Sharded(model, d, materialize=load)
        grown = rss_growth(streamed)
        shards = sum(g.shard.numel() * g.shard.element_size() for u in keep["sharded"].units for g in u.groups)
        keep.clear()

        def dense():
            keep["model"] = hf.from_pretrained(path, d.device, torch.float32, prepare=Q.quantize_model if kind == "qlora" else None)
        dense_grown = rss_growth(dense)
        keep.clear()
        rows.append({"kind": kind, "rank": d.rank, "streamed": grown, "file": largest, "shards": shards, "dense": dense_grown})
    every = [rows]
    if dist.is_initialized():
        every = [None] * d.world
        dist.all_gather_object(every, rows)
    rows = [row for rank_rows in every for row in rank_rows]
    if d.rank == 0:
        print(f"{os.path.basename(path.rstrip('/'))}: {len(files)} file(s), largest {largest / 2**20:.1f} MiB; "
              f"world {d.world}; peak RSS growth while loading, MiB")
        print(f"{'kind':<7}{'rank':>5}{'streamed':>10}{'file+shards':>13}{'(shards)':>10}{'unsharded':>11}")
        for row in rows:
            print(f"{row['kind']:<7}{row['rank']:>5}{row['streamed'] / 2**20:>10.1f}"
                  f"{(row['file'] + row['shards']) / 2**20:>13.1f}{row['shards'] / 2**20:>10.1f}{row['dense'] / 2**20:>11.1f}")
        if "json" in opts:
            json.dump(rows, open(opts["json"], "w"))


def plan_vs_measured(d, opts):
    """The table of plan against measured peak for full / lora / qlora, checkpointing off and on."""
    cuda = d.device.type == "cuda"
    preset = opts.get("model", "tinyllama-1.1b" if cuda else "tiny")
    args = dataclasses.replace(M.MODELS[preset]) if preset in M.MODELS else hf.read_hf_config(preset)  # shapes only
    args.n_layers = int(opts.get("layers", args.n_layers))  # e.g. 70B's shapes, cut to a few blocks
    wanted = opts["rows"].split(",") if "rows" in opts else None  # e.g. --rows="qlora ckpt,lora dpo"
    B, T = int(opts.get("batch_size", 2 if cuda else 4)), int(opts.get("seq_len", 2048 if cuda else 256))
    bf16 = opts.get("precision", "bf16" if cuda else "fp32") == "bf16"
    kernels = cuda and opts.get("kernels", "triton") == "triton"
    if not kernels:
        import kernels as K
        K.select("torch")
    rows = []
    for kind in ("full", "lora", "qlora"):
        for ckpt in (False, True):
            if wanted is None or kind + (" ckpt" if ckpt else "") in wanted:
                plan, peak = compare(args, kind, ckpt, d, B, T, bf16, kernels)
                rows.append((kind, ckpt, plan, peak))
    chunk = max(B * T // 4, 1)  # fewer tokens at once than the batch holds
    for name, kind, objective, loss_chunk in (("full chunked", "full", "sft", chunk), ("lora dpo", "lora", "dpo", chunk),
                                              ("full dpo", "full", "dpo", chunk)):
        if wanted is None or name in wanted:  # no recompute: the loss's moment, with its chunk of logits, can peak
            plan, peak = compare(args, kind, False, d, B, T, bf16, kernels, objective=objective, loss_chunk=loss_chunk)
            rows.append((name, False, plan, peak))
    if d.rank == 0:
        dev = torch.cuda.get_device_name() if cuda else "CPU (allocator records)"
        print(f"{os.path.basename(preset.rstrip('/'))} ({args.n_layers} layers), world {d.world}, {B} x {T} tokens per rank, {'bf16' if bf16 else 'fp32'}, "
              f"kernels {'on' if kernels else 'off'}, {dev}, torch {torch.__version__}; MiB per rank")
        print(f"{'':<18}{'shards':>8}{'units':>8}{'grads':>8}{'optim':>8}{'acts':>8}{'logits':>8}"
              f"{'plan':>9}{'measured':>10}{'plan/meas':>10}")
        for kind, ckpt, p, peak in rows:
            mib = [p[k] / 2**20 for k in ("weight shards", "gathered units", "gradients", "optimizer")]
            acts = (p["activations"] + p["dequantized weight"]) / 2**20
            print(f"{kind + (' ckpt' if ckpt else ''):<18}" + "".join(f"{v:>8.1f}" for v in mib)
                  + f"{acts:>8.1f}{p['logits'] / 2**20:>8.1f}{p['total'] / 2**20:>9.1f}{peak / 2**20:>10.1f}"
                  + f"{p['total'] / peak:>10.2f}")
        if "json" in opts:  # for tests/test_fsdp.py
            json.dump([{"kind": k, "ckpt": c, "plan": p["total"], "measured": m} for k, c, p, m in rows], open(opts["json"], "w"))


def main(argv):
    opts = dict(a[2:].split("=", 1) for a in argv)
    d = train.init_distributed()
    if "loading" in opts:
        loading(opts["loading"], d, opts)
    else:
        plan_vs_measured(d, opts)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
