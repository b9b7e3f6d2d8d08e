"""Fully sharded data parallelism (`Sharded`), written out over torch.distributed collectives, behind
the same interface as plain data parallelism (ddp.Replicated):

    engine = Sharded(model, d, strategy="full")
    loss_sum, n = engine.forward_backward(batch, loss_scale=1 / n_global, sync=True)
    engine.clip_grad_norm_(1.0); opt.step()      # opt = AdamW(engine.param_groups(weight_decay))
    engine.forward(input_ids, labels=...)         # eval and generation (model.generate(forward=...))
    checkpoint.save_checkpoint(path, engine, opt, step, extra) / checkpoint.load_checkpoint(path, engine, opt)
    engine.export_hf(path) / engine.export_adapter(path)

Sharding. Each of the S ranks of a shard group keeps 1/S of every weight. A *unit* (the embedding,
each transformer block, the final norm + head; a tied embedding and head are one unit) is
all-gathered just before it computes and freed right after, so a rank holds its shards plus at most
prefetch + 1 full units. A unit's gradients are reduce-scattered as soon as its backward is done,
so each rank ends with the summed gradient of its own shard, and the optimizer updates only that.
Strategies (--shard): full (ZeRO-3, the above), grad_op (ZeRO-2: units stay gathered from the first
forward of a step to its last backward), hybrid (HSDP: shard within groups of --shard_group ranks,
e.g. a node, and all-reduce the sharded gradients across groups).

Storage. A unit's tensors are flattened into one buffer per *group* of tensors that share a dtype
and a role: trainable weights (fp32 master shard, gathered in `param_dtype`), frozen float weights
(kept and gathered as loaded) and NF4 tensors (gathered byte for byte). A buffer is padded to a
multiple of S; shard rank r keeps [r * n / S, (r + 1) * n / S). The full buffer is one tensor whose
storage is resized to the full size to gather and to zero to free; module attributes are views of
it, so model.py's code runs unchanged on gathered units.

The schedule (`schedule`, also what `plan.plan_memory` walks): embed, block 0 .. L-1, head (loss, and its
backward through norm and head), then block L-1 .. 0 backward; a trainable embedding's backward
needs no weights and runs last. Before a unit computes, the gathers of the next `prefetch` units
are issued; a unit is freed after it computes unless it comes back within that window (the last
block stays gathered across the head into its backward). With checkpointing (model.block) only the
blocks' inputs are kept; without it each block's autograd graph keeps views of its buffers, valid
again once the unit is re-gathered for its backward. On CUDA gathers run on a side stream, and at
most prefetch + 1 units' buffers are in flight (events); on CPU (gloo) async work handles.

hf.stream_from_pretrained loads an HF folder one unit at a time straight into shards.
checkpoint.py saves and loads the engines' state (re-sharded on load at another world size);
plan.py predicts what a rank will hold at its peak.
"""

import contextlib
import math
from collections import deque

import torch
import torch.distributed as dist
import torch.nn as nn

import hf
from lora import dense_tensors, save_adapter
from model import Llama
from distributed import any_rank, autocast

STRATEGIES = ("full", "grad_op", "hybrid")
OFFLOAD = ("none", "frozen", "all")
# torch 2.13 renamed the tensor-in, tensor-out collectives (the old names warn on every call).
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def offloaded(offload, trainable):
    """Does a group's shard live in (pinned) CPU memory? "frozen": only frozen groups (the NF4 base,
    norms, embeddings: most of the bytes of (Q)LoRA); "all": every shard, so gradients and AdamW
    state follow to the CPU and the optimizer steps there."""
    if offload not in OFFLOAD:
        raise ValueError(f"offload={offload!r} is not one of {', '.join(OFFLOAD)}")
    return offload == "all" or (offload == "frozen" and not trainable)


def shard_groups(d, strategy, group_size=0):
    """(shard group, its size S, this rank's index in it, replicate group or None). Every rank
    creates every group, in the same order, as torch.distributed requires."""
    if strategy not in STRATEGIES:
        raise ValueError(f"shard strategy {strategy!r} is not one of {', '.join(STRATEGIES)}")
    if d.world == 1:
        return None, 1, 0, None
    if strategy != "hybrid":
        return dist.group.WORLD, d.world, d.rank, None
    S = group_size
    if S < 1 or d.world % S:
        raise ValueError(f"--shard_group={S} must divide the world size {d.world} (--shard=hybrid)")
    shard = replicate = None
    for g in range(d.world // S):
        pg = dist.new_group(list(range(g * S, (g + 1) * S)))
        shard = pg if d.rank // S == g else shard
    for i in range(S):
        pg = dist.new_group(list(range(i, d.world, S)))
        replicate = pg if d.rank % S == i else replicate
    return shard, S, d.rank % S, (replicate if d.world > S else None)


class FlatGroup:
    """Tensors of one unit sharing a dtype and a role, flattened into one sharded buffer."""

    def __init__(self, tensors, trainable, decay, *, param_dtype, groups, device, offload):
        # tensors: list of (tensor, [(module, attribute name), ...]); a tied tensor has two owners
        self.owners = [owners for _, owners in tensors]
        self.shapes = [t.shape for t, _ in tensors]
        self.numels = [t.numel() for t, _ in tensors]
        self.numel = sum(self.numels)
        self.pg, self.world, self.rank, self.replicate = groups
        self.shard_numel = math.ceil(self.numel / self.world)
        self.trainable, self.decay, self.device, self.offloaded = trainable, decay, device, offload
        storage_dtype = torch.float32 if trainable else tensors[0][0].dtype
        self.gather_dtype = param_dtype if trainable else storage_dtype
        lo, hi = self.rank * self.shard_numel, (self.rank + 1) * self.shard_numel
        shard = torch.zeros(self.shard_numel, dtype=storage_dtype, device="cpu" if offload else device)
        start = 0  # copy this rank's slice tensor by tensor, never building the whole flat buffer
        for t, _ in tensors:
            a, b = max(lo, start), min(hi, start + t.numel())
            if a < b:
                shard[a - lo:b - lo] = t.detach().reshape(-1)[a - start:b - start].to(shard.device, storage_dtype)
            start += t.numel()
        if offload and device.type == "cuda":
            shard = shard.pin_memory()
        self.shard = nn.Parameter(shard, requires_grad=trainable)
        # Alone in its shard group, a frozen shard on the device already is the full buffer.
        self.resident = self.world == 1 and not trainable and not offload
        self.full = self.shard.detach() if self.resident else torch.empty(
            self.shard_numel * self.world, dtype=self.gather_dtype, device=device)
        self.full.requires_grad_(trainable)  # its views are what modules compute with; grads land in full.grad
        self.acc = None  # fp32 sum of the full gradients of micro-batches not yet reduced (sync=False)
        self.landing = []  # offload="all" on CUDA: (pinned gradient slice, event) still being copied

    def gather(self):
        """Issue the all-gather of the full buffer (async); returns the work handle or None."""
        if self.resident:
            return None
        with torch.no_grad():
            self.full.untyped_storage().resize_(self.full.numel() * self.full.element_size())
            # Pinned CPU -> GPU without blocking, then the cast on the GPU (an offloaded shard is fp32).
            shard = self.shard.detach().to(self.device, non_blocking=True).to(self.gather_dtype)
            # .data: writing the gathered values must not bump the version counter that autograd
            # checks on tensors saved from this buffer in an earlier forward.
            if self.world == 1:
                self.full.data.copy_(shard)
                return None
            return all_gather_single(self.full.data, shard, group=self.pg, async_op=True)

    def gather_master(self):
        """The full fp32 master values (blocking), whatever dtype the compute copy is gathered in."""
        full = torch.empty(self.shard_numel * self.world, dtype=torch.float32, device=self.device)
        shard = self.shard.detach().to(self.device)
        if self.world == 1:
            return full.copy_(shard)
        all_gather_single(full, shard, group=self.pg)
        return full

    def bind(self, full=None):
        """Point every owner's attribute at its view of the (gathered) full buffer."""
        full = self.full if full is None else full
        # One split, not a slice per tensor: in backward a slice's gradient is a zero-filled
        # full-size buffer per tensor, while split's is one concatenation for the whole unit.
        pieces = full.split(self.numels + [full.numel() - self.numel])
        for owners, shape, piece in zip(self.owners, self.shapes, pieces):
            for module, name in owners:
                setattr(module, name, piece.view(shape))

    def free(self):
        if not self.resident:
            self.full.untyped_storage().resize_(0)

    def stash(self):
        """sync=False: move this micro-batch's full gradient into the fp32 sum (a bf16 sum of 16
        micro-batches drifts by ~0.5%)."""
        g, self.full.grad = self.full.grad, None
        if g is not None:
            self.acc = g.float() if self.acc is None else self.acc.add_(g)

    def reduce_scatter(self, reduce_dtype):
        """Issue the reduce-scatter (sum) of the full gradient into this rank's slice (async):
        (work, output). A rank whose batch gave this group no gradient sends zeros, so every rank
        issues the same collectives in the same order."""
        g, self.full.grad = self.full.grad, None
        if self.acc is not None:  # earlier micro-batches, summed in fp32
            g = self.acc.add_(g) if g is not None else self.acc
        grad = (g if g is not None else torch.zeros_like(self.full)).to(reduce_dtype)
        self.acc = None
        out = torch.empty(self.shard_numel, dtype=reduce_dtype, device=self.device)
        if self.world == 1:
            return None, out.copy_(grad)
        return reduce_scatter_single(out, grad, group=self.pg, async_op=True), out

    def accumulate(self, out):
        """Add a reduced gradient slice into the shard's .grad (fp32, where the shard lives)."""
        if self.replicate is not None:  # hybrid: sum the slice over the replicas of this shard
            dist.all_reduce(out, group=self.replicate)
        g = out.to(torch.float32)  # cast where the gradient is (the GPU), not on the CPU
        if g.is_cuda and self.shard.device.type == "cpu":  # offload="all": to pinned memory, not blocking
            landing = torch.empty(g.shape, dtype=g.dtype, pin_memory=True).copy_(g, non_blocking=True)
            self.landing.append((landing, torch.cuda.current_stream().record_event()))
            return
        self.shard.grad = g.to(self.shard.device) if self.shard.grad is None else self.shard.grad.add_(g)

    def settle(self):
        """Add the gradient slices copied to pinned memory, once their copies are done."""
        for landing, event in self.landing:
            event.synchronize()
            self.shard.grad = landing if self.shard.grad is None else self.shard.grad.add_(landing)
        self.landing = []


def group_tensors(modules):
    """The distinct tensors (parameters, and buffers such as NF4 codes) under `modules`, grouped by
    (dtype, trainable, decayed): {key: [(tensor, [(owner module, attribute), ...]), ...]}."""
    seen, groups = {}, {}
    for module in modules:
        for sub in module.modules():
            for k, t in list(sub._parameters.items()) + list(sub._buffers.items()):
                if t is None:
                    continue
                if id(t) not in seen:
                    seen[id(t)] = (t, [])
                    key = (t.dtype, t.requires_grad, t.requires_grad and t.dim() >= 2)
                    groups.setdefault(key, []).append(seen[id(t)])
                seen[id(t)][1].append((sub, k))
    return groups


def unit_module_lists(model):
    """The shard units, (name, modules): embedding, each block, final norm + head; with tied
    embeddings the first and last are one unit, "outer"."""
    m = model.model
    blocks = [(f"block{i}", [layer]) for i, layer in enumerate(m.layers)]
    if model.args.tie_embeddings:
        return [("outer", [m.embed_tokens, m.norm, model.lm_head])] + blocks
    return [("embed", [m.embed_tokens])] + blocks + [("head", [m.norm, model.lm_head])]


def schedule(n_blocks, train=True):
    """The order units compute in, as positions: 0 the embedding, 1..L the blocks, L + 1 the head
    (the same unit as 0 when tied). Training runs the loss's backward through the head at once,
    then the blocks' backward in reverse."""
    forward = list(range(n_blocks + 2))
    return forward + (list(range(n_blocks, 0, -1)) if train else [])


def reduce_order(n_blocks):
    """The positions in the order training completes their gradients (Sharded.forward_backward
    reduces each then): the head's with the loss's backward, each block's after its own backward in
    the schedule's order, the embedding's last (a tied head's unit is reduced only then, once)."""
    return [n_blocks + 1] + schedule(n_blocks)[n_blocks + 2:] + [0]


class Unit:
    """The tensors of some modules (a block, the embedding, norm + head), in FlatGroups."""

    def __init__(self, name, modules, *, param_dtype, groups, device, offload, materialize=None):
        self.name, self.modules, self.state, self.works, self.pending = name, modules, "free", [], []
        if materialize is not None:  # load this unit's weights now (the model was built on the meta device)
            materialize(modules)
        tensors = group_tensors(modules)
        self.groups = [FlatGroup(ts, trainable, decay, param_dtype=param_dtype, groups=groups, device=device,
                                 offload=offloaded(offload, trainable))
                       for (_, trainable, decay), ts in tensors.items()]
        for _, owners in [entry for ts in tensors.values() for entry in ts]:
            for sub, k in owners:  # the modules now compute with plain attributes: views of the buffers
                sub._parameters.pop(k, None)
                sub._buffers.pop(k, None)
        for g in self.groups:
            g.bind()  # views made while the buffer has memory stay valid objects once it is freed
            g.free()

    @property
    def trainable(self):
        return any(g.trainable for g in self.groups)


class Sharded:
    lockstep = True  # every forward gathers weights from every rank: all ranks run the same forwards

    def __init__(self, model: Llama, d, *, prefetch=1, param_dtype=torch.float32, reduce_dtype=torch.float32,
                 offload="none", strategy="full", shard_group=0, amp_dtype=None, loss_chunk=0, log_events=False,
                 materialize=None, reduce_every_micro=True):
        """d: train.Dist (rank, world, device). Shards `model` in place. The model is either on
        d.device already, or on the meta device with materialize(modules) loading one unit's
        modules at a time (hf.stream_from_pretrained), so the whole model never exists on any rank."""
        self.reduce_every_micro = reduce_every_micro  # the loop syncs every micro-batch (frees full gradients)
        self.model, self.d, self.prefetch, self.strategy = model, d, prefetch, strategy
        self.reduce_dtype, self.loss_chunk, self.amp_dtype = reduce_dtype, loss_chunk, amp_dtype
        groups = shard_groups(d, strategy, shard_group)
        self.pg, self.shard_world = groups[0], groups[1]
        self.units = [Unit(name, mods, param_dtype=param_dtype, groups=groups, device=d.device, offload=offload,
                           materialize=materialize)
                      for name, mods in unit_module_lists(model)]
        self.at = self.units + ([self.units[0]] if model.args.tie_embeddings else [])  # schedule position -> unit
        self.stream = torch.cuda.Stream(d.device) if d.device.type == "cuda" else None
        self.freed = deque()  # CUDA: events after which a freed unit's memory is no longer read
        self.events = [] if log_events else None  # ("gather" | "wait" | "compute" | "free" | "reduce", unit, n gathered)
        names = {id(mod): name for name, mod in model.named_modules()}
        self.names = {id(g): [names[id(owners[0][0])] + "." + owners[0][1] for owners in g.owners]
                      for u in self.units for g in u.groups}

    def amp(self):
        return autocast(self.d.device, self.amp_dtype)

    def describe(self):
        """One log line: the sharding, and what this rank holds."""
        groups = [g for u in self.units for g in u.groups]
        frozen = sum(g.numel * g.shard.element_size() for g in groups if not g.trainable)
        return (f"fsdp: {self.strategy} sharding over {self.shard_world} ranks, {len(self.units)} units; frozen tensors "
                f"{frozen / 2**20:.1f} MiB in all; {self.held_bytes() / 2**20:.1f} MiB of shards on this rank; prefetch "
                f"{self.prefetch}, checkpointing {self.model.gradient_checkpointing}, reduce in "
                f"{str(self.reduce_dtype).removeprefix('torch.').replace('float32', 'fp32').replace('bfloat16', 'bf16')}")

    # -- the moves on a unit ---------------------------------------------------------------

    def log(self, what, unit):
        if self.events is not None:
            self.events.append((what, unit.name, sum(u.state != "free" for u in self.units)))

    def issue_gather(self, unit):
        if unit.state != "free":
            return
        if self.stream is not None:  # at most prefetch + 1 units' buffers in use, freed ones included
            while self.freed and self.freed[0].query():
                self.freed.popleft()
            while self.freed and len(self.freed) + sum(u.state != "free" for u in self.units) > self.prefetch:
                self.freed.popleft().synchronize()
        unit.state = "pending"
        self.log("gather", unit)
        if self.stream is not None:  # on the side stream, after what the compute stream has queued
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                unit.works = [g.gather() for g in unit.groups]  # <- all_gather issued
        else:
            unit.works = [g.gather() for g in unit.groups]  # <- all_gather issued

    def wait_gather(self, unit):
        self.issue_gather(unit)
        if unit.state == "ready":
            return
        for w in unit.works:  # <- all-gathers waited for
            if w is not None:
                w.wait()
        if self.stream is not None:
            torch.cuda.current_stream().wait_stream(self.stream)
            for g in unit.groups:  # the caching allocator must not reuse this memory while compute uses it
                g.full.record_stream(torch.cuda.current_stream())
        unit.works, unit.state = [], "ready"
        for g in unit.groups:
            g.bind()
        self.log("wait", unit)

    def free(self, unit):
        if unit.state == "free":
            return
        for g in unit.groups:
            g.free()
        unit.state = "free"
        if self.stream is not None:
            self.freed.append(torch.cuda.current_stream().record_event())
        self.log("free", unit)

    @contextlib.contextmanager
    def computing(self, order, i, keep=False):
        """Step i of a schedule (a list of units): prefetch, wait for the unit, compute (the body),
        then free it unless it comes back within the next step's window (or keep: grad_op)."""
        for u in order[i + 1:i + 1 + self.prefetch]:
            self.issue_gather(u)  # prefetch: issued before this unit computes
        self.wait_gather(order[i])
        self.log("compute", order[i])
        yield
        if not keep and order[i] not in order[i + 1:i + 2 + self.prefetch]:
            self.free(order[i])

    def reduce(self, unit, sync):
        """A unit's gradient is complete: issue its reduce-scatter (sync), or keep it in fp32."""
        if not unit.trainable:
            return
        if not sync:
            for g in unit.groups:
                if g.trainable:
                    g.stash()
            return
        # An in-flight reduce-scatter keeps its full-size gradient alive: wait for the previous
        # unit's first; it has had this unit's backward to finish in.
        self.finish_reduces()
        for g in unit.groups:
            if g.trainable:
                unit.pending.append((g, *g.reduce_scatter(self.reduce_dtype)))  # <- reduce_scatter issued
        self.log("reduce", unit)

    def finish_reduces(self):
        for unit in self.units:
            for g, work, out in unit.pending:
                if work is not None:
                    work.wait()  # <- reduce-scatters waited for
                g.accumulate(out)
            unit.pending = []

    # -- the training step: the schedule as two plain loops ----------------------------------

    def forward_backward(self, batch, loss_scale=1.0, sync=True, loss_fn=None):
        """One micro-batch: the loss (summed over target tokens; and the token count), and the
        backward of loss * loss_scale. sync=True reduce-scatters the gradients into the shards'
        .grad; sync=False keeps them, in fp32, for the next micro-batch. loss_fn (e.g. dpo.DPO):
        its prepare(self, batch) runs first, and its head(model, x, batch) replaces the model's loss."""
        if loss_fn is not None:
            loss_fn.prepare(self, batch)
        m, n_blocks, keep = self.model, len(self.model.model.layers), self.strategy == "grad_op"
        order = [self.at[i] for i in schedule(n_blocks)]
        self.free_if_stepped()
        outputs = []  # per block: (input leaf, output)
        # forward: each block's input is a leaf, so that each block's backward runs on its own
        with self.computing(order, 0, keep), self.amp():
            emb, ctx = m.embed(batch["input_ids"], batch.get("position_ids"), batch.get("doc_ids"))
        x = emb.detach().requires_grad_(True)
        for j in range(n_blocks):
            with self.computing(order, 1 + j, keep), self.amp():
                y = m.block(j, x, ctx)  # with checkpointing (model.block) only x is kept
            outputs.append((x, y))
            x = y.detach().requires_grad_(True)
        with self.computing(order, n_blocks + 1, keep):
            with self.amp():
                loss, n = loss_fn.head(m, x, batch) if loss_fn else m.head(x, batch["labels"], self.loss_chunk)
            (loss * loss_scale).backward()  # through norm and head while they are gathered
        if self.at[-1] is not self.at[0]:
            self.reduce(self.at[-1], sync)  # the head's gradient is complete (untied)
        grad = x.grad
        # backward: each block re-gathered (prefetching the next), recomputed if checkpointing
        for j in reversed(range(n_blocks)):
            with self.computing(order, 2 * n_blocks + 1 - j, keep):
                x, y = outputs[j]
                y.backward(grad)
            grad, outputs[j] = x.grad, None
            self.reduce(self.at[1 + j], sync)  # async; the next block's backward overlaps it
        if emb.requires_grad:  # a trainable embedding scatters gradient rows: no weights needed
            emb.backward(grad)
        self.reduce(self.at[0], sync)
        if sync:
            self.finish_reduces()
            for g in self.trainable_groups():
                g.settle()
        return loss.detach(), n

    def free_if_stepped(self):
        """grad_op keeps units gathered across a step's micro-batches. Once the optimizer has stepped
        and zeroed the gradients (no shard .grad and no unsynced sum left) the gathered copies are
        stale: free them, so the next forward gathers the new weights. (So grad_op needs
        zero_grad(set_to_none=True), torch's default, after each step.)"""
        if any(g.shard.grad is not None or g.acc is not None for g in self.trainable_groups()):
            return  # within a step
        for unit in self.units:
            self.free(unit)

    @torch.no_grad()
    def forward(self, input_ids, labels=None, position_ids=None, doc_ids=None, cache=None, loss_chunk=0, *, head=None):
        """Llama.forward under sharding (eval, generation): one gather per unit, with prefetching.
        head(model, x): what to compute from the last block's output instead of model.head."""
        m, n_blocks = self.model, len(self.model.model.layers)
        order = [self.at[i] for i in schedule(n_blocks, train=False)]
        self.free_if_stepped()
        with self.computing(order, 0), self.amp():
            x, ctx = m.embed(input_ids, position_ids, doc_ids, cache)
        for j in range(n_blocks):
            with self.computing(order, 1 + j), self.amp():
                x = m.block(j, x, ctx, cache)
        with self.computing(order, n_blocks + 1), self.amp():
            return head(m, x) if head else m.head(x, labels, loss_chunk or self.loss_chunk, cache)

    __call__ = forward

    # -- optimizer side -----------------------------------------------------------------

    def trainable_groups(self):
        return [g for u in self.units for g in u.groups if g.trainable]

    def param_groups(self, weight_decay):
        groups = self.trainable_groups()
        return [{"params": [g.shard for g in groups if g.decay], "weight_decay": weight_decay},
                {"params": [g.shard for g in groups if not g.decay], "weight_decay": 0.0}]

    def clip_grad_norm_(self, max_norm):
        """Clip by the norm of the whole gradient: squares summed over local shards, then over the
        shard group (replicas of a shard hold the same gradient)."""
        grads = [g.shard.grad for g in self.trainable_groups() if g.shard.grad is not None]
        sq = sum((g.float().pow(2).sum() for g in grads), torch.zeros((), device=self.d.device)).to(self.d.device)
        if self.shard_world > 1:
            dist.all_reduce(sq, group=self.pg)
        norm = sq.sqrt()
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(scale.to(g.device))
        return norm

    def held_bytes(self):
        """Bytes of weights this rank keeps between steps: its shards."""
        return sum(g.shard.numel() * g.shard.element_size() for u in self.units for g in u.groups)

    def counts(self):
        """(trainable parameters, adapter parameters), whole model."""
        numels = {n: g.numels[k] for g in self.trainable_groups() for k, n in enumerate(self.names[id(g)])}
        return sum(numels.values()), sum(v for n, v in numels.items() if ".lora_" in n)

    # -- whole tensors, one unit at a time --------------------------------------------------

    @torch.no_grad()
    def gathered_units(self):
        """Yield each unit gathered (every rank must iterate), trainable tensors as fp32 masters."""
        self.free_if_stepped()
        for unit in self.units:
            self.wait_gather(unit)
            for g in unit.groups:
                if g.trainable:
                    g.bind(g.gather_master())
            yield unit
            for g in unit.groups:
                if g.trainable:
                    g.bind()  # back to the compute buffer: the fp32 copy is dropped with this unit
            self.free(unit)

    def trainable_state(self):
        """Name -> full fp32 tensor of every trainable tensor (our names); every rank joins."""
        state = {}
        for unit in self.gathered_units():
            for g in unit.groups:
                for name, owners in zip(self.names[id(g)] if g.trainable else [], g.owners):
                    state[name] = getattr(*owners[0]).detach().cpu().clone()
        return state

    def export_hf(self, path, extra_files=None, dtype=torch.bfloat16):
        """The trained model as an HF folder: one safetensors file per unit, so rank 0 holds one unit
        at a time (adapters merged, NF4 dequantized). Every rank joins the gathers."""
        names = {id(mod): name for name, mod in self.model.named_modules()}

        def unit_states():
            for unit in self.gathered_units():
                state = {name: t.detach().to("cpu", dtype).contiguous().clone() for mod in unit.modules
                         for name, t in dense_tensors(names[id(mod)], mod)}
                if self.model.args.tie_embeddings:
                    state.pop("lm_head.weight", None)
                yield state

        states, error = unit_states(), None
        if self.d.rank == 0:
            try:
                hf.write_hf_folder(path, self.model.args, states, len(self.units), dtype, extra_files)
            except ValueError as e:  # a failed write (disk full): the temp folder is already gone
                error = e
        for _ in states:  # the gathers left, which the other ranks are in (all of them, on ranks > 0)
            pass
        if any_rank(self.d, error is not None):
            raise error or ValueError(f"{path}: rank 0 could not write the export (its error says why)")

    def export_adapter(self, path, base_model_name_or_path=""):
        """The trained adapters in PEFT's layout (fp32 masters), written by rank 0."""
        state = {"base_model.model." + k: v for k, v in self.trainable_state().items()}
        if self.d.rank == 0:
            save_adapter(self.model, path, base_model_name_or_path, state=state)

    # -- checkpoints: this rank's shards; re-sharded on load ----------------------------------

    def layout(self):
        return [(u.name, g.numel, str(g.shard.dtype)) for u in self.units for g in u.groups]

    def checkpoint_state(self, opt):
        return {"shards": [g.shard.detach().cpu() for u in self.units for g in u.groups], "layout": self.layout(),
                "shard_world": self.shard_world, "optimizer": opt.state_dict()}

    def load_checkpoint_state(self, old, opt, path):
        """old: every saved rank's checkpoint_state. Saved at another shard-group size, each buffer
        and each AdamW state tensor is re-assembled from the first group's files and re-sliced."""
        if [tuple(x) for x in old[0]["layout"]] != self.layout():
            raise ValueError(f"{path}: saved for a different model, --adapter, --expand_blocks or --lora_target")
        S_old, groups = old[0]["shard_world"], [g for u in self.units for g in u.groups]

        def reshard(pieces, g):
            if S_old == g.world:
                return pieces[g.rank].clone()  # not a view of the memory-mapped file a later save deletes
            full = torch.cat([p.reshape(-1) for p in pieces[:S_old]])[:g.numel]
            part = full[g.rank * g.shard_numel:(g.rank + 1) * g.shard_numel]
            return torch.cat([part, part.new_zeros(g.shard_numel - part.numel())])

        with torch.no_grad():
            for i, g in enumerate(groups):
                g.shard.copy_(reshard([o["shards"][i] for o in old], g))
        trainable = [g for grp in self.param_groups(0.0) for p in grp["params"] for g in groups if g.shard is p]
        state = dict(old[0]["optimizer"])  # its tensors are replaced by this rank's slices below
        state["state"] = {k: {name: (reshard([o["optimizer"]["state"][k][name] for o in old], trainable[k])
                                     if torch.is_tensor(v) and v.dim() == 1 else v) for name, v in s.items()}
                          for k, s in state["state"].items()}
        opt.load_state_dict(state)
