"""The memory plan: what each rank will hold at the peak of a training step, computed from a model on
the meta device (nothing allocated), for `train.py --dry_run` (`print_plan`) and bench/memory.py,
which measures the peak against it. At the end, the other counting train.py logs: `describe` (the
model in one line) and `flops_per_token` / `peak_flops` (for MFU).

Weights follow fsdp.py exactly: the same units, groups, padding, offloading and `fsdp.schedule`
(the units gathered at a moment are that schedule's prefetch window). Activations are written out
from the tensors the code keeps for backward. The peak is the largest of a few moments of a step.
It lives apart from fsdp.py because it is arithmetic about the mechanism, not the mechanism.
"""

import math

import torch

from fsdp import group_tensors, offloaded, reduce_order, schedule, unit_module_lists
from kernels import HAS_TRITON
from lora import LoRALinear
from model import ModelArgs
from quant import QuantLinear, base_bytes

def activation_bytes_per_token(model, act, kernels):
    """Bytes per token kept for backward: (by one block, outside the blocks for the whole step,
    by the final norm until the head's backward), written out from the tensors the code saves. act:
    bytes of the compute dtype (2 bf16, 4 fp32).

    A block keeps its input x; each RMSNorm keeps its input (the PyTorch reference keeps an fp32
    copy, which is x itself in fp32; the kernel keeps x), an fp32 rstd per row and, in the
    reference when its weight trains, x_hat; the projections keep their inputs (the two norm
    outputs, the attention output, the SwiGLU output) and attention keeps q, k, v and an fp32
    log-sum-exp per head (flash attention; its output is laid out so that o_proj's input is a view
    of it). SwiGLU keeps gate and up (the reference also silu(gate)); each adapter keeps its rank-r
    middle. Outside the blocks: the embedding's output, RoPE's cos and sin, and the final norm.
    """
    a = model.args
    q, kv = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim
    x_hat = act * a.dim if model.model.norm.weight.requires_grad else 0  # for the weight's gradient

    def norm(input_is_kept):  # what an RMSNorm adds to what is already kept
        if kernels:
            return (0 if input_is_kept else act * a.dim) + 4
        return (0 if input_is_kept and act == 4 else 4 * a.dim) + x_hat + 4

    block = (act * a.dim + norm(True) + norm(False)  # input, the two norms
             + act * (2 * a.dim + q + a.ffn_dim)  # the projections' inputs
             + act * (q + 2 * kv) + 4 * a.n_heads  # q, k, v, log-sum-exp
             + act * a.ffn_dim * (2 if kernels else 3))  # gate, up (, silu(gate))
    block += sum(act * m.rank for m in model.model.layers[0].modules() if isinstance(m, LoRALinear)) if a.n_layers else 0
    block += (act * (q + kv) + 4 * (a.n_heads + a.n_kv_heads)) if a.qk_norm else 0  # Qwen3's q / k norms: input, rstd
    outside = act * a.dim + 2 * act * a.head_dim  # the embedding's output, cos and sin
    head = norm(False) + act * a.dim  # the final norm and its output, until the head's backward
    return block, outside, head


def unit_bytes(model, world, offload, param_bytes):
    """Per unit of unit_module_lists: (gathered bytes, full gradient bytes, sharded gradient bytes,
    AdamW bytes), and the (GPU, CPU) bytes of all shards; Sharded's grouping, padding, offloading."""
    rows, gpu, cpu = [], 0, 0
    for _, modules in unit_module_lists(model):
        full = grad = sgrad = optim = 0
        for (dtype, trainable, _), tensors in group_tensors(modules).items():
            shard = math.ceil(sum(t.numel() for t, _ in tensors) / world)
            size = 4 if trainable else torch.empty((), dtype=dtype).element_size()
            if offloaded(offload, trainable):
                cpu += shard * size
            else:
                gpu += shard * size
            if trainable or world > 1 or offloaded(offload, trainable):  # else resident: the shard is the buffer
                full += shard * world * (param_bytes if trainable else size)
            if trainable:
                grad, sgrad, optim = grad + shard * world * param_bytes, sgrad + shard * 4, optim + shard * 8
        rows.append((full, grad, sgrad, optim))
    return rows, gpu, cpu


def plan_memory(model, world, batch_size, seq_len, *, prefetch=1, checkpointing=True, param_bytes=2, reduce_every_micro=True,
                offload="none", loss_chunk=0, kernels=False, strategy="full", shard_group=0, galore_rank=0,
                offload_activations=False, dpo=False):
    """Predicted peak bytes per rank, by category, without allocating (the model may be on the
    meta device). Returns (gpu, cpu): the GPU bytes of each category at the peak, and their
    "total"; the pinned CPU bytes with offload.

    param_bytes is the compute dtype's size: trainable weights are gathered in it and activations
    are kept in it. kernels: the Triton kernels run (CUDA); they keep less for backward than the
    PyTorch references. galore_rank: the optimizer state is optim.GaLoreAdamW's (unsharded).
    offload_activations: the blocks' kept inputs are on the CPU, each back on the GPU for its backward.
    Shards are 1/S of each buffer, S = world (hybrid: shard_group). Units
    gathered at a moment are those of `schedule`'s window (grad_op: all of them).

    The peak is the largest of these moments of a step (after the first, which creates AdamW's state):
    - the loss: every block's activations kept (checkpointing: only the blocks' inputs), and the
      logits at their largest;
    - the backward of each block j: the activations of blocks 0..j (checkpointing: their inputs,
      and block j recomputed), the gradients in flight through the block (two hidden-sized and two
      ffn-sized tensors at most), its dequantized quantized weight, the full gradients of the unit (of
      the unit before it in backward, whose reduce-scatter is in flight when S > 1, and of a tied
      outer unit, kept to the end), and the sharded gradients of the units already reduced;
    - the embedding's backward, when it trains: a dense gradient of the table, then the unit's;
    - the optimizer step (fused AdamW: no temporaries) with every sharded gradient.
    The logits are fp32 for the rows computed at once (all, or loss_chunk; DPO: loss_chunk or 4096):
    log-softmax's output and, in backward, two more of the same size; the fused kernel instead holds 4096-row chunks of
    logits in the compute dtype and the gradients of the head's input (and weight, when it trains).
    """
    a, n_blocks = model.args, model.args.n_layers
    S = shard_group if strategy == "hybrid" else world
    rows, gpu_shards, cpu_shards = unit_bytes(model, S, offload, param_bytes)
    optim = galore_bytes(model, galore_rank) if galore_rank else sum(r[3] for r in rows)
    pos = list(range(n_blocks + 1)) + [0 if a.tie_embeddings else n_blocks + 1]  # schedule position -> unit of `rows`
    order = [pos[i] for i in schedule(n_blocks)]
    full = [r[0] for r in rows]
    gathered = sum(full) if strategy == "grad_op" else \
        max(sum(full[u] for u in set(order[i:i + prefetch + 1])) for i in range(len(order)))
    tokens, act = batch_size * seq_len, param_bytes
    block, outside, head = activation_bytes_per_token(model, act, kernels)
    if kernels and not dpo:
        logits = min(tokens, 4096 if loss_chunk <= 0 else loss_chunk) * a.vocab_size * act + tokens * a.dim * act
        logits += a.vocab_size * a.dim * act if rows[pos[-1]][1] else 0
    else:  # DPO's answer log-probabilities always go through the head in chunks (model.row_logprobs)
        chunk = loss_chunk or (4096 if dpo else 0)
        logits = (chunk if 0 < chunk < tokens else tokens) * a.vocab_size * 4 * 3
    on_gpu = offload != "all"  # else sharded gradients and AdamW state live on the CPU
    static = {"weight shards": gpu_shards, "gathered units": gathered, "optimizer": optim if on_gpu else 0}
    kept = act * a.dim if checkpointing else block  # per block and token, between its forward and its backward
    moments = step_moments(model, rows, [pos[i] for i in reduce_order(n_blocks)], static, S=S, on_gpu=on_gpu,
                           tokens=tokens, act=act, kept=kept, block=block if checkpointing else 0, outside=outside,
                           head=head, logits=logits, param_bytes=param_bytes, reduce_every_micro=reduce_every_micro,
                           offload_activations=offload_activations)
    gpu = max(moments, key=lambda m: sum(m.values()))
    gpu["total"] = sum(gpu.values())
    cpu = {"weight shards": cpu_shards, "gradients": 0 if on_gpu else sum(r[2] for r in rows),
           "optimizer": 0 if on_gpu else optim} if offload != "none" else {}
    if offload_activations:
        cpu["activations"] = tokens * n_blocks * kept
    return gpu, cpu


def galore_bytes(model, rank):
    """optim.GaLoreAdamW's state, unsharded: low-rank moments + projection for the blocks' matrices."""
    return sum(4 * min(rank, *p.shape) * (2 * max(p.shape) + min(p.shape)) if p.dim() == 2 and ".layers." in n
               else 8 * p.numel() for n, p in model.named_parameters() if p.requires_grad)


def step_moments(model, rows, backward, static, *, S, on_gpu, tokens, act, kept, block, outside, head, logits,
                 param_bytes, reduce_every_micro, offload_activations):
    """The GPU bytes at each moment of plan_memory's docstring, by category. rows: unit_bytes';
    backward: the units in the order their gradients complete (fsdp.reduce_order); kept: a block's
    activations per token kept to its backward; block: what its recomputation holds (checkpointing)."""
    a, n_blocks, tied = model.args, model.args.n_layers, model.args.tie_embeddings
    grad, sgrad = [r[1] for r in rows], [r[2] for r in rows]
    kept_gpu = 0 if offload_activations else kept
    dequant = max([m.in_features * m.out_features * param_bytes for m in model.modules() if isinstance(m, QuantLinear)] + [0])
    accumulated = 0 if reduce_every_micro else sum(grad) // param_bytes * 4  # fp32 sums kept across micro-batches
    moment = lambda **kw: dict(static, **dict({"gradients": 0, "activations": 0, "dequantized weight": 0, "logits": 0}, **kw))  # noqa: E731
    moments = [moment(gradients=accumulated, activations=tokens * (n_blocks * kept_gpu + outside + head), logits=logits)]
    held = grad[0] if tied else 0  # a tied outer unit's gradient waits for the embedding's backward
    for k in range(1, n_blocks + 1):
        j, unit, before = n_blocks - k, backward[k], backward[k - 1]
        reducing = grad[before] if S > 1 and not (tied and before == 0) else 0
        reduced = sum(sgrad[u] for u in backward[:k - 1] if not (tied and u == 0)) if on_gpu else 0
        acts = tokens * ((j + 1) * kept_gpu + (kept if offload_activations else 0) + block + outside
                         + 2 * act * (a.dim + a.ffn_dim))
        moments.append(moment(gradients=reduced + (accumulated or held + grad[unit] + reducing), activations=acts,
                              **{"dequantized weight": dequant}))
    if model.model.embed_tokens.weight.requires_grad:  # its backward: a dense [vocab, dim] gradient, then the unit's
        reduced, reducing = (sum(sgrad[1:]) if on_gpu else 0), (grad[1] if S > 1 else 0)
        moments.append(moment(gradients=reduced + (accumulated or held + reducing) + a.vocab_size * a.dim * act + grad[0],
                              activations=tokens * outside))
    # The optimizer step (fused AdamW, as train.py uses on CUDA: no temporaries): every sharded gradient.
    moments.append(moment(**{"gathered units": 0}, gradients=sum(sgrad) if on_gpu else 0))
    return moments


def plan_run(model, cfg, world, amp, *, reference_bytes=0, kernels=False, shard_group=0, checkpointing=True):
    """plan_memory for train.py's Config `cfg` on a meta-device `model` as built (build.meta_model);
    amp: the autocast dtype or None; reference_bytes: DPO's frozen copy, whole; kernels: the Triton
    kernels that keep less for backward run (a GPU); shard_group: --shard=hybrid's group size.
    Returns (gpu, cpu) as plan_memory."""
    gpu, cpu = plan_memory(model, world, cfg.batch_size, cfg.seq_len, prefetch=cfg.prefetch,
                           checkpointing=checkpointing, param_bytes=2 if amp is not None else 4,
                           reduce_every_micro=cfg.reduce_every_micro, offload=cfg.offload, loss_chunk=cfg.loss_chunk,
                           kernels=kernels, strategy=cfg.shard, shard_group=shard_group,
                           galore_rank=cfg.galore_rank if cfg.optimizer == "galore" else 0,
                           offload_activations=cfg.offload_activations, dpo=cfg.objective == "dpo")
    if reference_bytes:  # DPO's reference under full fine-tuning: a frozen copy, sharded like the model (--fsdp)
        shards = (shard_group if cfg.shard == "hybrid" else world) if cfg.fsdp else 1
        copy = math.ceil(reference_bytes / shards)
        where = cpu if cfg.fsdp and cfg.offload != "none" else gpu  # offloaded as a frozen shard
        total = where.pop("total", None)
        where["reference model"] = copy
        if total is not None:  # the CPU table has no total
            where["total"] = total + copy
    return gpu, cpu


def triton_keeps_less(cfg):
    """Do the Triton kernels that keep less for backward run, on a GPU, under --kernels / --kernels_off?"""
    return HAS_TRITON and cfg.kernels == "triton" and not {"rmsnorm", "swiglu", "linear_ce"} & set(cfg.kernels_off.split(","))


def print_plan(model, cfg, world, amp, reference_bytes=0, kind=""):
    """--dry_run's table (plan_run), for a GPU."""
    kernels, group = triton_keeps_less(cfg), cfg.shard_group or min(world, 8)  # hybrid: nodes of 8 GPUs
    recompute = cfg.grad_checkpointing == "full" or cfg.offload_activations  # auto: as if the activations fit
    gpu, cpu = plan_run(model, cfg, world, amp, reference_bytes=reference_bytes, kernels=kernels, shard_group=group,
                        checkpointing=recompute)
    shard = f"hybrid (shard groups of {group}, replicated {world // group}x)" if cfg.shard == "hybrid" else cfg.shard
    print(f"memory plan: {cfg.model} {kind}, world {world}, --shard={shard}, batch {cfg.batch_size} x {cfg.seq_len}, "
          f"checkpointing {'full' if recompute else 'none'}{' (auto)' if cfg.grad_checkpointing == 'auto' else ''}, prefetch {cfg.prefetch}, offload {cfg.offload}, "
          f"loss_chunk {cfg.loss_chunk}, Triton kernels {'on' if kernels else 'off'}; {describe(model)}")
    print("per rank, GPU at the peak:" + "".join(f"\n  {k:<20}{v / 2**30:8.2f} GiB" for k, v in gpu.items()))
    if cpu:
        print("per rank, CPU (pinned):" + "".join(f"\n  {k:<20}{v / 2**30:8.2f} GiB" for k, v in cpu.items()))


def available_bytes(device, local_world=1):
    """(bytes one rank may use on its device, bytes it may use in host memory), None where unknown:
    a GPU's free memory; the host's MemAvailable shared by the processes on it, and no more than the
    process's address-space limit (ulimit -v)."""
    import resource
    host = None
    try:
        with open("/proc/meminfo") as f:
            host = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")) // max(local_world, 1)
    except (OSError, StopIteration, ValueError):  # not Linux
        pass
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit != resource.RLIM_INFINITY:
        host = limit if host is None else min(host, limit)
    gpu = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    return gpu, host


# -----------------------------------------------------------------------------
# What the log and --dry_run print: the model in one line, and compute per token


def describe(model):
    """One log line: parameters (a quantized weight counts as its in * out), trainable share, frozen bytes."""
    params = {id(p): p for p in model.parameters()}.values()  # a tied head once
    q_bytes, q_params, other = base_bytes(model)
    total = sum(p.numel() for p in params) + q_params
    trainable = sum(p.numel() for p in params if p.requires_grad)
    line = f"{total / 1e6:.2f}M parameters, {trainable / 1e6:.3f}M trainable ({trainable / total:.2%})"
    if trainable < total:
        line += f"; frozen base {(q_bytes + other) / 2**20:.1f} MiB"
        if q_params:
            fmt = next(m for m in model.modules() if isinstance(m, QuantLinear)).extra_repr().split(", ", 2)[-1]
            line += f" ({q_bytes / 2**20:.1f} MiB {fmt} for {q_params / 1e6:.2f}M weights = {8 * q_bytes / q_params:.3f} bits each)"
    return line


def flops_per_token(args: ModelArgs, seq_len, frozen_base=False, adapter_params=0):
    """Training FLOPs per token actually needed: per weight 2 forward + 2 for the input gradient
    + 2 for the weight gradient, where a frozen base weight (LoRA) skips the last 2; adapters cost
    the full 6. Plus attention scores and values, 6 * 2 * n_layers * seq_len * n_heads * head_dim
    (PaLM appendix B; causal halving ignored)."""
    n = args.num_params() - args.vocab_size * args.dim  # the embedding lookup is no matmul
    return (4 if frozen_base else 6) * n + 6 * adapter_params + 12 * args.n_layers * seq_len * args.n_heads * args.head_dim


def peak_flops(device):
    """Dense bf16 peak of the GPU, for MFU; None where unknown."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12), ("A10", 125e12),
                       ("4090", 165e12), ("3090", 71e12)):
        if key in name:
            return flops
    return None
