"""Hand-written FSDP (fsdp.py) against PyTorch's FSDP2 (fully_shard) on the same model and batch.

    torchrun --nproc_per_node=2 bench/fsdp.py                     # CPU: gloo, tiny preset, fp32
    torchrun --nproc_per_node=4 bench/fsdp.py                     # also --shard=hybrid as 2 x 2
    torchrun --nproc_per_node=N bench/fsdp.py --model=tinyllama-1.1b --seq_len=2048 --batch_size=2   # GPU

Full fine-tuning, one micro-batch per step, AdamW, activation checkpointing on; random weights.
Reported per implementation: median step time, tokens/s (all ranks), MFU on a GPU (6 FLOPs per
weight per token plus attention, as train.py), peak GPU memory, and from a profiler trace of one
step, the time spent in collectives and the share of it that overlaps compute:
    comm = the union of the collectives' intervals (GPU: NCCL kernels; CPU: gloo's worker threads)
    hidden = |comm intersected with compute| / |comm|   (compute: the other GPU kernels; CPU: the
             top-level ops of the main thread)
Ours runs once per sharding strategy (full = ZeRO-3, grad_op = ZeRO-2, hybrid = HSDP over groups of
world / 2 ranks, at even world sizes above 2) and plain data parallelism (ddp.Replicated). For
full sharding also, from timing: (step time with prefetch 0 - with prefetch 1) / (the same collectives
alone), i.e. how much of the communication prefetching actually saved (prefetch 0 waits for every
gather right before the unit computes).
"""

import os
import statistics
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ddp  # noqa: E402
import fsdp as F  # noqa: E402
import model as M  # noqa: E402
import plan  # noqa: E402
import train  # noqa: E402
from compare import step_times  # noqa: E402  (bench/compare.py)


def timed_steps(step, device, n):
    return statistics.median(step_times(step, device, warmup=1, steps=n))


def union(intervals):
    merged = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return merged


def overlap(xs, ys):
    """Total length of the intersection of two merged, sorted interval lists."""
    total, j = 0.0, 0
    for a, b in xs:
        while j < len(ys) and ys[j][1] <= a:
            j += 1
        k = j
        while k < len(ys) and ys[k][0] < b:
            total += min(b, ys[k][1]) - max(a, ys[k][0])
            k += 1
    return total


def traced_comm(step, cuda):
    """(seconds in collectives, share of them overlapping compute) from a profiler trace of one step."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    events = prof.events()
    if cuda:
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        comm = [(e.time_range.start, e.time_range.end) for e in kernels if "nccl" in e.name.lower()]
        compute = [(e.time_range.start, e.time_range.end) for e in kernels if "nccl" not in e.name.lower()]
    else:
        main = max({e.thread for e in events}, key=lambda t: sum(e.thread == t for e in events))
        comm = [(e.time_range.start, e.time_range.end) for e in events if e.thread != main and e.name.startswith("gloo:")]
        compute = [(e.time_range.start, e.time_range.end) for e in events
                   if e.thread == main and e.cpu_parent is None and e.name.startswith("aten::")]
    comm, compute = union(comm), union(compute)
    total = sum(b - a for a, b in comm)
    return total / 1e6, (overlap(comm, compute) / total if total else 0.0)


def build(preset, device, seed=0):
    torch.manual_seed(seed)
    with torch.device(device):
        m = M.Llama(M.MODELS[preset])
        m.init_weights()
    return m


def main(argv):
    opts = dict(a[2:].split("=", 1) for a in argv)
    d = train.init_distributed()
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    cuda = d.device.type == "cuda"
    preset = opts.get("model", "tinyllama-1.1b" if cuda else "tiny")
    B, T, n = int(opts.get("batch_size", 2 if cuda else 8)), int(opts.get("seq_len", 2048 if cuda else 128)), int(opts.get("steps", 5))
    dtype = torch.bfloat16 if cuda else torch.float32
    autocast = torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=cuda)
    g = torch.Generator().manual_seed(d.rank)
    ids = torch.randint(0, M.MODELS[preset].vocab_size, (B, T), generator=g).to(d.device)
    rows = []

    def ours(prefetch=1, strategy="full", replicated=False):
        model = build(preset, d.device)
        model.gradient_checkpointing = True
        if replicated:
            engine = ddp.Replicated(model, d, amp_dtype=dtype if cuda else None, loss_chunk=1024)
        else:
            engine = F.Sharded(model, d, prefetch=prefetch, param_dtype=dtype, strategy=strategy, shard_group=d.world // 2,
                               amp_dtype=dtype if cuda else None, loss_chunk=1024)
        opt = torch.optim.AdamW(engine.param_groups(0.0), lr=1e-5)

        def step():
            engine.forward_backward({"input_ids": ids, "labels": ids}, loss_scale=1 / (B * T * d.world))
            engine.clip_grad_norm_(1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t = timed_steps(step, d.device, n)
        pk = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        return t, pk, model, traced_comm(step, cuda), engine, opt

    def comm_only(engine, opt):  # full sharding's collectives in schedule order, nothing to overlap with
        order = [engine.at[i] for i in F.schedule(len(engine.model.model.layers))]
        for unit in order:
            engine.wait_gather(unit)
            engine.free(unit)
        for unit in engine.units:
            for grp in unit.groups:
                if grp.trainable:
                    grp.full.grad = torch.zeros(grp.full.shape, dtype=grp.gather_dtype, device=d.device)
            engine.reduce(unit, sync=True)
        engine.finish_reduces()
        opt.zero_grad(set_to_none=True)

    t1, peak, model, trace1, engine, opt = ours(1)
    comm = timed_steps(lambda: comm_only(engine, opt), d.device, n)
    t0, _, _, trace0, _, _ = ours(0)
    flops = plan.flops_per_token(model.args, T)
    peak_flops = plan.peak_flops(d.device)
    saved = max(0.0, (t0 - t1) / comm) if comm > 0 else 0.0
    rows.append(("fsdp.py full, prefetch 1", t1, peak, trace1, f"{min(saved, 1):.0%}"))
    rows.append(("fsdp.py full, prefetch 0", t0, None, trace0, "0% (by construction)"))
    rows.append(("collectives alone", comm, None, None, ""))
    for strategy in ["grad_op"] + (["hybrid"] if d.world > 2 and d.world % 2 == 0 else []):
        t, pk, _, trace, _, _ = ours(1, strategy)
        rows.append((f"fsdp.py {strategy}", t, pk, trace, ""))
    t, pk, _, trace, _, _ = ours(replicated=True)
    rows.append(("ddp.Replicated (plain DP)", t, pk, trace, ""))

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    m2 = build(preset, d.device)
    m2.gradient_checkpointing = True
    mesh = init_device_mesh(d.device.type, (d.world,))
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for layer in m2.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(m2, mesh=mesh, mp_policy=mp)
    opt2 = torch.optim.AdamW(m2.parameters(), lr=1e-5)

    def step2():
        with autocast:
            s, _ = m2(ids, labels=ids, loss_chunk=1024)
        (s / (B * T)).backward()
        torch.nn.utils.clip_grad_norm_(m2.parameters(), 1.0)
        opt2.step()
        opt2.zero_grad(set_to_none=True)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t2 = timed_steps(step2, d.device, n)
    peak2 = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    rows.append(("PyTorch FSDP2 (fully_shard)", t2, peak2, traced_comm(step2, cuda), ""))

    if d.rank == 0:
        dev = torch.cuda.get_device_name() if cuda else "CPU (gloo)"
        print(f"{preset}, world {d.world}, {B} x {T} tokens per rank, full fine-tuning, checkpointing, {dev}, torch {torch.__version__}")
        print(f"{'':<30}{'ms/step':>9}{'tok/s':>10}{'MFU':>7}{'peak GiB':>10}{'comm ms':>9}{'hidden':>8}"
              "  saved by prefetch")
        for name, t, pk, trace, saved in rows:
            tok = B * T * d.world / t
            mfu = f"{tok * flops / (peak_flops * d.world):.1%}" if peak_flops and trace else "-"
            tok_s = f"{tok:,.0f}" if trace else "-"
            comm_ms, hidden = (f"{trace[0] * 1e3:.1f}", f"{trace[1]:.0%}") if trace else ("-", "-")
            print(f"{name:<30}{t * 1e3:>9.1f}{tok_s:>10}{mfu:>7}"
                  f"{(f'{pk:.2f}' if pk else '-'):>10}{comm_ms:>9}{hidden:>8}  {saved}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
