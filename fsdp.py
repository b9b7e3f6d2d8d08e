"""Fully sharded data parallelism (FSDP), written out over torch.distributed collectives.

    sharded = Sharded(model, dist_state, prefetch=1, checkpointing=True)
    loss_sum, n = sharded.forward_backward(batch, loss_scale=1 / n_global, sync=True)
    sharded.clip_grad_norm_(1.0); opt.step()          # opt = AdamW(sharded.parameters())

The idea. Each rank of W keeps 1/W of every weight. A *unit* (the embedding + final norm + head,
and each transformer block) is all-gathered just before it computes and freed right after, so at
any moment a rank holds its shards plus one or two full units. Gradients of a unit are
reduce-scattered as soon as its backward is done, so each rank ends with the summed gradient of
its own shard only, and the optimizer updates only that shard.

Storage. A unit's tensors are flattened into one buffer per *group* of tensors that share a
dtype and a role: trainable weights (fp32 master shard, gathered in `param_dtype`), frozen float
weights (norms, embeddings: kept and gathered as loaded), and NF4 tensors (packed bytes and their
scales, gathered byte for byte). A buffer is padded to a multiple of W; rank r keeps the slice
[r * n / W, (r + 1) * n / W). The full buffer is a tensor whose storage is resized to the full size
to gather and to zero to free; module attributes are views into it. Tied weights (SmolLM2's
embedding and head) are one tensor in the outer unit, so they stay tied.

The loop (forward_backward), in order; each collective is issued and waited for on a named line:
    forward:  outer (embedding) -> block 0 ... block L-1 -> outer (norm, head, loss)
              before unit i computes, the gathers of units i+1 .. i+prefetch are issued (async)
    backward: outer (head) -> block L-1 ... block 0 -> outer (embedding)
              re-gather the unit (prefetching the next ones), recompute its forward when
              checkpointing, backward through it, issue its reduce-scatter (async), free it
    then wait for every reduce-scatter and add the results into the shards' .grad
With checkpointing only block inputs are kept between forward and backward; without it each
block's autograd graph is kept, and its saved tensors are views of the freed buffers, valid again
once the unit is re-gathered before its backward.

On CUDA gathers run on a side stream so that the next unit's all-gather overlaps this unit's
compute. On CPU (gloo) the same code runs, with async work handles instead of streams.

Below the loop: `stream_from_pretrained` (load an HF folder one unit at a time straight into
shards), `export_hf` / `export_adapter` (gathered unit by unit, written by rank 0),
`save_sharded` / `load_sharded` (per-rank checkpoints, re-sharded on load at another world size)
and `plan_memory` (what a rank will hold, computed on the meta device).
"""

import json
import math
import os

import torch
import torch.distributed as dist
import torch.nn as nn

import model as M
from quant import Linear4bit


class FlatGroup:
    """Tensors of one unit sharing a dtype and a role, flattened into one sharded buffer."""

    def __init__(self, tensors, trainable, decay, param_dtype, rank, world, device, offload):
        # tensors: list of (tensor, [(module, attribute name), ...]); a tied tensor has two owners
        self.owners = [owners for _, owners in tensors]
        self.shapes = [t.shape for t, _ in tensors]
        self.numels = [t.numel() for t, _ in tensors]
        self.numel = sum(self.numels)
        self.shard_numel = math.ceil(self.numel / world)
        self.trainable, self.decay, self.rank, self.world, self.device = trainable, decay, rank, world, device
        storage_dtype = torch.float32 if trainable else tensors[0][0].dtype
        self.gather_dtype = param_dtype if trainable else storage_dtype
        self.offloaded = offload
        lo, hi = rank * self.shard_numel, (rank + 1) * self.shard_numel
        shard = torch.zeros(self.shard_numel, dtype=storage_dtype, device="cpu" if offload else device)
        # Copy this rank's slice, tensor by tensor, never building the whole flat buffer.
        start = 0
        for t, _ in tensors:
            a, b = max(lo, start), min(hi, start + t.numel())
            if a < b:
                shard[a - lo:b - lo] = t.detach().reshape(-1)[a - start:b - start].to(shard.device, storage_dtype)
            start += t.numel()
        if offload and device.type == "cuda":
            shard = shard.pin_memory()
        self.shard = nn.Parameter(shard, requires_grad=trainable)
        # On one rank a frozen shard on the device already is the full buffer: no copy to gather.
        self.resident = world == 1 and not trainable and not offload
        if self.resident:
            self.full = self.shard.detach()
        else:
            self.full = torch.empty(self.shard_numel * world, dtype=self.gather_dtype, device=device)
        self.full.requires_grad_(trainable)  # its views are what modules compute with; grads land in full.grad

    def gather(self):
        """Issue the all-gather of the full buffer (async); returns the work handle."""
        if self.resident:
            return None
        with torch.no_grad():
            self.full.untyped_storage().resize_(self.full.numel() * self.full.element_size())
            shard = self.shard.detach().to(self.device, self.gather_dtype, non_blocking=True)
            # .data: writing the gathered values must not bump the version counter that autograd
            # checks on tensors saved from this buffer in an earlier forward.
            if self.world == 1:
                self.full.data.copy_(shard)
                return None
            return dist.all_gather_into_tensor(self.full.data, shard, async_op=True)

    def gather_master(self):
        """The full fp32 master values (blocking), whatever dtype the compute copy is gathered in."""
        full = torch.empty(self.shard_numel * self.world, dtype=torch.float32, device=self.device)
        shard = self.shard.detach().to(self.device)
        if self.world == 1:
            return full.copy_(shard)
        dist.all_gather_into_tensor(full, shard)
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

    def reduce_scatter(self, reduce_dtype):
        """Issue the reduce-scatter (sum) of full.grad into this rank's slice (async): (work, output)."""
        grad = self.full.grad.to(reduce_dtype)
        self.full.grad = None
        out = torch.empty(self.shard_numel, dtype=reduce_dtype, device=self.device)
        if self.world == 1:
            return None, out.copy_(grad)
        return dist.reduce_scatter_tensor(out, grad, async_op=True), out

    def accumulate(self, out):
        g = out.to(self.shard.device, torch.float32)
        self.shard.grad = g if self.shard.grad is None else self.shard.grad + g


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
    """The shard units: (name, modules). The outer unit holds what is not in a block."""
    m = model.model
    return [("outer", [m.embed_tokens, m.norm, model.lm_head])] + [(f"block{i}", [layer]) for i, layer in enumerate(m.layers)]


OFFLOAD = ("none", "frozen", "all")


def offloaded(offload, trainable):
    """Does a group's shard live in (pinned) CPU memory? offload="frozen": only frozen groups (the
    NF4 base, norms, embeddings: most of the bytes for (Q)LoRA) while the small trainable shards,
    their gradients and AdamW state stay on the GPU; "all": every shard, so gradients and optimizer
    state follow to the CPU and the optimizer steps there."""
    if offload not in OFFLOAD:
        raise ValueError(f"offload={offload!r} is not one of {', '.join(OFFLOAD)}")
    return offload == "all" or (offload == "frozen" and not trainable)


class Unit:
    """The tensors of some modules (a block, or embedding + norm + head), in FlatGroups."""

    def __init__(self, name, modules, trainable_dtype, rank, world, device, offload, materialize=None):
        self.name, self.modules, self.state, self.works, self.pending = name, modules, "free", [], []
        if materialize is not None:  # load this unit's weights now (the model was built on the meta device)
            materialize(modules)
        groups = group_tensors(modules)
        self.groups = [FlatGroup(tensors, trainable, decay, trainable_dtype, rank, world, device, offloaded(offload, trainable))
                       for (_, trainable, decay), tensors in groups.items()]
        # The modules now compute with plain attributes (views into the gathered buffers).
        for _, owners in [entry for tensors in groups.values() for entry in tensors]:
            for sub, k in owners:
                sub._parameters.pop(k, None)
                sub._buffers.pop(k, None)
        for g in self.groups:
            g.bind()  # views made while the buffer has memory; they stay valid objects once it is freed
            g.free()

    @property
    def trainable(self):
        return any(g.trainable for g in self.groups)


class Sharded:
    def __init__(self, model: M.Llama, d, prefetch=1, checkpointing=True, param_dtype=torch.float32,
                 reduce_dtype=torch.float32, offload="none", log_events=False, materialize=None):
        """d: train.Dist (rank, world, device). Shards `model` in place. The model is either on
        d.device already, or on the meta device with materialize(modules) loading one unit's
        modules at a time (stream_from_pretrained), so the whole model never exists on any rank."""
        self.model, self.d, self.prefetch, self.checkpointing = model, d, prefetch, checkpointing
        self.reduce_dtype = reduce_dtype
        self.units = [Unit(name, mods, param_dtype, d.rank, d.world, d.device, offload, materialize)
                      for name, mods in unit_module_lists(model)]
        self.outer, self.blocks = self.units[0], self.units[1:]
        self.stream = torch.cuda.Stream(d.device) if d.device.type == "cuda" else None
        self.events = [] if log_events else None  # ("gather" | "wait" | "compute" | "free" | "reduce", unit)
        self.managed = False  # True inside forward_backward; else hooks gather on demand (eval, generate)
        for unit in self.units:
            for module in unit.modules:
                module.register_forward_pre_hook(lambda mod, args, u=unit: self._on_demand(u))
                module.register_forward_hook(lambda mod, args, out, u=unit: self._release(u))

    # -- the four moves on a unit --------------------------------------------------------

    def log(self, what, unit):
        if self.events is not None:
            self.events.append((what, unit.name, sum(u.state != "free" for u in self.units)))

    def issue_gather(self, unit):
        if unit.state != "free":
            return
        unit.state = "pending"
        self.log("gather", unit)
        if self.stream is not None:  # on the side stream, after what the compute stream has queued
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                unit.works = [g.gather() for g in unit.groups]  # <- all_gather_into_tensor issued
        else:
            unit.works = [g.gather() for g in unit.groups]  # <- all_gather_into_tensor issued

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
        self.log("free", unit)

    def issue_reduce(self, unit):
        # A reduce-scatter in flight keeps its full-size gradient alive until it is waited for, so
        # wait for the previous unit's first: it has had this unit's backward to finish in.
        self.finish_reduces()
        for g in unit.groups:
            if g.trainable and g.full.grad is not None:
                work, out = g.reduce_scatter(self.reduce_dtype)  # <- reduce_scatter_tensor issued
                unit.pending.append((g, work, out))
        self.log("reduce", unit)

    def finish_reduces(self):
        for unit in self.units:
            for g, work, out in unit.pending:
                if work is not None:
                    work.wait()  # <- reduce-scatters waited for
                g.accumulate(out)
            unit.pending = []

    # Outside forward_backward (eval, generate), hooks gather a unit on demand. They stay eager
    # under torch.compile (--compile compiles each block, hooks included): storage resizes and
    # collectives are not things to trace.
    @torch.compiler.disable
    def _on_demand(self, unit):
        if not self.managed:
            self.wait_gather(unit)

    @torch.compiler.disable
    def _release(self, unit):
        if not self.managed:
            self.free(unit)

    # -- the training step -----------------------------------------------------------------

    def run(self, schedule, i):
        """Step i of the schedule (a list of (unit, fn)): prefetch the next units, wait for this one,
        compute, and free it unless it comes back within the prefetch window."""
        upcoming = [u for u, _ in schedule[i + 1:i + 1 + self.prefetch]]
        for u in upcoming:
            self.issue_gather(u)  # prefetch: issued before this unit computes
        unit, fn = schedule[i]
        self.wait_gather(unit)
        self.log("compute", unit)
        out = fn()
        if unit not in upcoming:
            self.free(unit)
        return out

    def forward_backward(self, input_ids, labels, position_ids=None, doc_ids=None, loss_chunk=0, loss_scale=1.0,
                         sync=True, autocast=None):
        """One micro-batch: the loss (summed over target tokens; and the token count), and the
        backward of loss * loss_scale. sync=True reduce-scatters the gradients into the shards'
        .grad; sync=False keeps the full gradients for the next micro-batch (accumulation without
        communication until the last micro-batch)."""
        m, ckpt, s = self.model, self.checkpointing, {}
        autocast = autocast or torch.autocast(input_ids.device.type, enabled=False)
        saved = []  # per block: (input leaf, output, RNG state before its forward)

        def embed():
            with autocast:
                s["emb"] = m.model.embed_tokens(input_ids)
            s["cos"], s["sin"], s["mask"] = m.rope_and_mask(input_ids, position_ids, doc_ids, None, s["emb"].dtype)
            s["x"] = s["emb"].detach().requires_grad_(True)

        def block(j):
            def fn():
                x = s["x"]
                rng = torch.get_rng_state(), (torch.cuda.get_rng_state(x.device) if x.is_cuda else None)
                with torch.set_grad_enabled(not ckpt), autocast:  # checkpointing: no graph, only x is kept
                    y = m.model.layers[j](x, s["cos"], s["sin"], s["mask"])
                saved.append((x, y, rng))
                s["x"] = y.detach().requires_grad_(True)
            return fn

        def head():
            with autocast:
                s["loss"], s["n"] = M.cross_entropy_sum(m.model.norm(s["x"]), m.lm_head, labels, loss_chunk)
            (s["loss"] * loss_scale).backward()  # norm + head backward: the outer unit is still gathered
            s["grad"] = s["x"].grad

        def back_block(j):
            def fn():
                x, y, (cpu_rng, cuda_rng) = saved[j]
                saved[j] = None  # once x.grad is passed on, neither x nor its gradient is kept
                if ckpt:  # recompute the block's forward with the same dropout masks, keeping the graph
                    with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
                        torch.set_rng_state(cpu_rng)
                        if cuda_rng is not None:
                            torch.cuda.set_rng_state(cuda_rng, x.device)
                        with torch.enable_grad(), autocast:
                            y = m.model.layers[j](x, s["cos"], s["sin"], s["mask"])
                y.backward(s["grad"])
                s["grad"] = x.grad
            return fn

        def back_embed():
            if s["emb"].requires_grad:  # a trainable embedding (full fine-tuning)
                s["emb"].backward(s["grad"])

        L = len(self.blocks)
        schedule = ([(self.outer, embed)] + [(self.blocks[j], block(j)) for j in range(L)] + [(self.outer, head)]
                    + [(self.blocks[j], back_block(j)) for j in reversed(range(L))] + [(self.outer, back_embed)])
        last = {id(u): i for i, (u, _) in enumerate(schedule)}  # the step after which a unit's gradient is complete
        self.managed = True
        for i in range(len(schedule)):
            self.run(schedule, i)
            unit = schedule[i][0]
            if sync and i > L and last[id(unit)] == i and unit.trainable:
                self.issue_reduce(unit)  # async; the next unit's backward overlaps it
        if sync:
            self.finish_reduces()
        self.managed = False
        return s["loss"].detach(), s["n"]

    # -- optimizer side -----------------------------------------------------------------

    def parameters(self):
        return [g.shard for u in self.units for g in u.groups if g.trainable]

    def param_groups(self, weight_decay):
        groups = [g for u in self.units for g in u.groups if g.trainable]
        return [{"params": [g.shard for g in groups if g.decay], "weight_decay": weight_decay},
                {"params": [g.shard for g in groups if not g.decay], "weight_decay": 0.0}]

    def clip_grad_norm_(self, max_norm):
        """Clip by the norm of the whole gradient: sum of squares over local shards, summed over ranks."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        sq = sum((g.float().pow(2).sum() for g in grads), torch.zeros((), device=self.d.device)).to(self.d.device)
        if self.d.world > 1:
            dist.all_reduce(sq)
        norm = sq.sqrt()
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in grads:
            g.mul_(scale.to(g.device))
        return norm

    # -- whole tensors, one unit at a time --------------------------------------------------

    @torch.no_grad()
    def gathered_units(self):
        """Yield each unit gathered (every rank must iterate), trainable tensors as fp32 masters."""
        for unit in self.units:
            self.wait_gather(unit)
            for g in unit.groups:
                if g.trainable:
                    g.bind(g.gather_master())
            yield unit
            self.free(unit)


def stream_from_pretrained(model: M.Llama, path, device, dtype, then=None):
    """A `materialize` for Sharded: read just the given modules' tensors from the HF folder (NF4
    targets quantize as they arrive), then call then(modules) (e.g. to add adapters)."""
    shapes = M.checkpoint_shapes(model)  # taken now: sharded modules stop listing their parameters
    names = {id(mod): name for name, mod in model.named_modules()}

    def materialize(modules):
        prefixes = tuple(names[id(mod)] + "." for mod in modules)
        M.load_tensors(model, path, device, dtype, only={k for k in shapes if k.startswith(prefixes)}, shapes=shapes)
        if then is not None:
            then(modules)
    return materialize


def trainable_state(sharded: Sharded):
    """Name -> full fp32 tensor of every trainable tensor (our parameter names); every rank joins."""
    names = {id(mod): name for name, mod in sharded.model.named_modules()}
    state = {}
    for unit in sharded.gathered_units():
        for g in unit.groups:
            if g.trainable:
                for owners in g.owners:
                    module, attr = owners[0]
                    state[(names[id(module)] + "." + attr).lstrip(".")] = getattr(module, attr).detach().cpu().clone()
    return state


def dense_tensors(prefix, module):
    """HF name -> dense tensor for the leaves under `module`: adapters merged, NF4 dequantized."""
    import lora as L
    if isinstance(module, L.LoRALinear):
        yield prefix + ".weight", module.dense_weight()
        if module.base_layer.bias is not None:
            yield prefix + ".bias", module.base_layer.bias
        return
    if isinstance(module, Linear4bit):
        yield prefix + ".weight", module.dequantize(torch.float32)
        if module.bias is not None:
            yield prefix + ".bias", module.bias
        return
    children = list(module.named_children())
    if not children:
        for k in ("weight", "bias"):
            t = getattr(module, k, None)
            if isinstance(t, torch.Tensor):
                yield f"{prefix}.{k}", t
    for name, child in children:
        yield from dense_tensors(f"{prefix}.{name}", child)


def export_hf(sharded: Sharded, path, extra_files=(), dtype=torch.bfloat16):
    """The trained model as an HF folder: one safetensors file per unit, so rank 0 holds one unit at
    a time (adapters merged, NF4 dequantized). Every rank must call this (it joins the gathers)."""
    names = {id(mod): name for name, mod in sharded.model.named_modules()}

    def unit_states():
        for unit in sharded.gathered_units():
            state = {name: t.detach().to("cpu", dtype).contiguous().clone() for mod in unit.modules
                     for name, t in dense_tensors(names[id(mod)], mod)}
            if sharded.model.args.tie_embeddings:
                state.pop("lm_head.weight", None)
            yield state

    if sharded.d.rank == 0:
        M.write_hf_folder(path, sharded.model.args, unit_states(), len(sharded.units), dtype, extra_files)
    else:
        for _ in unit_states():
            pass


def export_adapter(sharded: Sharded, path, base_model_name_or_path=""):
    """The trained adapters in PEFT's layout (fp32 masters), written by rank 0."""
    import lora as L
    state = {"base_model.model." + k: v for k, v in trainable_state(sharded).items()}
    if sharded.d.rank == 0:
        L.save_adapter(sharded.model, path, base_model_name_or_path, state=state)


# -- the memory plan: what a rank will hold, from a meta-device model ----------------------


def activation_bytes_per_token(model, act, kernels):
    """Bytes per token kept for backward: (by one block, outside the blocks for the whole step,
    by the final norm until the head's backward), written out from the tensors the code saves. act: bytes of the compute dtype (2 bf16, 4 fp32).

    A block keeps its input x; each RMSNorm keeps its input (the PyTorch reference keeps an fp32
    copy, which is x itself in fp32; the kernel keeps x), an fp32 rstd per row and, in the
    reference when its weight trains, x_hat; the projections keep their inputs (the two norm outputs, the attention output, the
    SwiGLU output) and attention keeps q, k, v and an fp32 log-sum-exp per head (flash attention;
    its output is laid out so that o_proj's input is a view of it). SwiGLU keeps gate and up (the
    reference also silu(gate)); each adapter keeps its rank-r middle. Outside the blocks: the
    embedding's output, RoPE's cos and sin, and the final norm.
    """
    import lora as L
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
    block += sum(act * m.rank for m in model.model.layers[0].modules() if isinstance(m, L.LoRALinear)) if a.n_layers else 0
    outside = act * a.dim + 2 * act * a.head_dim  # the embedding's output, cos and sin
    head = norm(False) + act * a.dim  # the final norm and its output, until the head's backward
    return block, outside, head


def plan_memory(model, world, batch_size, seq_len, prefetch=1, checkpointing=True, param_bytes=2, reduce_every_micro=True,
                offload="none", loss_chunk=0, kernels=False):
    """Predicted peak bytes per rank, by category, without allocating (the model may be on the
    meta device). Returns (gpu, cpu): the GPU bytes of each category at the peak, and their
    "total"; the pinned CPU bytes with offload.

    param_bytes is the compute dtype's size: trainable weights are gathered in it and activations
    are kept in it. kernels: the Triton kernels run (CUDA); they keep less for backward than the
    PyTorch references. Weights follow the same grouping, padding and offloading as Sharded.

    The peak is the largest of these moments of a step (after the first, which creates AdamW's
    state):
    - the loss: every block's activations kept (checkpointing: only the blocks' inputs), and the
      logits at their largest;
    - the backward of each block j: the activations of blocks 0..j (checkpointing: their inputs,
      and block j recomputed), the gradients in flight through the block (two hidden-sized and
      two ffn-sized tensors at most), its dequantized 4-bit weight, the full gradients of the unit
      (and of the outer unit, kept from the head's backward to the end, and with world > 1 of
      block j + 1, whose reduce-scatter is in flight), and the sharded gradients of the blocks
      after j;
    - the embedding's backward, when it trains: a dense gradient of the table, then the unit's
      gradient it is added to;
    - the optimizer step (fused AdamW: no temporaries) with every sharded gradient.
    The logits are fp32 for the rows computed at once (all, or loss_chunk): log-softmax's output
    and, in backward, two more of the same size; the fused kernel instead holds 4096-row chunks of
    logits in the compute dtype and the gradients of the head's input (and weight, when it trains).
    """
    a, L = model.args, model.args.n_layers
    gpu_shards = cpu_shards = optim = 0
    unit_full, unit_grad, shard_grad = [], [], []  # per unit: gathered bytes, full gradient bytes, sharded gradient bytes
    for _, modules in unit_module_lists(model):
        full = grad = sgrad = 0
        for (dtype, trainable, _), tensors in group_tensors(modules).items():
            shard = math.ceil(sum(t.numel() for t, _ in tensors) / world)
            size = 4 if trainable else torch.empty((), dtype=dtype).element_size()
            if offloaded(offload, trainable):
                cpu_shards += shard * size
            else:
                gpu_shards += shard * size
            if trainable or world > 1 or offloaded(offload, trainable):  # else resident: the shard is the buffer
                full += shard * world * (param_bytes if trainable else size)
            if trainable:
                grad += shard * world * param_bytes
                sgrad += shard * 4
                optim += shard * 8  # AdamW's exp_avg and exp_avg_sq in fp32
        unit_full.append(full)
        unit_grad.append(grad)
        shard_grad.append(sgrad)
    # Units gathered: the current one and `prefetch` ahead, along the forward + backward schedule.
    order = [0] + list(range(1, L + 1)) + [0] + list(range(L, 0, -1)) + [0]
    gathered = max(sum(unit_full[u] for u in set(order[i:i + prefetch + 1])) for i in range(len(order)))
    tokens, act = batch_size * seq_len, param_bytes
    block, outside, head = activation_bytes_per_token(model, act, kernels)
    kept = act * a.dim if checkpointing else block  # per block and token, between its forward and its backward
    dequant = max([m.in_features * m.out_features * param_bytes for m in model.modules() if isinstance(m, Linear4bit)] + [0])
    if kernels:
        logits = min(tokens, 4096 if loss_chunk <= 0 else loss_chunk) * a.vocab_size * act + tokens * a.dim * act
        logits += a.vocab_size * a.dim * act if unit_grad[0] else 0
    else:
        logits = (loss_chunk if 0 < loss_chunk < tokens else tokens) * a.vocab_size * 4 * 3
    on_gpu = offload != "all"  # else sharded gradients and AdamW state live on the CPU
    static = {"weight shards": gpu_shards, "gathered units": gathered, "optimizer": optim if on_gpu else 0}
    accumulated = 0 if reduce_every_micro else sum(unit_grad)  # full gradients kept across micro-batches
    moments = [dict(static, gradients=accumulated, activations=tokens * (L * kept + outside + head), **{"dequantized weight": 0},
                    logits=logits)]
    for j in reversed(range(L)):
        reducing = unit_grad[j + 2] if world > 1 and j + 2 <= L else 0  # the previous block's, still in flight
        grads = (sum(shard_grad[j + 2:]) if on_gpu else 0) + (accumulated or unit_grad[0] + unit_grad[j + 1] + reducing)
        acts = tokens * ((j + 1) * kept + (block if checkpointing else 0) + outside + 2 * act * (a.dim + a.ffn_dim))
        moments.append(dict(static, gradients=grads, activations=acts, **{"dequantized weight": dequant}, logits=0))
    if model.model.embed_tokens.weight.requires_grad:  # its backward: a dense [vocab, dim] gradient, then the unit's
        grads = (sum(shard_grad[1:]) if on_gpu else 0) + (accumulated or unit_grad[0]) + a.vocab_size * a.dim * act + unit_grad[0]
        moments.append(dict(static, gradients=grads, activations=tokens * outside, **{"dequantized weight": 0}, logits=0))
    # The optimizer step (fused AdamW, as train.py uses on CUDA: no temporaries): every sharded gradient.
    moments.append(dict(static, **{"gathered units": 0}, gradients=sum(shard_grad) if on_gpu else 0, activations=0,
                        **{"dequantized weight": 0}, logits=0))
    gpu = max(moments, key=lambda m: sum(m.values()))
    gpu["total"] = sum(gpu.values())
    cpu = {"weight shards": cpu_shards, "gradients": 0 if on_gpu else sum(shard_grad),
           "optimizer": 0 if on_gpu else optim} if offload != "none" else {}
    return gpu, cpu


# -- sharded, resumable checkpoints: each rank its shards and optimizer state --------------


def save_sharded(path, sharded: Sharded, extra):
    """<path>/rank<r>.pt per rank, each written to a temp name and renamed; then rank 0 writes
    <path>/done.json, so a folder without it is an interrupted save."""
    os.makedirs(path, exist_ok=True)
    if sharded.d.rank == 0 and os.path.exists(os.path.join(path, "done.json")):
        os.remove(os.path.join(path, "done.json"))
    if sharded.d.world > 1:
        dist.barrier()
    layout = [(u.name, g.numel, str(g.shard.dtype)) for u in sharded.units for g in u.groups]
    state = {"shards": [g.shard.detach().cpu() for u in sharded.units for g in u.groups], "layout": layout,
             "world": sharded.d.world, **extra}
    file = os.path.join(path, f"rank{sharded.d.rank}.pt")
    torch.save(state, file + ".tmp")
    os.replace(file + ".tmp", file)
    if sharded.d.world > 1:
        dist.barrier()
    if sharded.d.rank == 0:
        json.dump({"world": sharded.d.world}, open(os.path.join(path, "done.json"), "w"))


def load_sharded(path, sharded: Sharded):
    """Restore this rank's shards; returns the rest of what save_sharded stored (optimizer, step, ...).

    Saved at another world size, the checkpoint is re-sharded on the fly: every rank memory-maps all
    the old rank files and copies out its new slice of each buffer and of each AdamW state tensor.
    The data position becomes the same global position (rank_index * old_world / new_world), and a
    new rank takes the RNG state of the old rank with its number (or rank 0's)."""
    done = os.path.join(path, "done.json")
    if not os.path.isfile(done):
        raise FileNotFoundError(f"{path}: no complete sharded checkpoint (done.json missing)")
    world, d = json.load(open(done))["world"], sharded.d
    groups = [g for u in sharded.units for g in u.groups]
    layout = [(u.name, g.numel, str(g.shard.dtype)) for u in sharded.units for g in u.groups]
    files = [os.path.join(path, f"rank{r}.pt") for r in range(world)]
    old = [torch.load(f, map_location="cpu", weights_only=False, mmap=True) for f in files]
    if [tuple(x) for x in old[0]["layout"]] != layout:
        raise ValueError(f"{path}: saved for a different model, --train_type or --lora_target")

    def reshard(pieces, g):
        if world == d.world:
            return pieces[d.rank]
        full = torch.cat([p.reshape(-1) for p in pieces])[:g.numel]
        lo = d.rank * g.shard_numel
        mine = full[lo:lo + g.shard_numel]
        return torch.cat([mine, mine.new_zeros(g.shard_numel - mine.numel())])

    with torch.no_grad():
        for i, g in enumerate(groups):
            g.shard.copy_(reshard([o["shards"][i] for o in old], g))
    state = dict(old[d.rank if d.rank < world else 0])
    trainable = [g for grp in sharded.param_groups(0.0) for g_shard in grp["params"] for g in groups if g.shard is g_shard]
    opt = state["optimizer"]
    opt["state"] = {k: {name: (reshard([o["optimizer"]["state"][k][name] for o in old], trainable[k])
                               if torch.is_tensor(v) and v.dim() == 1 else v) for name, v in s.items()}
                    for k, s in opt["state"].items()}
    if world != d.world:
        state["data"] = dict(state["data"], index=state["data"]["index"] * world // d.world)
    return state
